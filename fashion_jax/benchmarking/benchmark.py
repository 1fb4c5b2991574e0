r"""Throughput benchmark: train/eval images/s, compile time, input pipeline, FLOPs and MFU.

  python -m fashion_jax.benchmark --config=configs/default.py \
      [--config.KEY=VALUE ...] [--batch_sizes=32,128,512] [--compare=keras] \
      [--output=benchmark.json]

Train throughput is measured after warm-up and compilation, over several timed
windows (`block_until_ready` once at the end of each); the table shows the
median and the spread. `--compare=keras` trains the identical Keras model on
the same batches in the same process, so the ratio is honest on a noisy
machine. Progress goes to stderr as it runs; the table to stdout; everything
to the JSON file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from fashion_jax.benchmarking import benchmark_report
from fashion_jax.benchmarking import flops
from fashion_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the CLI flags; called by the `python -m fashion_jax.benchmark` entry point."""
  config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.", lock_config=True)
  flags.DEFINE_string("batch_sizes", "", "Comma-separated global batch sizes to sweep "
                      "(default: the config's batch_size).")
  flags.DEFINE_enum("compare", "", ["", "keras"], "Also train the identical Keras model.")
  flags.DEFINE_integer("windows", 5, "Timed windows per measurement.")
  flags.DEFINE_float("window_seconds", 2.0, "Approximate length of one timed window.")
  flags.DEFINE_float("peak_gflops", 0.0, "Peak FLOP/s of one device in GFLOP/s for MFU "
                     "(0 = look up the device, or estimate a CPU from its cores and clock).")
  flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON results.")
  flags.DEFINE_bool("compile_cache", True, "Measure the second compile with the persistent cache.")
  flags.DEFINE_bool("loop", False, "Also time the real train loop end to end at each batch size, "
                    "for each of --loop_variants.")
  flags.DEFINE_list("loop_variants", ["classic", "host", "device"],
                    "Loops to time: classic (a host batch per dispatch, the loop before windows), "
                    "host (host batches, windows of steps), device (data on the device, windows).")


def measure_jax_train(config, parallel, data, batch_size: int) -> dict:
  """Images/s of the compiled train step at one global batch size, batches already on device."""
  from fashion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import steps
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  parallel.check_batch(batch_size, "batch_size")
  model = steps.create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  tx = steps.create_optimizer(config)
  state = parallel.put_state(steps.create_train_state(model, tx, config.seed))
  fn = parallel.compile(functools.partial(steps.train_step, model=model, tx=tx))
  iterator = input_pipeline.train_batches(data, batch_size, config.seed, 0,
                                          parallel.process_index, parallel.process_count)
  batches = [parallel.put_batch(next(iterator)) for _ in range(8)]
  t0 = time.perf_counter()
  lowered = fn.lower(state, batches[0])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  step_flops = flops.executed_step_flops(lowered, compiled, parallel)
  flops_per_image = step_flops / batch_size if step_flops else None
  state, rates = _time_calls(lambda s, i: compiled(s, batches[i % len(batches)]), state,
                             batch_size)
  result = {"batch_size": batch_size, "train_images_per_sec": benchmark_report.summarize(rates),
            "compile_s": compile_s, "flops_per_image_xla": flops_per_image}
  benchmark_report.log(f"jax  batch {batch_size:4d}: {statistics.median(rates):8,.0f} img/s "
      f"(min {min(rates):,.0f}, max {max(rates):,.0f}); compile {compile_s:.2f}s")
  return result


def _time_calls(call, state, images_per_call: int):
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
  calls_per_window = max(2, int(FLAGS.window_seconds / ((time.perf_counter() - t0) / calls)))

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

  rates = benchmark_report.timed_windows(window, FLAGS.windows)  # Advances `state`: read it after.
  return state, rates


