"""Host-side agreement between the processes of a multi-process job.

Uses JAX's coordination service (the key-value store and barriers that
`jax.distributed.initialize` starts, and that Orbax's own multihost sync
uses): it talks to the coordinator only, so it never waits for the devices.
Without a coordination client (a JAX that does not expose it) it falls back to
an all-gather on the devices.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import jax
import numpy as np

from fashion_jax.support.errors import UserError

_PREFIX = "fashion_jax"
BARRIER_TIMEOUT_MS = 60 * 60 * 1000  # A peer that died fails the barrier much sooner.
# Waits are cut into slices this long, and between them a process looks for a peer's failure
# (`fail_fast`): an error on one process stops the others in seconds, not at a timeout.
SLICE_MS = 1000
# How often this process has gathered under each name: the keys of a name's n-th use are its own
# (`name#n/`), so a name used again in the job (a second `train_and_evaluate`) is a new barrier.
_USES: collections.Counter = collections.Counter()


def _client():
  """JAX's coordination-service client, or None (one process, or not exposed)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(distributed.global_state, "client", None)


def gather(name: str, value: str | None) -> dict[int, str]:
  """{process index: value} of every process that passed a value (not None) for `name`.

  A collective: every process calls it with the same `name` (it names a barrier), and all of
  them get the same answer. A name may come again (every process makes the same calls in the
  same order): each use is a barrier of its own.
  """
  index, count = jax.process_index(), jax.process_count()
  if count == 1:
    return {} if value is None else {index: value}
  client = _client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = np.asarray(multihost_utils.process_allgather(np.int32(value is not None)))
    return {int(i): "?" for i in np.flatnonzero(flags)}
  # Every process sets its key ("=value", or "" for none) and waits for every other's: the
  # barrier, in slices (a barrier cannot be waited for again once its timeout passed). The
  # folder is read first and after each wait, so a process blocks only on a key still missing.
  _USES[name] += 1  # Its keys had been set once per job: a second use failed (ALREADY_EXISTS).
  prefix = f"{_PREFIX}/{name}#{_USES[name]}/"
  client.key_value_set(f"{prefix}{index}", "" if value is None else "=" + value)
  deadline = time.monotonic() + BARRIER_TIMEOUT_MS / 1000
  while True:
    found = dict(client.key_value_dir_get(prefix))
    missing = [i for i in range(count) if f"{prefix}{i}" not in found]
    if not missing:
      return {int(key.rsplit("/", 1)[-1]): text[1:] for key, text in found.items() if text}
    try:
      client.blocking_key_value_get(f"{prefix}{missing[0]}", SLICE_MS)
    except Exception as e:  # pylint: disable=broad-except  (jaxlib's runtime error)
      if "DEADLINE_EXCEEDED" not in str(e):
        raise UserError(f"lost contact with the job's coordinator ({str(e).splitlines()[0]}); "
                        "see the other processes' errors (process 0's first)") from e
      _raise_if_a_peer_failed(client)
      if time.monotonic() > deadline:
        raise UserError(f"process {missing[0]} did not reach {name!r} within "
                        f"{BARRIER_TIMEOUT_MS // 60000} minutes; see its log") from e


class PeerFailed(UserError):
  """Another process of the job failed first: `process N: its message`. `code`: its exit status,
  2 for its bad input (a UserError here too) or 1 for its crash, which this process ends with too
  (`stops.a_crash_ends_the_job`, once its own saves are finished and its files flushed)."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


def _failure(text: str) -> tuple[int, str]:
  """(exit status, message) of a `failed/` value: `fail_fast`'s "CODE:message" (the message may
  hold ':' too), or an older fashion_jax's message alone (it failed with a UserError: 2)."""
  code, colon, message = text.partition(":")
  return (int(code), message) if colon and code.isdigit() else (2, text)


def _raise_if_a_peer_failed(client) -> None:
  try:
    failed = client.key_value_dir_get(f"{_PREFIX}/failed/")
  except Exception:  # pylint: disable=broad-except  (none yet, on some versions)
    return
  if failed:
    # The first process that failed on its own (not one passing another's error on).
    _, index, code, message = min(
        (message.startswith("process "), int(key.rsplit("/", 1)[-1]), code, message)
        for key, text in failed for code, message in [_failure(text)])
    # Raised, not exited here: this process's pending saves are finished and its metrics
    # flushed on the way out. A crash (exit 1) ends it with 1 too, not 2 ("fix the input"): a
    # launcher that reports the first status it sees reported 2 for process 0's crash.
    raise PeerFailed(f"process {index}: {message}", code)


def fail_fast(message: str, code: int) -> None:
  """In a job of several processes: tells the others that this one fails with `message` (they
  stop at their next wait with it, `gather`), then leaves at once with `code`. Returns with one
  process. JAX's exit handler would wait for every process at its shutdown barrier, for up to 5
  minutes, and then abort (exit 134) while the others waited too."""
  try:  # The job as jax.distributed joined it (jax.process_count() might start the backend).
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    state = distributed.global_state
  except ImportError:
    return
  client = getattr(state, "client", None)
  if client is None or (getattr(state, "num_processes", 1) or 1) <= 1:
    return
  index = getattr(state, "process_id", 0) or 0
  try:
    client.key_value_set(f"{_PREFIX}/failed/{index}", f"{code}:{message}")
  except Exception:  # pylint: disable=broad-except  (already failed here, or the coordinator left)
    pass
  sys.stdout.flush()
  sys.stderr.flush()
  if index == 0:  # It runs the coordinator: the others read the message before it goes.
    _wait_for_the_others_to_fail(client, getattr(state, "num_processes", 1) or 1)
  os._exit(code)  # pylint: disable=protected-access


LEAD_WAIT_S = 10.0  # How long process 0 waits at most, failing, for the others to fail too.


def _wait_for_the_others_to_fail(client, count: int) -> None:
  """Until every process has set its `failed/` key (each does as it fails, passing the message
  on), or LEAD_WAIT_S: process 0 runs the coordinator, and a fixed 2 s was too short for a
  process busy elsewhere (a long window's metrics, an evaluation): once the coordinator was gone
  it failed with "lost contact with the job's coordinator" (exit 2) or JAX aborted it."""
  deadline = time.monotonic() + LEAD_WAIT_S
  while time.monotonic() < deadline:
    try:
      if len(client.key_value_dir_get(f"{_PREFIX}/failed/")) >= count:
        return
    except Exception:  # pylint: disable=broad-except  (the coordinator's trouble: nothing to wait for)
      return
    time.sleep(0.1)


def barrier(name: str) -> None:
  """All processes wait here for each other (nothing with one process)."""
  gather(name, None)
