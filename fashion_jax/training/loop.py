"""The train loop's engine: windows of steps in one compiled call, data on the host or the device.

A *window* is a `lax.scan` over consecutive train steps: one dispatch, the state
donated, the per-step metrics returned as small arrays. The host dispatches the
next window before it reads the last one's metrics, so the device never waits
for the host, and at most two windows are in flight (XLA:CPU with several
devices in one process deadlocks its collectives when many executions queue).

Windows end only where the host needs the state itself -- checkpoint and eval
steps, and the last step -- so windows have few lengths: the largest divisor of
the checkpoint and eval intervals up to a cap (`steps_per_dispatch`, or by
default 100 on CPU and 1000 on an accelerator), one compiled window plus at
most one shorter one for the end; where that divisor is small, the largest
divisor of the smaller interval (intervals with no common factor), else the
cap (a prime interval), and shorter windows up to each boundary (`next_window`).
Log lines need only the metrics, which are per step, so they fall anywhere
inside a window. A single-process run compiles the other lengths in the background from its
first window on (`Windows.compile_ahead`), not when each first comes.

Where the batches come from (`config.data_placement`):
- host: numpy gathers a window's batches from the in-memory split in one go, straight
  into the stacked [steps, batch, ...] array that is sent (uint8; under pmap, laid out per
  device by the gather's index): gathered batch by batch and then stacked, or stacked and then
  split per device, the window was copied twice, 2x its size at the peak.
- device: the train split (uint8, 47 MB) and its labels go to the device(s)
  once; each epoch's order -- exactly the host's `(seed, epoch)` permutation,
  `input_pipeline.epoch_index` -- goes up once as a table of example indices,
  and each step gathers its batch inside the compiled window, laid out over
  the devices as the mesh needs (under pmap each device gathers its own part).
  Step s trains on the same examples in both placements, so resuming and
  results do not depend on the placement.
- auto: device. Measured faster on this project's CPUs too, native kernels
  included (BENCHMARKS.md, "Train loop"); on a GPU/TPU the host loop leaves
  the chip idle.
"""

from __future__ import annotations

import functools
import math

from absl import logging
import jax
from jax import lax
import numpy as np

from fashion_jax.data import input_pipeline
from fashion_jax.support import compile_ahead as compile_ahead_lib

PLACEMENTS = ("auto", "host", "device")
AUTO_WINDOW_CAP = {"cpu": 100}  # Steps; other backends: DEFAULT_WINDOW_CAP.
DEFAULT_WINDOW_CAP = 1000


def placement(config) -> str:
  return "device" if config.data_placement == "auto" else config.data_placement


def window_length(config, steps_per_epoch: int, checkpoint_every: int, eval_every: int,
                  backend: str) -> int:
  """The steps per window, at most the cap: the largest that divides the checkpoint and eval
  intervals (one compiled length), unless that is under half of what the cap allows -- a prime
  interval (937 steps an epoch at batch 64), or intervals with no common factor, had made it 1
  step, 15 % slower. Then the largest that divides the smaller interval, if at least half of
  what a window can reach (the cap, or that interval where smaller): its stretches run as one
  window each (or a few alike), and shorter windows only up to the other interval's boundaries
  (`next_window`). The cap had split every stretch of a small interval into powers of two (eval
  every 7 steps, checkpoint every 1875: 4+2+1, three dispatches where one does). Otherwise the
  cap, with shorter windows up to each checkpoint or eval step."""
  cap = (config.steps_per_dispatch if config.steps_per_dispatch > 0
         else AUTO_WINDOW_CAP.get(backend, DEFAULT_WINDOW_CAP))
  cap = max(1, min(cap, steps_per_epoch))  # Device tables hold two epochs.

  def largest_divisor(n: int) -> int:  # Of n, at most the cap.
    return next(d for d in range(min(cap, n), 0, -1) if n % d == 0)

  common = largest_divisor(math.gcd(checkpoint_every, eval_every))
  if 2 * common >= min(cap, max(checkpoint_every, eval_every)):
    return common
  smaller = min(checkpoint_every, eval_every)
  own = largest_divisor(smaller)  # No window runs past the smaller interval's boundaries.
  return own if 2 * own >= min(cap, smaller) else cap


