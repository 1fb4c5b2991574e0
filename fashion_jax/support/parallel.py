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
import json
import os
import signal
import socket
import time

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from fashion_jax.support import multihost
from fashion_jax.support.errors import UserError

AXIS = "data"
# Config keys that may differ between the processes of a job (each host's own paths and id);
# every other key must be the same on all of them (`check_same_config`).
PER_PROCESS_KEYS = ("process_id", "idx_dir", "data_dir", "coordinator_address", "distributed",
                    "distributed_timeout_s", "progress_bar")


def cluster_detected() -> str | None:
  """A multi-process launcher JAX can read its topology from, if any.

  SLURM: a step of several tasks (srun), as JAX's own detection wants it. A batch script or a
  salloc shell of an allocation of several tasks has SLURM_NTASKS > 1 too, but its one process
  is no job of several: one run there had been refused ("could not join ... coordinator_address
  should be defined").
  """
  if (_env_count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in os.environ
      and "SLURM_STEP_NODELIST" in os.environ and "SLURM_JOB_ID" in os.environ):
    return "SLURM"
  if _env_count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU pod"
  return None


def _env_count(name: str) -> int:
  """A launcher's process count from the environment; 1 where unset or not a number."""
  value = os.environ.get(name, "").strip()
  return int(value) if value.isdigit() else 1


def _host_port(address: str, source: str) -> tuple[str, int]:
  """(host, port) of a coordinator address (given as `source`); UserError where not host:port."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UserError(f"{source}={address!r} is not host:port (a TCP port "
                    "1-65535), e.g. localhost:23456")
  return host.strip("[]"), int(port)


def _check_port_free(address: str, source: str) -> None:
  """Process 0 runs the coordinator on the address's port on every interface: a port in use
  there made JAX abort (a segmentation fault, exit 139) or a C++ fatal error (134)."""
  _, port = _host_port(address, source)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As the server: TIME_WAIT is fine.
    try:
      probe.bind(("", port))
    except OSError as e:
      raise UserError(
          f"{source}={address!r}: port {port} is in use on this machine, where "
          f"process 0 runs the job's coordinator ({e.strerror or e}); pick another port for every "
          "process (launch/local_multiprocess.sh: FASHION_JAX_PORT=PORT)") from e


def _wait_for_coordinator(address: str, timeout_s: float, source: str) -> None:
  host, port = _host_port(address, source)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f"could not join the distributed job at {address}: nothing answered there for "
            f"{timeout_s:g}s ({e.strerror or e}); start process 0 first, and check that every "
            "process uses the same coordinator address and that it is reachable") from e
      time.sleep(0.5)


def _restore_python_sigterm() -> None:
  """Puts Python's SIGTERM handler back where jax.distributed installed its notifier: a jax
  without the jax_enable_preemption_service switch (0.7) always does, and a SIGTERM then only
  recorded a preemption notice (the process neither stopped nor ran Python's handler)."""
  handler = signal.getsignal(signal.SIGTERM)
  if handler is not None:
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: leave it.
      pass


def initialize_distributed(config) -> bool:
  """Joins a multi-process JAX job when the config or the environment asks for one.

  config.distributed: "off" never; "on" always (explicit coordinator from the config or
  JAX_COORDINATOR_ADDRESS, else JAX's cluster auto-detection); "auto" when a coordinator is
  given or a SLURM / Open MPI / TPU-pod launch with more than one process is detected. Must run
  before any JAX computation. Returns whether it initialized. Failures are UserErrors, and never
  hang longer than config.distributed_timeout_s.
  """
  mode = config.distributed
  coordinator = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  cluster = cluster_detected()
  if mode == "off" or (mode == "auto" and not coordinator and not cluster):
    return False
  kwargs = {"initialization_timeout": int(config.distributed_timeout_s)}
  # The address from the config, or from JAX_COORDINATOR_ADDRESS with the process count and id
  # from the config (they had been dropped: "Number of processes must be defined"); from the
  # variable alone, JAX takes them from the cluster it detects.
  explicit = bool(config.coordinator_address) or bool(
      coordinator and (config.num_processes != -1 or config.process_id != -1))
  source = ("config.coordinator_address" if config.coordinator_address else
            "JAX_COORDINATOR_ADDRESS")
  if explicit:
    if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
      raise UserError(
          f"{source}={coordinator!r} needs config.num_processes >= 1 and "
          f"config.process_id in 0..num_processes-1 (got {config.num_processes} and "
          f"{config.process_id})")
    kwargs.update(coordinator_address=coordinator, num_processes=config.num_processes,
                  process_id=config.process_id)
  if explicit and config.process_id > 0:
    # JAX's client aborts the whole process (C++ fatal error) when it cannot register;
    # check reachability first so a wrong address is a clear, bounded error.
    _wait_for_coordinator(coordinator, config.distributed_timeout_s, source)
  elif explicit:
    _check_port_free(coordinator, source)
  # CPU processes exchange gradients through gloo; GPU/TPU use their own fabric.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = coordinator or f"the {cluster or 'auto-detected'} cluster"
  logging.info("joining distributed JAX job at %s (timeout %ss)", where,
               kwargs["initialization_timeout"])
  # jax's preemption notifier takes SIGTERM from Python's handlers for its own sync points,
  # which this project does not use (training agrees on its stop steps: training/stops.py).
  if hasattr(jax.config, "jax_enable_preemption_service"):
    jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises plain RuntimeErrors)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not explicit and ("must be defined" in first or "should be defined" in first):
      # JAX found no topology to read: Open MPI 5 sets no OMPI_MCA_orte_hnp_uri, which JAX's
      # Open MPI detection reads (the advice to "use the same coordinator address" fit nothing).
      launch = f"this {cluster} launch" if cluster else "the environment (no cluster detected)"
      # With JAX_COORDINATOR_ADDRESS the address is given: the count and ids are missing.
      fix = (f"with {source} pass --config.num_processes and each process's --config.process_id"
             if coordinator else "pass process 0's --config.coordinator_address=HOST:PORT, "
             "--config.num_processes and each process's --config.process_id")
      raise UserError(f"config.distributed={mode!r}: JAX could not read the job's processes from "
                      f"{launch} ({first}); {fix}") from e
    raise UserError(f"could not join the distributed job at {where}: {first[:300]}; check that "
                    "every process uses the same coordinator address and num_processes, distinct "
                    "process ids, and that process 0 is running and reachable") from e
  _restore_python_sigterm()
  logging.info("joined: process %d of %d", jax.process_index(), jax.process_count())
  check_same_config(config)
  return True