def measure_loop(config, parallel, data, placement: str, pure_step_rate: float,
                 steps_per_dispatch: int = -1) -> dict:
  """The real train loop end to end (train.train_and_evaluate), host work included.

  Beside it, the same compiled window run back to back on inputs already on the
  device ("pure window"): the loop's host work per step is the difference.
  Compilation, checkpoints and evaluation are outside the timed lines.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import input_pipeline
  from fashion_jax.model import steps
  from fashion_jax.support import metric_writers  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import loop
  from fashion_jax.training import train
  config = config.copy_and_resolve_references()
  config.data_placement, config.steps_per_dispatch = placement, steps_per_dispatch
  # The window the config trains with; the timed run below keeps it.
  window = loop.window_length(config, config_lib.steps_per_epoch(config, len(data)),
                              config_lib.checkpoint_every_steps(config, len(data)),
                              config_lib.eval_every_steps(config, len(data)), jax.default_backend())
  model = steps.create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  tx = steps.create_optimizer(config)
  state = parallel.put_state(steps.create_train_state(model, tx, config.seed))
  windows = loop.Windows(functools.partial(steps.train_step, model=model, tx=tx), data, config,
                         parallel, placement, 0)
  state, _, _ = windows(state, 0, window)  # Compile.
  inputs = windows.inputs(0, window)
  fn = windows.function(window)[0]

  def pure_window():  # The machine is noisy: measured before and after the loop, averaged.
    nonlocal state
    state, rates = _time_calls(lambda s, i: fn(s, *inputs), state, window * config.batch_size)
    return statistics.median(rates)

  before = pure_window()
  # The loop itself, with the config's own log interval: long enough for the timed windows.
  chunk = max(window, config.log_every_steps)
  steps = max(4 * chunk, int(FLAGS.windows * FLAGS.window_seconds * before / config.batch_size))
  steps = -(-steps // window) * window
  run_config = config.copy_and_resolve_references()
  run_config.update(num_train_steps=steps, checkpoint_every_steps=steps, eval_every_steps=steps,
                    steps_per_dispatch=window, tensorboard_samples=0, progress_bar="off")
  workdir = tempfile.mkdtemp(prefix="fashion_jax_loop_")
  held = input_pipeline.Split(data.images[:run_config.eval_batch_size],
                              data.labels[:run_config.eval_batch_size])  # Eval is not timed here.
  try:
    # No background compile of the (untimed) evaluation during the timed windows.
    train.train_and_evaluate(run_config, workdir, splits=(data, held), compile_eval_ahead=False)
    lines = [l for l in metric_writers.read_lines(workdir) if "train_loss" in l]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  # Each line's rate covers the steps since the line before (compile windows have none).
  timed = [(now["step"] - before_line["step"], now["train_images_per_sec"])
           for before_line, now in zip(lines, lines[1:]) if "train_images_per_sec" in now]
  seconds = sum(n * config.batch_size / rate for n, rate in timed)
  timed_steps = sum(n for n, _ in timed)
  loop_rate = timed_steps * config.batch_size / seconds
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
  benchmark_report.log(f"loop {name:7s} batch {config.batch_size:4d} ({window:4d} steps/dispatch): {loop_rate:8,.0f} img/s; pure window "
      f"{pure:,.0f} ({before:,.0f} before, {after:,.0f} after); host {result['loop_host_us_per_step']:.1f} us/step; "
      f"{100 * result['vs_pure_step']:.1f}% of the pure step")
  return result


def measure_compile_cache(config, parallel, data) -> dict:
  """First and second compile of the train step with JAX's persistent compilation cache.

  The cache is a fresh private folder, removed afterwards. JAX opens its cache once per process, at
  the first compile, so it is reset on the way in and out: otherwise a cache the user configured
  (JAX_COMPILATION_CACHE_DIR) would serve the "first" compile and receive the entries.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top

  cache_dir = tempfile.mkdtemp(prefix="fashion_jax_cache_")
  previous = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    model, tx = steps.create_model(config), steps.create_optimizer(config)
    state = parallel.put_state(steps.create_train_state(model, tx, config.seed))
    batch = parallel.put_batch({"image": data.images[:config.batch_size],
                                "label": data.labels[:config.batch_size]})
    times = []
    for _ in range(2):
      jax.clear_caches()
      fn = parallel.compile(functools.partial(steps.train_step, model=model, tx=tx))
      t0 = time.perf_counter()
      fn.lower(state, batch).compile()
      times.append(time.perf_counter() - t0)
    entries = len(os.listdir(cache_dir))
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
    shutil.rmtree(cache_dir, ignore_errors=True)
  benchmark_report.log(f"compile with persistent cache: first {times[0]:.2f}s, second {times[1]:.2f}s")
  return {"compile_first_s": times[0], "compile_cached_s": times[1], "compile_cache_entries": entries}


