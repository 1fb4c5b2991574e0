"""The benchmark's train-speed measurements: the compiled step at one batch size, prepared once
and timed in as many passes as asked, and the real train loop beside its pure window."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

from fashion_jax.benchmarking import benchmark_report
from fashion_jax.benchmarking import flops
from fashion_jax.support import runtime


def time_calls(call, state, images_per_call: int, windows: int, window_seconds: float):
  """Back-to-back `state, out = call(state, i)`, at most two in flight; img/s per timed window."""
  import jax  # pylint: disable=g-import-not-at-top
  for i in range(3):  # Warm-up.
    state, out = call(state, i)
  jax.block_until_ready(out)
  t0, calls = time.perf_counter(), 0
  while time.perf_counter() - t0 < 0.3 or calls < 2:
    state, out = call(state, calls)
    jax.block_until_ready(out)
    calls += 1
  calls_per_window = max(2, int(window_seconds / ((time.perf_counter() - t0) / calls)))

  def window():
    nonlocal state
    start, outs = time.perf_counter(), []
    for i in range(calls_per_window):
      state, out = call(state, i)
      outs.append(out)
      if len(outs) > 2:  # As the train loop: the next call queued while one runs.
        jax.block_until_ready(outs.pop(0))
    jax.block_until_ready(outs)
    return calls_per_window * images_per_call / (time.perf_counter() - start)

  rates = benchmark_report.timed_windows(window, windows)  # Advances `state`: read it after.
  return state, rates


def training(config, parallel):
  """(train step, initial state on the devices) of the config: the train loop's own
  (steps.training), with the config's augmentation, label smoothing and EMA."""
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top
  training = steps.training(config, parallel.mode == "pmap")
  return training.train_step, parallel.put_state(training.init_state())


class TrainStep:
  """The compiled train step at one global batch size, its batches already on the device.

  Compiled once; `measure` times a pass of windows and can be called again (the benchmark's
  rounds alternate passes with Keras's), each pass continuing from the state the last one left.
  """

  def __init__(self, config, parallel, data, batch_size: int):
    from fashion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    parallel.check_batch(batch_size, "batch_size")
    step, self.state = training(config, parallel)
    self.batch_size = batch_size
    fn = parallel.compile(step)
    iterator = input_pipeline.train_batches(data, batch_size, config.seed, 0,
                                            parallel.process_index, parallel.process_count)
    self.batches = [parallel.put_batch(next(iterator)) for _ in range(8)]
    t0 = time.perf_counter()
    lowered = fn.lower(self.state, self.batches[0])
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    step_flops = flops.executed_step_flops(lowered, self.compiled, parallel)
    self.flops_per_image = step_flops / batch_size if step_flops else None
    self.passes = 0
    benchmark_report.log(f"jax  batch {batch_size:4d}: compiled in {self.compile_s:.2f}s")

  def measure(self, windows: int, window_seconds: float) -> list[float]:
    """One pass: img/s of each of `windows` timed windows."""
    batches = self.batches
    self.state, rates = time_calls(lambda s, i: self.compiled(s, batches[i % len(batches)]),
                                   self.state, self.batch_size, windows, window_seconds)
    self.passes += 1
    benchmark_report.log(f"jax  batch {self.batch_size:4d}: {statistics.median(rates):8,.0f} img/s "
                         f"(min {min(rates):,.0f}, max {max(rates):,.0f}; pass {self.passes})")
    return rates


def measure_loop(config, parallel, data, placement: str, pure_step_rate: float, windows: int,
                 window_seconds: float, steps_per_dispatch: int = -1) -> dict:
  """The real train loop end to end (train.train_and_evaluate), host work included.

  Beside it, the same compiled window run back to back on inputs already on the
  device ("pure window"): the loop's host work per step is the difference.
  Compilation, checkpoints and evaluation are outside the timed lines.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import metric_writers  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import loop  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import stops  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data_placement, config.steps_per_dispatch = placement, steps_per_dispatch
  # The window the config trains with; the timed run below keeps it.
  window = loop.window_length(config, config_lib.steps_per_epoch(config, len(data)),
                              config_lib.checkpoint_every_steps(config, len(data)),
                              config_lib.eval_every_steps(config, len(data)), jax.default_backend())
  step, state = training(config, parallel)
  windowed = loop.Windows(step, data, config, parallel, placement, 0)
  state, _, _ = windowed(state, 0, window)  # Compile.
  inputs = windowed.inputs(0, window)
  fn = windowed.function(window)[0]

  def pure_window():  # The machine is noisy: measured before and after the loop, averaged.
    nonlocal state
    state, rates = time_calls(lambda s, i: fn(s, *inputs), state, window * config.batch_size,
                              windows, window_seconds)
    return statistics.median(rates)

  before = pure_window()
  # The loop itself, with the config's own log interval: long enough for the timed windows.
  chunk = max(window, config.log_every_steps)
  steps = max(4 * chunk, int(windows * window_seconds * before / config.batch_size))
  steps = -(-steps // window) * window
  run_config = config.copy_and_resolve_references()
  # (No warm-up: a recipe's, 500 steps, is longer than this run, and warned about; the same work.)
  run_config.update(num_train_steps=steps, checkpoint_every_steps=steps, eval_every_steps=steps,
                    steps_per_dispatch=window, tensorboard_samples=0, progress_bar="off",
                    warmup_steps=0)
  workdir = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_loop_"))
  held = input_pipeline.Split(data.images[:run_config.eval_batch_size],
                              data.labels[:run_config.eval_batch_size])  # Eval is not timed here.
  try:
    # No background compile of the (untimed) evaluation during the timed windows.
    try:
      train.train_and_evaluate(run_config, workdir, splits=(data, held), compile_ahead=False)
    except stops.Preempted:  # Ctrl-C, which training holds while it runs: not a traceback that
      raise KeyboardInterrupt from None  # says to resume from a checkpoint in a removed folder.
    lines = [l for l in metric_writers.read_lines(workdir) if "train_loss" in l]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  # A line's rate is the average since the last pause, here the first (compiled) window: no
  # eval or checkpoint comes before the last step. So the last line's rate covers every step
  # after that window (the lines within it have no rate).
  loop_rate = lines[-1]["train_images_per_sec"]
  timed_steps = lines[-1]["step"] - window
  after = pure_window()
  del state
  pure = (before + after) / 2
  name = "classic" if steps_per_dispatch == 1 else placement
  result = {"name": name, "batch_size": config.batch_size, "placement": placement,
            "steps_per_dispatch": window,
            "steps_timed": timed_steps,
            "loop_images_per_sec": loop_rate, "pure_window_images_per_sec": pure,
            "pure_window_images_per_sec_before_after": [before, after],
            "loop_host_us_per_step": 1e6 * config.batch_size * (1 / loop_rate - 1 / pure),
            "vs_pure_step": loop_rate / pure_step_rate}
  benchmark_report.log(
      f"loop {name:7s} batch {config.batch_size:4d} ({window:4d} steps/dispatch): "
      f"{loop_rate:8,.0f} img/s; pure window {pure:,.0f} ({before:,.0f} before, {after:,.0f} "
      f"after); host {result['loop_host_us_per_step']:.1f} us/step; "
      f"{100 * result['vs_pure_step']:.1f}% of the pure step")
  return result
