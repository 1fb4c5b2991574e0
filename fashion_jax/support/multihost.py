"""Host-side agreement between the processes of a multi-process job.

Uses JAX's coordination service (the key-value store and barriers that
`jax.distributed.initialize` starts, and that Orbax's own multihost sync
uses): it talks to the coordinator only, so it never waits for the devices.
Without a coordination client (a JAX that does not expose it) it falls back to
an all-gather on the devices.
"""

from __future__ import annotations

import jax
import numpy as np

_PREFIX = "fashion_jax"
BARRIER_TIMEOUT_MS = 60 * 60 * 1000  # A peer that died fails the barrier much sooner.


def _client():
  """JAX's coordination-service client, or None (one process, or not exposed)."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(distributed.global_state, "client", None)


def gather(name: str, value: str | None) -> dict[int, str]:
  """{process index: value} of every process that passed a value (not None) for `name`.

  A collective: every process calls it with the same `name` (unique within the
  job: it names a barrier), and all of them get the same answer.
  """
  index, count = jax.process_index(), jax.process_count()
  if count == 1:
    return {} if value is None else {index: value}
  client = _client()
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = np.asarray(multihost_utils.process_allgather(np.int32(value is not None)))
    return {int(i): "?" for i in np.flatnonzero(flags)}
  if value is not None:
    client.key_value_set(f"{_PREFIX}/{name}/{index}", value)
  client.wait_at_barrier(f"{_PREFIX}/{name}", BARRIER_TIMEOUT_MS)
  return {int(key.rsplit("/", 1)[-1]): found
          for key, found in client.key_value_dir_get(f"{_PREFIX}/{name}/")}


def barrier(name: str) -> None:
  """All processes wait here for each other (nothing with one process)."""
  gather(name, None)