def measure_eval(config, parallel, test_split) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top
  from fashion_jax.training import train

  model, tx = steps.create_model(config), steps.create_optimizer(config)
  state = parallel.put_state(steps.create_train_state(model, tx, config.seed))
  evaluator = train.Evaluator(test_split, config, steps.create_model(config, training=False),
                              parallel)
  jax.block_until_ready(evaluator(state))  # Compile + warm-up.
  times = []
  for _ in range(max(2, FLAGS.windows // 2)):
    t0 = time.perf_counter()
    jax.block_until_ready(evaluator(state))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  benchmark_report.log(f"eval: {len(test_split):,} images in {seconds:.3f}s "
      f"({len(test_split) / seconds:,.0f} img/s, batch {config.eval_batch_size})")
  return {"eval_images_per_sec": len(test_split) / seconds, "eval_seconds": seconds,
          "eval_examples": len(test_split), "eval_batch_size": config.eval_batch_size}


def measure_input(config, parallel, source: str) -> dict:
  """Load time and batching+transfer throughput of one data source on its own."""
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import download, input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  if source == "idx":
    where = input_pipeline.source(config)
    if where.kind != "idx":
      return {"available": False,
              "reason": f"no --config.idx_dir (or ${input_pipeline.IDX_ENV}) given"}
  elif source == "tfds":
    reason = tfds_unprepared_reason(config)
    if reason:
      benchmark_report.log(f"input (tfds): unavailable: {reason}")
      return {"available": False, "reason": reason}
    where = input_pipeline.Source("tfds", config.data_dir, "benchmark")
  else:  # The verified download (fetched if missing: offline this fails within seconds).
    where = input_pipeline.Source(
        "download", download.default_folder(config.dataset, config.data_dir), "benchmark")
  t0 = time.perf_counter()
  try:
    split = input_pipeline.load(config, "train", where)
  except UserError as e:
    benchmark_report.log(f"input ({source}): unavailable: {e}")
    return {"available": False, "reason": str(e)}
  load_s = time.perf_counter() - t0
  iterator = input_pipeline.train_batches(split, config.batch_size, config.seed, 0,
                                          parallel.process_index, parallel.process_count)
  steps = max(1, 20_000 // config.batch_size)
  t0 = time.perf_counter()
  last = None
  for _ in range(steps):
    last = parallel.put_batch(next(iterator))
  jax.block_until_ready(last)
  rate = steps * config.batch_size / (time.perf_counter() - t0)
  benchmark_report.log(f"input ({source}): load {load_s:.2f}s, batches {rate:,.0f} img/s")
  return {"available": True, "load_s": load_s, "images_per_sec": rate, "examples": len(split)}


def tfds_unprepared_reason(config) -> str | None:
  """Why the tfds source cannot be timed without downloading (None: it can)."""
  from fashion_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  if not input_pipeline.tensorflow_available():
    return "TensorFlow is not installed (tfds needs it to read this data set)"
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
    if builder.is_prepared():
      return None
    return (f"{config.dataset!r} is not prepared in {builder.data_dir}; the benchmark does not "
            "download (run training once with network access to prepare it)")
  except Exception as e:  # pylint: disable=broad-except
    return f"tfds cannot open {config.dataset!r}: {type(e).__name__}: {e}"


def run(config) -> dict:
  """Runs every measurement; returns the results dict (also written to --output)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib
  from fashion_jax.data import input_pipeline
  from fashion_jax.support import backends  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  if FLAGS.compare == "keras":
    missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
    if missing:
      raise UserError(f"--compare=keras trains the Keras model on TensorFlow, and {' and '.join(missing)} "
                      "is not installed here; pip install 'fashion_jax[tf]' (or leave out --compare)")
  backends.request(config.backend)
  backends.check(config.backend)
  parallel = parallel_lib.Parallel(config.parallelism)
  batch_sizes = ([int(b) for b in FLAGS.batch_sizes.split(",") if b.strip()]
                 if FLAGS.batch_sizes else [config.batch_size])
  env = benchmark_report.environment(parallel)
  benchmark_report.log(f"{env['device_kind']} x{env['num_devices']} ({env['backend']}), jax {env['jax']}, "
      f"{parallel.mode}; conv_impl={config.conv_impl} pool_impl={config.pool_impl}; "
      f"batch sizes {batch_sizes}")
  if env["backend"] == "cpu":
    benchmark_report.log(f"CPU: {env['cpu']} ({env['cpu_count']} cores; {env['cpu_isa']}); "
                         f"native kernels: {env['native_kernels']}")
  data_source = input_pipeline.source(config)
  try:
    if data_source.kind == "tfds" and (reason := tfds_unprepared_reason(config)):
      raise UserError(reason)
    train_data = input_pipeline.load(config, "train", data_source)
    test_data = input_pipeline.load(config, "test", data_source)
    data_note = data_source.describe()
  except UserError as e:
    benchmark_report.log(f"no real data ({e}); timing on random images (throughput does not depend on content)")
    rng = np.random.default_rng(0)
    train_data = input_pipeline.Split(rng.integers(0, 256, (60_000, 28, 28, 1), np.uint8),
                                      rng.integers(0, 10, 60_000).astype(np.int32))
    test_data = input_pipeline.Split(train_data.images[:10_000], train_data.labels[:10_000])
    data_note = "random"

  sweep = [measure_jax_train(config, parallel, train_data, b) for b in batch_sizes]
  keras_sweep = []
  if FLAGS.compare == "keras":
    keras_sweep = [benchmark_report.measure_keras(train_data, b, FLAGS.windows, FLAGS.window_seconds) for b in batch_sizes]
    benchmark_report.log("re-measuring jax after keras (same run, to bound drift)")
    again = [measure_jax_train(config, parallel, train_data, b) for b in batch_sizes]
    for first, second in zip(sweep, again):
      rates = [first["train_images_per_sec"]["median"], second["train_images_per_sec"]["median"]]
      first["train_images_per_sec_after_keras"] = second["train_images_per_sec"]
      first["train_images_per_sec"]["median_of_both"] = statistics.mean(rates)
  loops = []
  variants = {"classic": ("host", 1), "host": ("host", -1), "device": ("device", -1)}
  for r in sweep if FLAGS.loop else []:
    sized = config.copy_and_resolve_references()
    sized.batch_size = r["batch_size"]
    for variant in FLAGS.loop_variants:
      if variant not in variants:
        raise UserError(f"--loop_variants={variant!r} is unknown; use {', '.join(variants)}")
      placement, per_dispatch = variants[variant]
      loops.append(measure_loop(sized, parallel, train_data, placement,
                                r["train_images_per_sec"]["median"], per_dispatch))
  cache = measure_compile_cache(config, parallel, train_data) if FLAGS.compile_cache else {}
  evaluation = measure_eval(config, parallel, test_data)
  inputs = {kind: measure_input(config, parallel, kind) for kind in ("idx", "tfds", "download")}

  best = max(sweep, key=lambda r: r["train_images_per_sec"]["median"])
  best_rate = best["train_images_per_sec"]["median"]
  executed_flops = best["flops_per_image_xla"]
  flops_per_image = (flops.model_flops_per_image(config, best["batch_size"])
                     or flops.analytic_flops_per_image(config.model))
  peak, peak_source = flops.device_peak_gflops(parallel.devices[0], config.compute_dtype,
                                                     FLAGS.peak_gflops)
  achieved = best_rate * flops_per_image
  mfu = achieved / (peak * 1e9 * flops.peak_units(parallel))
  hfu = (best_rate * executed_flops / (peak * 1e9 * flops.peak_units(parallel))
         if executed_flops else None)
  results = {
      "config": {"model": config.model, "conv_impl": config.conv_impl,
                 "pool_impl": config.pool_impl, "batch_size": config.batch_size,
                 "data": data_note},
      "environment": env,
      "sweep": sweep,
      "best_batch_size": best["batch_size"],
      "train_images_per_sec": best_rate,
      "compile_s": best["compile_s"],
      **cache,
      **evaluation,
      "input": inputs,
      "input_images_per_sec": next((i["images_per_sec"] for i in inputs.values() if i["available"]),
                                   None),
      "flops_per_image": flops_per_image,
      "flops_per_image_analytic": flops.analytic_flops_per_image(config.model),
      "flops_per_image_executed": executed_flops,
      "achieved_gflops": achieved / 1e9,
      "peak_gflops_per_device": peak, "peak_source": peak_source,
      "mfu": mfu,
      "hfu": hfu,
  }
  if loops:
    results["loop"] = loops
    for r in loops:
      if r["batch_size"] == best["batch_size"] or len(sweep) == 1:  # Headline: the best batch.
        results[f"loop_images_per_sec_{r['name']}"] = r["loop_images_per_sec"]
        results[f"loop_host_us_per_step_{r['name']}"] = r["loop_host_us_per_step"]
  if keras_sweep:
    keras_best = max(keras_sweep, key=lambda r: r["train_images_per_sec"]["median"])
    results["keras_sweep"] = keras_sweep
    results["keras_best_batch_size"] = keras_best["batch_size"]
    results["keras_train_images_per_sec"] = keras_best["train_images_per_sec"]["median"]
    results["speedup_vs_keras"] = best_rate / results["keras_train_images_per_sec"]
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(cli.QuietLibraries())  # --loop runs the real loop.
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    results = run(FLAGS.config)
  except UserError as e:
    print(f"fashion_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  env = results["environment"]
  if env["backend"] == "cpu":  # The table is only comparable with the CPU and kernels named.
    print(f"{env['cpu']} ({env['cpu_count']} cores; {env['cpu_isa']}); "
          f"native kernels: {env['native_kernels']}")
  print(benchmark_report.format_table(results))
  with open(FLAGS.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  benchmark_report.log(f"wrote {FLAGS.output}")