def next_window(step: int, window: int, total_steps: int, *intervals: int) -> int:
  """How many steps the window from `step` runs: `window`, or fewer to stop at the next multiple
  of an interval (checkpoint, eval) or at the end. Where the intervals are multiples of the
  smallest, every stretch between boundaries is alike, so the shorter window is one length;
  otherwise stretches differ, and the shorter windows are powers of two (at most log2(window)
  more lengths to compile, not one per stretch)."""
  room = min(total_steps - step, *(every - step % every for every in intervals))
  if room >= window:
    return window
  if all(every % min(intervals) == 0 for every in intervals) or step + room == total_steps:
    return room
  return 1 << (room.bit_length() - 1)


def lengths_ahead(step: int, window: int, total_steps: int, *intervals: int,
                  scan: int = 10_000) -> list[int]:
  """The window lengths a run from `step` dispatches (`next_window`'s) besides its first window's
  (compiled as it runs), in the order first needed; lengths first needed past `scan` windows are
  left to compile on use. (A resumed run's first window may be the short one.)"""
  found, first = [], next_window(step, window, total_steps, *intervals)
  for _ in range(scan):
    if step >= total_steps:
      break
    n = next_window(step, window, total_steps, *intervals)
    if n != first and n not in found:
      found.append(n)
    step += n
  return found


def train_window(config, placement_: str, steps_per_epoch: int, checkpoint_every: int,
                 eval_every: int, backend: str) -> int:
  """`window_length`, logged with the placement and whether shorter windows run up to the
  checkpoint and eval steps."""
  window = window_length(config, steps_per_epoch, checkpoint_every, eval_every, backend)
  logging.info("train loop: data on the %s, %d steps per dispatch%s", placement_, window,
               "" if checkpoint_every % window == 0 and eval_every % window == 0 else
               " (fewer up to each checkpoint and evaluation)")
  return window


def _host_window(state, batches, *, step_fn, axis_name=None):
  return lax.scan(functools.partial(step_fn, axis_name=axis_name), state, batches)


def _device_window(state, data, table, *, step_fn, length, shard, image_shape, axis_name=None):
  rows = table.shape[0]

  def body(state, _):
    index = shard(lax.dynamic_index_in_dim(table, state.step % rows, keepdims=False))
    # Rows of flat images, in bounds by construction (no clamping or fill): XLA:CPU gathers
    # [N, 784] rows ~9x faster than [N, 28, 28, 1] slices.
    images = data["image"].at[index].get(mode="promise_in_bounds")
    batch = {"image": shard(images.reshape(images.shape[:1] + image_shape)),
             "label": shard(data["label"].at[index].get(mode="promise_in_bounds"))}
    return step_fn(state, batch, axis_name=axis_name)

  return lax.scan(body, state, None, length=length)


