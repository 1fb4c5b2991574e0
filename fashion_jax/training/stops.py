"""Stopping on SIGTERM/SIGINT at one step that every process agrees on.

A signal only sets a flag (and says so at once); the loop asks `StopRequest.agreed(step)` at each
window boundary. With one process that is the flag itself. With several, a
preemption notice reaches hosts at different moments (TPU pods, SLURM), and a
host that stops alone leaves the others waiting in the next all-reduce while
it waits in the collective save: the job hangs. So at every boundary all
processes meet at a barrier of JAX's coordination service (`multihost.gather`:
host-side, it does not wait for the devices), after each has published its
signal, if any; after the barrier every process reads the same set of signals
and takes the same decision at the same step. The cost is one
round trip to the coordinator per window (each window is tens to thousands of
steps).

Training holds the handlers from its start, before the data loads: a signal while the data
loads, the state restores or the first window compiles stops the run at the first boundary (with
several processes, jax.distributed's own SIGTERM notifier had taken those signals, and the job
trained on to the end with exit 0). `fashion_jax.main` holds them from the moment the process
has joined the distributed job (`parallel.initialize_distributed` turns jax's notifier off, or
puts Python's handler back where a jax has no switch); a StopRequest entered while another one
holds the handlers takes over a signal that one has already received. Before joining, a signal
ends the process as it would any program (nothing is saved yet, nothing is lost).

A second signal ends a single-process run at once (stop waiting; exit 75 or 130);
with several processes it is ignored with a warning: a process leaving a
collective Orbax save half-way would leave the others waiting in it forever
(reproduced: a job whose processes each got two SIGTERMs hung). SIGKILL still
stops at once, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback

import jax

from fashion_jax.support import multihost
from fashion_jax.support import runtime
from fashion_jax.support.errors import EXIT_INTERRUPTED, UserError

# Exit status of a run that was stopped by a signal after saving a checkpoint at the
# agreed step: "preempted, re-run the same command to resume" (sysexits' EX_TEMPFAIL).
# Distinct from 2 (a problem with the input: fix it) and 1 (a crash).
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The run stopped at an agreed step with a checkpoint saved there; re-running resumes."""


def _stop_now(signum: int) -> None:
  """A second signal in a single-process run: exit at once, as SIGKILL would -- Orbax renames a
  checkpoint into place only when complete, so the previous one stays the latest, and a metrics
  line cut short is dropped at the resume. (Raising KeyboardInterrupt here instead surfaced
  inside Orbax's wait for the save, as its logged tracebacks and its threads' noise at exit.)
  Exit 75 after SIGTERM (a scheduler's: requeue), 130 after SIGINT (Ctrl-C)."""
  name = signal.Signals(signum).name
  runtime.abandon()  # (A native build's compilers and work folder: `os._exit` skips its finally.)
  runtime.say_at_once(f"fashion_jax: error: stopped by a second {name} before the stop checkpoint"
                      " was saved; the previous checkpoint stays the latest: re-run the same "
                      "command to resume")
  os._exit(EXIT_PREEMPTED if signum == signal.SIGTERM else EXIT_INTERRUPTED)  # pylint: disable=protected-access