def check_same_data(digests: str) -> None:
  """UserError, on every process alike, where a process of the job read other data than process 0
  (`digests`: of its train and test splits): each host reads its own IDX folder or tfds copy, and
  one with other files had trained on them, its "replicated" data and parameters not the others'."""
  found = multihost.gather("data", digests)
  odd = sorted(index for index, theirs in found.items() if theirs != found.get(0, digests))
  if odd:
    raise UserError(f"process {odd[0]} of the job read other data than process 0 (train/test "
                    f"digests {found[odd[0]]}, process 0: {found.get(0)}); give every process "
                    "the same data files (config.idx_dir or data_dir on each host)")


def check_same_config(config) -> None:
  """UserError, on every process alike, where a process of the job was given another config than
  process 0 (but for PER_PROCESS_KEYS). Each had trained with its own: another learning rate or
  seed left the replicated state different on each host (its metrics and checkpoint process 0's
  alone), silently; another batch size hung in the first all-reduce."""
  values = json.loads(config.to_json_best_effort())
  mine = {key: value for key, value in values.items() if key not in PER_PROCESS_KEYS}
  found = multihost.gather("config", json.dumps(mine, sort_keys=True))
  if "?" in found.values():  # A JAX without the coordination client: flags alone, no values.
    return
  found = {index: json.loads(text) for index, text in found.items()}
  lead = found.get(0, mine)
  for index, theirs in sorted(found.items()):
    differ = sorted(key for key in lead.keys() | theirs.keys() if lead.get(key) != theirs.get(key))
    if differ:
      said = ", ".join(f"{key}={theirs.get(key)!r} (process 0: {lead.get(key)!r})"
                       for key in differ[:3]) + (f" and {len(differ) - 3} more" if differ[3:] else "")
      raise UserError(f"process {index} of the job was given another config than process 0: "
                      f"{said}; give every process the same config and flags (only "
                      f"{', '.join(PER_PROCESS_KEYS)} may differ)")


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
      if self.process_count > 1:  # One device in all: the other processes would have none.
        raise UserError(f"config.parallelism='none' runs on one device, but this job has "
                        f"{self.process_count} processes; use auto, mesh or pmap, or run one "
                        "process")
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
    def place(x):
      if isinstance(x, jax.Array) and x.sharding == self.replicated:  # (Not merely equivalent:
        return x  # a single device's array recompiled the second window.) A restored state was
      # copied through the host again: a GPU held it twice at the peak.
      return jax.make_array_from_callback(np.shape(x), self.replicated,
                                          functools.partial(_index, _host(x)))
    return jax.tree.map(place, state)

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

  def put_batch(self, batch: dict[str, np.ndarray], stacked: bool = False, index=None):
    """This process's part of a global batch -> device batch (`stacked`: a leading [steps] axis);
    with `index`, the rows `index` of each array, gathered once, straight into the pmap layout."""
    if self.mode == "pmap":
      n = len(self.local_devices)

      def split(x):
        if stacked:  # [k, B, ...] -> [n, k, B/n, ...]
          x = x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:])
          return np.swapaxes(x, 0, 1)
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
      sharding = NamedSharding(_mesh(self.local_devices), P(AXIS))
      place = ((lambda x: np.ascontiguousarray(split(x))) if index is None else
               (lambda x: x[split(index)]))  # (Gathered, then split: the window copied twice.)
      return jax.tree.map(lambda x: jax.device_put(place(x), sharding), batch)
    batch = batch if index is None else jax.tree.map(lambda x: x[index], batch)
    spec = P(None, AXIS) if stacked else P(AXIS)
    sharding = NamedSharding(self.mesh, spec)

    def put(x):
      global_shape = list(x.shape)
      global_shape[1 if stacked else 0] *= self.process_count
      return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
    return jax.tree.map(put, batch)

  def put_index_table(self, table: np.ndarray):
    """A [rows, global_batch] table of example indices, placed so each device reads its part.

    mesh/none: replicated (the window shards each row along the batch inside
    the compiled call). pmap: device j of process p gets the columns of its
    slice of the global batch, [local devices, rows, global_batch / devices].
    """
    if self.mode != "pmap":
      return self.put_state(table)
    n = len(self.local_devices)
    local = table.shape[1] // self.process_count
    mine = table[:, self.process_index * local:(self.process_index + 1) * local]
    per_device = np.ascontiguousarray(
        np.swapaxes(mine.reshape(table.shape[0], n, local // n), 0, 1))
    sharding = NamedSharding(_mesh(self.local_devices), P(AXIS))
    return jax.device_put(per_device, sharding)

  def shard_batch(self, x):
    """Inside a compiled function: lay `x`'s leading (batch) axis out over the devices."""
    if self.mode == "pmap":
      return x  # Each device already holds its own part.
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(AXIS)))

  # --- compilation ---------------------------------------------------------

  def compile(self, step: Callable, donate_state: bool = True, stacked: bool = False,
              resident_args: int = 0):
    """Compiles `step(state, inputs..., axis_name=None) -> (state_or_metrics, ...)`.

    The same step function serves every mode; under pmap it gets the axis name for its explicit
    collectives. Its inputs are one batch (`stacked`: with a leading [steps] axis), or
    `resident_args` arrays placed with `put_state` / `put_index_table` (data on the device).
    """
    donate = (0,) if donate_state else ()
    if self.mode == "pmap":
      # All devices (every host feeds its local ones), so the pmean spans hosts.
      return jax.pmap(functools.partial(step, axis_name=AXIS), axis_name=AXIS,
                      donate_argnums=donate)
    if resident_args:
      in_shardings = (self.replicated,) * (1 + resident_args)
    else:
      in_shardings = (self.replicated,
                      NamedSharding(self.mesh, P(None, AXIS) if stacked else P(AXIS)))
    return jax.jit(step, in_shardings=in_shardings, out_shardings=self.replicated,
                   donate_argnums=donate)


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