class Windows:
  """Dispatches windows of train steps for one placement; compiles each length once.

  `step_fn(state, batch, axis_name=None) -> (state, metrics)` is the pure train
  step. Calling `windows(state, step, n)` runs steps step..step+n-1 and returns
  (state, per-step metrics [n], compiled) without waiting for the device;
  `compiled` says this length was compiled by this call. Each window's batches follow from
  its first step alone (`start_step`, where the run starts, is not needed).
  """

  def __init__(self, step_fn, split, config, parallel, data_placement: str,
               start_step: int = 0):
    del start_step
    self.step_fn, self.parallel, self.placement = step_fn, parallel, data_placement
    self.batch_size, self.seed = config.batch_size, config.seed
    self.num_examples = len(split)
    self.steps_per_epoch = len(split) // config.batch_size
    self._fns, self._used = {}, set()  # Compiled windows by length; those run (compiled ahead).
    self._ahead, self._queued = [], []  # Lengths to compile ahead; their CompiledAheads.
    self._rows = {}  # epoch -> its example indices, [steps_per_epoch, global batch].
    if data_placement == "host":
      self._split = split
      local = config.batch_size // parallel.process_count
      self._columns = slice(parallel.process_index * local, (parallel.process_index + 1) * local)
    else:
      self._image_shape = split.images.shape[1:]
      self._data = parallel.put_state({"image": split.images.reshape(len(split), -1),
                                       "label": split.labels})
      self._table, self._table_epoch = None, None

  @property
  def compiled_lengths(self) -> list[int]:
    return sorted(self._fns)

  def compile_ahead(self, lengths: list[int]):
    """Compiles the windows of `lengths` steps in the background, one after the other, from the
    first window's dispatch on (its compile done, its inputs placed, its output state's shapes
    known), device placement only (host windows compile on use). Returns what the run calls
    however it ends: compiles not started are dropped, the one running is waited for.

    A run whose intervals leave a shorter window (the last steps, or up to each checkpoint and
    eval) compiled it when it came, the loop stopped meanwhile: on a GPU, XLA's autotuning of it,
    while the host's cores idled. On 2 CPU cores, which the windows keep busy, it is a wash
    (validation_size=5000, 17 windows of 100 steps and one of 18: 0.6-0.8 s of compile off the
    loop, wall 7.4 s before and 7.6 after, within noise; BENCHMARKS.md, session 46).
    """
    self._ahead = list(lengths) if self.placement == "device" else []

    def finish():
      for program in self._queued:
        program.cancel()
      return [program.ready for program in self._queued]
    return finish

  def _start_ahead(self, state, step: int) -> None:
    before = None
    for n in self._ahead:
      if n not in self._fns:
        self._fns[n] = before = compile_ahead_lib.CompiledAhead(
            self.function(n)[0], state, *self.inputs(step, 1), after=before)
        self._queued.append(before)
    self._ahead = []

  def function(self, n: int):
    """(The compiled window of n steps, whether this call compiled it): `fn(state, *inputs)`."""
    if n not in self._fns:
      if self.placement == "host":
        fn = functools.partial(_host_window, step_fn=self.step_fn)
        self._fns[n] = self.parallel.compile(fn, stacked=True)
      else:
        fn = functools.partial(_device_window, step_fn=self.step_fn, length=n,
                               shard=self.parallel.shard_batch, image_shape=self._image_shape)
        self._fns[n] = self.parallel.compile(fn, resident_args=2)
      return self._fns[n], True
    return self._fns[n], False

  def inputs(self, step: int, n: int) -> tuple:
    """What the window of steps step..step+n-1 reads besides the state."""
    per_epoch = self.steps_per_epoch
    epoch, offset = divmod(step, per_epoch)
    if self.placement == "host":  # This process's columns of the window's rows, one gather.
      rows = self.epoch_rows(epoch)[offset:offset + n]
      if len(rows) < n:  # The window crosses into the next epoch.
        rows = np.concatenate([rows, self.epoch_rows(epoch + 1)[:n - len(rows)]])
      return (self.parallel.put_batch({"image": self._split.images, "label": self._split.labels},
                                      stacked=True, index=rows[:, self._columns]),)
    if self._table_epoch != epoch:
      # Rows by step modulo two epochs: this epoch and the next, so a window may cross into it.
      table = np.empty((2 * per_epoch, self.batch_size), np.int32)
      for e in (epoch, epoch + 1):
        slot = (e % 2) * per_epoch
        table[slot:slot + per_epoch] = self.epoch_rows(e)
      self._table, self._table_epoch = self.parallel.put_index_table(table), epoch
    return (self._data, self._table)

  def epoch_rows(self, epoch: int) -> np.ndarray:
    """`input_pipeline.epoch_index` of `epoch` (the one train order of both placements), kept
    for this epoch and the next (each is computed once, not at every window or table)."""
    if epoch not in self._rows:
      self._rows = {e: r for e, r in self._rows.items() if e >= epoch - 1}
      self._rows[epoch] = input_pipeline.epoch_index(self.seed, epoch, self.num_examples,
                                                     self.batch_size)
    return self._rows[epoch]

  def __call__(self, state, step: int, n: int):
    if n > self.steps_per_epoch:
      raise ValueError(f"a window of {n} steps is longer than an epoch ({self.steps_per_epoch})")
    fn, compiled = self.function(n)
    ahead = isinstance(fn, compile_ahead_lib.CompiledAhead) and n not in self._used
    waited = ahead and fn.pending
    state, metrics = fn(state, *self.inputs(step, n))
    if self._ahead:  # Only the state's shapes are read: the next window donates it.
      self._start_ahead(state, step)
    if ahead:  # Its first call: waiting for it, or compiling (it failed, or refused), is a compile.
      self._used.add(n)
      compiled = waited or not fn.ran_ahead
    return state, metrics, compiled


