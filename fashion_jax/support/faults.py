"""Fault injection for the reliability tests: SIGKILL (or SIGTERM) this process at a named point.

Inactive unless FASHION_JAX_KILL_AT is set, e.g. "step:15" (right after step 15
is dispatched, while it runs) or "save:20" (right after the save of step 20 has
started writing in the background). Used by tests/test_faults.py to prove that
a run killed anywhere resumes to a bitwise-identical result. FASHION_JAX_SIGNAL_AT=POINT sends
SIGTERM (or POINT:SIGINT's signal) at `maybe_signal(POINT)` instead (a preemption notice at
that moment; "stop_save": a second signal while the stop checkpoint is being written).
FASHION_JAX_DISK_FULL=I makes process I's free-disk check before a save find none.
FASHION_JAX_CRASH_AT=POINT:STEP raises a RuntimeError where FASHION_JAX_KILL_AT would kill (a bug).
"""

import os
import signal

_TARGET = os.environ.get("FASHION_JAX_KILL_AT", "")


def maybe_kill(point: str, step: int, last: int | None = None) -> None:
  """Kills at `point:step`, or at any `point:s` with step <= s <= last (a window of steps)."""
  for target, crash in ((_TARGET, False), (os.environ.get("FASHION_JAX_CRASH_AT", ""), True)):
    name, _, at = target.partition(":")
    if target and name == point and step <= int(at) <= (step if last is None else last):
      if crash:
        raise RuntimeError(f"crash injected at {target} (FASHION_JAX_CRASH_AT)")
      os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(point: str) -> None:
  """Sends this process SIGTERM at `point` where FASHION_JAX_SIGNAL_AT names it
  ("POINT", or "POINT:SIGINT" for another signal)."""
  name, _, signame = os.environ.get("FASHION_JAX_SIGNAL_AT", "").partition(":")
  if name == point:
    os.kill(os.getpid(), getattr(signal, signame or "SIGTERM"))


def disk_full() -> bool:
  """Whether FASHION_JAX_DISK_FULL names this process (its index) as out of disk."""
  wanted = os.environ.get("FASHION_JAX_DISK_FULL", "")
  if not wanted:
    return False
  import jax  # pylint: disable=g-import-not-at-top  (only when testing)
  return wanted == str(jax.process_index())
