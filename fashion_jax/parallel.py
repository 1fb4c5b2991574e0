"""Where the data-parallel wrapping lives: one step function, four ways to run it.

- "none": `jax.jit` on one device.
- "mesh": `jax.jit` over a 1-D ("data",) mesh of all devices (all hosts): state
  replicated, batch sharded along its batch axis; XLA inserts the gradient
  all-reduce.
- "pmap": `jax.pmap` over the local devices with an explicit `lax.pmean` of the
  gradients (the step function receives `axis_name`).
- "auto": "mesh" when there is more than one device, else "none".

The train loop sees only this module's `Parallel` object: it places the
state, turns host batches into device batches, compiles the steps and brings
metrics back. Checkpoints always hold one logical copy of the state (a
replicated global array), whatever the mode, so a run can resume under
another mode or device count.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from fashion_jax.errors import UserError

AXIS = "data"


class Parallel:
  """Device placement and compilation for one parallelism mode."""

  def __init__(self, mode: str = "auto", devices=None):
    self.devices = list(devices) if devices is not None else jax.devices()
    if mode == "auto":
      mode = "mesh" if len(self.devices) > 1 else "none"
    if mode not in ("none", "mesh", "pmap"):
      raise UserError(f"config.parallelism={mode!r} is invalid: use auto, mesh, pmap or none")
    self.mode = mode
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self.local_devices = [d for d in self.devices if d.process_index == self.process_index]
    if mode == "none":
      self.devices = self.local_devices = self.devices[:1]
    # Auto axes: XLA propagates the batch sharding and inserts the collectives.
    self.mesh = _mesh(self.devices)
    self.replicated = NamedSharding(self.mesh, P())

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def check_batch(self, global_batch: int, key: str) -> dict[str, int]:
    """Checks that a global batch splits evenly; returns the split for logging."""
    if global_batch % self.num_devices:
      lo = global_batch // self.num_devices * self.num_devices
      hint = f"{lo} or {lo + self.num_devices}" if lo else str(self.num_devices)
      raise UserError(f"config.{key}={global_batch} does not divide by the {self.num_devices} "
                      f"devices ({self.mode}); use a multiple of {self.num_devices}, e.g. {hint}")
    return {"global": global_batch, "per_host": global_batch // self.process_count,
            "per_device": global_batch // self.num_devices}

  # --- state ---------------------------------------------------------------

  def put_state(self, state):
    """Places one logical copy of the state (host or device arrays) for this mode."""
    if self.mode == "pmap":
      n = len(self.local_devices)
      sharding = NamedSharding(_mesh(self.local_devices), P(AXIS))
      return jax.tree.map(
          lambda x: jax.device_put(np.broadcast_to(_host(x), (n,) + np.shape(x)), sharding), state)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), self.replicated,
                                               functools.partial(_index, _host(x))), state)

  def logical_state(self, state):
    """One logical copy of a placed state, as replicated global arrays (for checkpoints)."""
    if self.mode != "pmap":
      return state

    def unstack(x):
      shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, shards)
    return jax.tree.map(unstack, state)

  def abstract_state(self, state_shapes):
    """ShapeDtypeStructs (with shardings) to restore a logical state into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), state_shapes)

  def fetch(self, tree):
    """Device values (metrics: identical on every device) -> host numpy."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

  # --- batches -------------------------------------------------------------

  def put_batch(self, batch: dict[str, np.ndarray], stacked: bool = False):
    """This process's part of a global batch -> device batch.

    `stacked` batches carry a leading [steps] axis before the batch axis.
    """
    if self.mode == "pmap":
      n = len(self.local_devices)

      def split(x):
        if stacked:  # [k, B, ...] -> [n, k, B/n, ...]
          x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:])
          return np.swapaxes(x, 0, 1)
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
      return jax.tree.map(split, batch)
    spec = P(None, AXIS) if stacked else P(AXIS)
    sharding = NamedSharding(self.mesh, spec)

    def put(x):
      global_shape = list(x.shape)
      global_shape[1 if stacked else 0] *= self.process_count
      return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return jax.tree.map(put, batch)

  # --- compilation ---------------------------------------------------------

  def compile(self, step: Callable, donate_state: bool = True, stacked: bool = False):
    """Compiles `step(state, batch, axis_name=None) -> (state_or_metrics, ...)`.

    The same step function serves every mode; under pmap it gets the axis name
    for its explicit collectives.
    """
    donate = (0,) if donate_state else ()
    if self.mode == "pmap":
      return jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS,
                      devices=self.local_devices, donate_argnums=donate)
    batch_sharding = NamedSharding(self.mesh, P(None, AXIS) if stacked else P(AXIS))
    return jax.jit(step, in_shardings=(self.replicated, batch_sharding),
                   out_shardings=self.replicated, donate_argnums=donate)


def _mesh(devices) -> jax.sharding.Mesh:
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _index(x: np.ndarray, index):
  return x[index]


def describe(parallel: Parallel) -> str:
  return (f"parallelism={parallel.mode} devices={parallel.num_devices} "
          f"(local {len(parallel.local_devices)}) processes={parallel.process_count} "
          f"mesh={dict(parallel.mesh.shape)}")