MAX_CARRIED_STEPS = 10_000  # Of an unfinished log interval, kept in a checkpoint (~1 MB of JSON).


class LogIntervals:
  """Sums per-step metrics over log intervals: a log line every `every` steps and at `last`.

  `add(first_step, metrics)` takes a window's fetched per-step metrics (numpy
  arrays [n]) for steps first_step+1..first_step+n (counting steps done) and
  returns the finished intervals as (step, sums); a partial interval carries
  over to the next window.
  """

  def __init__(self, every: int, last: int, combine):
    self.every, self.last, self.combine = every, last, combine
    self._parts = []

  def add(self, first_step: int, metrics: dict) -> list[tuple[int, dict]]:
    n = len(next(iter(metrics.values())))
    done, offset = [], 0
    while offset < n:
      step = first_step + offset
      boundary = min((step // self.every + 1) * self.every, self.last)
      take = min(boundary - step, n - offset)
      self._parts.append({k: v[offset:offset + take] for k, v in metrics.items()})
      offset += take
      if step + take == boundary:
        merged = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        done.append((boundary, self.combine(merged, xp=np)))
        self._parts = []
    return done

  def discard(self) -> None:
    self._parts = []

  def pending(self, step: int) -> dict:
    """The unfinished interval's per-step metrics up to `step` (steps done), as JSON for the
    checkpoint at `step`: a run resumed there finishes the interval with them, so its log line
    is the uninterrupted run's (they were only in memory, and the line covered the steps since
    the resume). Values as Python numbers: float32 and int32 survive JSON exactly."""
    if not self._parts or sum(len(p["count"]) for p in self._parts) > MAX_CARRIED_STEPS:
      return {}  # (A huge log interval, e.g. set to log never: ~100 bytes a step, so none kept.)
    merged = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
    return {"step": step, "every": self.every,
            "metrics": {k: {"dtype": v.dtype.name, "values": v.tolist()} for k, v in merged.items()}}

  def resume(self, pending: dict | None, step: int) -> None:
    """Takes `pending(step)` back when resuming at `step`; dropped if the log interval changed
    (the config may change it on resume): the first line then covers the steps since `step`."""
    self._parts = []
    if pending and pending.get("step") == step and pending.get("every") == self.every:
      metrics = {k: np.asarray(v["values"], dtype=v["dtype"])
                 for k, v in pending["metrics"].items()}
      if 0 < len(next(iter(metrics.values()))) == step % self.every:
        self._parts = [metrics]


class LineRates:
  """The learning rate of each log line's last step, for the line (`rates(line_step)`).

  Computed ahead, a block of lines in one call: the first block before the loop starts, the next
  one after `BLOCK` lines. A value asked for at each line (`float(schedule(step))`) was queued
  behind the window just dispatched (a device runs its programs in order), so every window with
  a log line made the host wait for the next window to finish before it prepared and dispatched
  the one after: the device idled meanwhile, in every window, as if nothing were pipelined.
  Jitted: op by op its first call compiled for 0.75 s.
  """
  BLOCK = 4096  # Lines: the default config logs ~50 in a run.

  def __init__(self, schedule, every: int, last: int):
    self._schedule, self._every, self._last = schedule, every, last
    self._rates = jax.jit(jax.vmap(schedule))
    self._block, self._values = None, None
    self(min(every, last))

  def __call__(self, line_step: int) -> float:
    number = -(-line_step // self._every)  # Lines fall at multiples of `every` and at `last`.
    if min(number * self._every, self._last) != line_step:  # (Not expected: computed alone.)
      return float(self._schedule(line_step - 1))
    block, offset = divmod(number - 1, self.BLOCK)
    if block != self._block:
      numbers = np.arange(block * self.BLOCK + 1, (block + 1) * self.BLOCK + 1, dtype=np.int64)
      steps = np.minimum(numbers * self._every, self._last) - 1
      self._values = np.asarray(self._rates(steps.astype(np.int32)))
      self._block = block
    return float(self._values[offset])