@contextlib.contextmanager
def a_crash_ends_the_job():
  """A crash (not a UserError, not a stop) in a job of several processes: its traceback, then
  the others told (`multihost.fail_fast`: they end with `process N: crashed ...` at their next
  agreement point) and this process gone at once, exit 1. Leaving normally, it waited in JAX's
  shutdown barrier while the others waited for it in the next window's all-reduce: every
  process aborted after 5 minutes (exit 134, a C++ stack). Entered outermost: a save already
  under way is finished first. A peer's crash (`multihost.PeerFailed`, code 1) ends this process
  with 1 too, its saves finished and files flushed first as well. With one process the exception
  goes on as it was."""
  try:
    yield
  except multihost.PeerFailed as e:  # Another process crashed first: exit 1 with it (not 2).
    if e.code != 2:
      sys.stderr.write(f"fashion_jax: error: {e}\n")
      multihost.fail_fast(str(e), e.code)
    raise
  except Exception as e:  # pylint: disable=broad-except
    if (isinstance(e, (UserError, Preempted)) or not jax.distributed.is_initialized()
        or jax.process_count() == 1):
      raise
    traceback.print_exc()
    first = (str(e).strip().splitlines() or [""])[0][:200]
    multihost.fail_fast(f"crashed ({type(e).__name__}: {first}); see its log for the traceback", 1)
    raise


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag, and agrees across processes on when to stop."""

  def __init__(self):
    self.signal = None  # This process's own signal, by name.
    self._previous = {}
    self._saved = None  # The stop checkpoint is saved (see saved()): "saved" or "exiting".
    self._processes = None  # jax.process_count(), once asked outside a handler (`agreed`).

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. called from a test runner thread).
        continue
      outer = getattr(self._previous[sig], "__self__", None)
      if isinstance(outer, StopRequest) and self.signal is None:
        self.signal = outer.signal  # Received before this one took over: still a stop.
      if isinstance(outer, StopRequest) and self._processes is None:
        self._processes = outer._processes  # pylint: disable=protected-access
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name  # (Said by `say_at_once`: not logging's stderr writes.)
    if self._saved:  # Nothing left to stop: the run is only ending (said, not silent).
      runtime.say_at_once(f"fashion_jax: warning: {name} ignored: the stop checkpoint is saved, "
                          "and the run ends once the work under way does (a background compile);"
                          " SIGKILL ends it now")
      return
    if self.signal is None:  # Said: before the first boundary (a download, a compile) it may
      self.signal = name  # be minutes, and a silent Ctrl-C looks ignored.
      runtime.say_at_once(f"fashion_jax: {name}: stopping at the next window boundary, with a "
                          "checkpoint there" + (f" (a second {name} stops at once)" if self._alone()
                                                else " that every process agrees on")
                          + ", or at the end if that comes first")
    elif self._alone():
      _stop_now(signum)  # Nothing collective to break.
    else:  # Several processes: leaving a collective save half-way would hang the others.
      runtime.say_at_once(f"fashion_jax: warning: already stopping at the next agreed step ({name}"
                          " ignored); SIGKILL stops now")

  def _alone(self) -> bool:
    """Whether the run has one process, asked without JAX's backend: a handler runs between two
    bytecodes of the main thread, which may be starting the backend under its lock (a signal
    then, process_count() in the handler waited for that lock for good). Before the first
    boundary of a distributed job, taken as several (a second signal is then ignored)."""
    return not jax.distributed.is_initialized() or self._processes == 1

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      outer = getattr(handler, "__self__", None)  # main's, taking over again: saved there too.
      if self._saved and isinstance(outer, StopRequest) and not outer._saved:  # pylint: disable=protected-access
        outer._saved = "saved"  # pylint: disable=protected-access
      signal.signal(sig, signal.SIG_IGN if self._saved == "exiting" else handler)

  def saved(self, exiting: bool = True) -> None:
    """The stop checkpoint is saved: SIGTERM/SIGINT change nothing from now on. `exiting`: the
    process exits 75 next (main), and they stay ignored after leaving this request too, for the
    rest of the process: its default came back there, and a signal while the process shut down
    (jax.distributed's barrier waits for the others: a second pkill, a signal sent to each
    process of a job) ended a process that had saved with 143, which the launcher reported as
    that process failing. Else (train_and_evaluate's, maybe in a notebook's own process, whose
    next cell must still take a Ctrl-C) the handlers before it come back on leaving."""
    self._saved = "exiting" if exiting else "saved"

  def agreed(self, step: int) -> str | None:
    """Why every process stops at `step` ("SIGTERM to process 1"), or None to go on.

    Every process must call this at the same steps (the window boundaries,
    which depend only on the config).
    """
    self._processes = jax.process_count()
    if self._processes == 1:
      return self.signal
    signals = multihost.gather(f"stop/{step}", self.signal)
    if not signals:
      return None
    first = min(signals)
    return f"{signals[first]} to process {first}"
