r"""Throughput benchmark: train/eval images/s, compile time, input pipeline, FLOPs and MFU.

  python -m fashion_jax.benchmark --config=configs/default.py \
      [--config.KEY=VALUE ...] [--batch_sizes=32,128,512] [--compare=keras] [--rounds=3] \
      [--loop] [--profile] [--peak_gflops=GFLOPS] [--output=benchmark.json]

Train throughput is measured after warm-up and compilation, over several timed
windows (`block_until_ready` once at the end of each); the table shows the
median and the spread. `--compare=keras` trains the identical Keras model on
the same batches in the same process, each Keras pass between two jax passes,
so the ratio is honest on a noisy machine; `--rounds=N` repeats the alternation
(rates: the median of the passes; each round's figures reported too).
`--profile` times the step op by op at the best batch size (jax.profiler): each op's
share of the step and each native kernel's GFLOP/s and share of the peak.
Progress goes to stderr as it runs; the table to stdout; everything to the
JSON file (`--output=-`: the JSON to stdout, the table then to stderr).

Exit status: 0 measured, printed and written; 2 a problem with the input (a flag,
the config, the data, --output; found before anything is measured, or --output
failing at the end, after the table is printed): the one-line message says what
to fix; 130 Ctrl-C (one line; --output is left as it was); 1 a crash (traceback).
--help: the flags, exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import flags

from fashion_jax.benchmarking import benchmark_report
from fashion_jax.benchmarking import checks
from fashion_jax.benchmarking import flops
from fashion_jax.benchmarking import step_profile
from fashion_jax.benchmarking import train_rates
from fashion_jax import cli
from fashion_jax.support import runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the CLI flags; called by the `python -m fashion_jax.benchmark` entry point."""
  cli.define_config_flag("configs/default.py", "Config file.")
  flags.DEFINE_string("batch_sizes", "", "Comma-separated global batch sizes to sweep "
                      "(default: the config's batch_size).")
  flags.DEFINE_enum("compare", "", ["", "keras"], "Also train the identical Keras model "
                    "(of the classic CNN, config.model=cnn).")
  flags.DEFINE_integer("windows", 5, "Timed windows per pass (per measurement).")
  flags.DEFINE_integer("rounds", 1, "Passes over the batch sizes: jax, then Keras with "
                       "--compare, this many times (then jax once more with --compare): each "
                       "rate is the median of its passes and each round's ratio and FLOP share "
                       "are reported. 3 or more on shared or virtual machines, whose speed "
                       "drifts.")
  flags.DEFINE_float("window_seconds", 2.0, "Approximate length of one timed window.")
  flags.DEFINE_float("peak_gflops", 0.0, "Peak FLOP/s of one device (on CPU: of all the "
                     "process's cores, however many CPU devices) in GFLOP/s for MFU "
                     "(0 = a GPU's or TPU's from a table of models; a CPU's measured with "
                     "multiply-add chains on every core, its nominal clock-based estimate "
                     "without the native kernels).")
  flags.DEFINE_string("output", "benchmark.json", "Where to write the JSON results (a file; "
                      "gs://bucket/path too; - for stdout, the table then on stderr).")
  flags.DEFINE_bool("compile_cache", True, "Measure the second compile with the persistent cache.")
  flags.DEFINE_bool("loop", False, "Also time the real train loop end to end at each batch size, "
                    "for each of --loop_variants.")
  flags.DEFINE_bool("profile", False, "Also profile the train step at the best batch size: each "
                    "op's time a step (jax.profiler), its share of the step, and each native "
                    "kernel's GFLOP/s and share of the peak.")
  flags.DEFINE_integer("profile_steps", 50, "Steps run under the profiler with --profile.")
  flags.DEFINE_list("loop_variants", ["classic", "host", "device"],
                    "Loops to time: classic (a host batch per dispatch, the loop before windows), "
                    "host (host batches, windows of steps), device (data on the device, windows).")


def alternate(train_steps, kerases, rounds: int, windows: int, window_seconds: float):
  """Passes of timed windows: jax at every batch size, then Keras's (if any), `rounds` times,
  then jax once more when Keras ran, so that each Keras pass lies between two jax passes.
  Returns the window rates [batch size][pass] of each side."""
  jax_passes, keras_passes = [[] for _ in train_steps], [[] for _ in kerases]
  for round_index in range(rounds):
    if rounds > 1:
      benchmark_report.log(f"round {round_index + 1} of {rounds}")
    for passes, step in zip(jax_passes, train_steps):
      passes.append(step.measure(windows, window_seconds))
    for passes, keras_train in zip(keras_passes, kerases):
      passes.append(keras_train.measure(windows))
  if kerases:
    benchmark_report.log("re-measuring jax after keras (same run, to bound drift)")
    for passes, step in zip(jax_passes, train_steps):
      passes.append(step.measure(windows, window_seconds))
  return jax_passes, keras_passes


# --loop's variants: (where the batches live, steps per dispatch; -1: the whole window).
LOOP_VARIANTS = {"classic": ("host", 1), "host": ("host", -1), "device": ("device", -1)}


def round_figures(sweep, keras_sweep, rounds: int, peak_flops: float) -> list[dict]:
  """Each round's headline figures: best jax batch (the mean of the passes before and after that
  round's Keras pass, when Keras ran), its executed FLOP share, and best against best."""
  found = []
  for r in range(rounds):
    rates = [statistics.mean(s["train_images_per_sec"]["passes"][r:r + 2]) if keras_sweep
             else s["train_images_per_sec"]["passes"][r] for s in sweep]
    best = max(range(len(sweep)), key=rates.__getitem__)
    executed = sweep[best]["flops_per_image_xla"]
    entry = {"train_images_per_sec": rates[best], "best_batch_size": sweep[best]["batch_size"],
             "hfu": rates[best] * executed / peak_flops if executed and peak_flops else None}
    if keras_sweep:
      keras_best = max(k["train_images_per_sec"]["passes"][r] for k in keras_sweep)
      entry.update(keras_train_images_per_sec=keras_best,
                   speedup_vs_keras=rates[best] / keras_best)
    found.append(entry)
  return found


def measure_compile_cache(config, parallel, data) -> dict:
  """First and second compile of the train step with JAX's persistent compilation cache.

  The cache is a fresh private folder, removed afterwards. JAX opens its cache once per process, at
  the first compile, so it is reset on the way in and out: otherwise a cache the user configured
  (JAX_COMPILATION_CACHE_DIR) would serve the "first" compile and receive the entries.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  cache_dir = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_cache_"))
  previous = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    step, state = train_rates.training(config, parallel)
    batch = parallel.put_batch({"image": data.images[:config.batch_size],
                                "label": data.labels[:config.batch_size]})
    times = []
    for _ in range(2):
      jax.clear_caches()
      fn = parallel.compile(step)
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

  _, state = train_rates.training(config, parallel)  # With the EMA the evaluation reads, if any.
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
  t0 = time.perf_counter()
  try:
    if source not in ("idx", "tfds"):  # The verified download, fetched if missing (offline:
      where = input_pipeline.Source(  # fails in seconds; no home folder: a UserError).
          "download", download.default_folder(config.dataset, config.data_dir), "benchmark")
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
  if broken := input_pipeline.tfds_import_error():
    return f"tensorflow-datasets cannot be imported here: {broken}"
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
  import math  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib
  from fashion_jax.data import input_pipeline
  from fashion_jax.support import backends  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  checks.flags(FLAGS, LOOP_VARIANTS)
  batch_sizes = checks.parse_batch_sizes(FLAGS.batch_sizes, config.batch_size)
  checks.compare(config, FLAGS.compare)
  if cluster := checks.one_process(config):
    benchmark_report.log(f"a {cluster} launch: the benchmark times this process alone")
  backends.request(config.backend, config.deterministic)  # As training runs it (main.py).
  backends.check(config.backend)
  parallel = parallel_lib.Parallel(config.parallelism)
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top
  steps.check_native_placement(config, parallel)  # Before the sweep would time N x the work.
  env = benchmark_report.environment(parallel)
  benchmark_report.log(f"{env['device_kind']} x{env['num_devices']} ({env['backend']}), jax {env['jax']}, "
      f"{parallel.mode}; conv_impl={config.conv_impl} pool_impl={config.pool_impl}; "
      f"batch sizes {batch_sizes}")
  if env["backend"] == "cpu":
    benchmark_report.log(f"CPU: {benchmark_report.cpu_line(env)}")
  data_source = input_pipeline.source(config)
  try:
    if data_source.kind == "tfds" and (reason := tfds_unprepared_reason(config)):
      raise UserError(reason)
    train_data = input_pipeline.load(config, "train", data_source)
    test_data = input_pipeline.load(config, "test", data_source)
    data_note = data_source.describe()
  except UserError as e:
    if data_source.kind == "idx" or config.data_dir:  # Named by the user: not timed on noise.
      raise
    benchmark_report.log(f"no real data ({e}); timing on random images (throughput does not depend on content)")
    rng = np.random.default_rng(0)
    train_data = input_pipeline.Split(rng.integers(0, 256, (60_000, 28, 28, 1), np.uint8),
                                      rng.integers(0, 10, 60_000).astype(np.int32))
    test_data = input_pipeline.Split(train_data.images[:10_000], train_data.labels[:10_000])
    data_note = "random"

  checks.batches_fit(batch_sizes, parallel, len(train_data), bool(FLAGS.batch_sizes.strip()))
  # The config's own sizes (compile-cache, input and eval measures; --batch_sizes sets the sweep's
  # alone): checked now, not after minutes of sweep (an error then, or a traceback, no JSON).
  parallel.check_batch(config.batch_size, "batch_size")
  parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  if config.batch_size > len(train_data):  # (The benchmark holds out no validation split.)
    raise UserError(f"config.batch_size={config.batch_size} is larger than the "
                    f"{len(train_data)} training examples; lower it")
  # The CPU's peak: sampled now and again after the sweep, the best of both.
  early_peak = (flops.sample_cpu_peak() if parallel.devices[0].platform == "cpu"
                and not FLAGS.peak_gflops else [])
  train_steps = [train_rates.TrainStep(config, parallel, train_data, b) for b in batch_sizes]
  kerases = ([benchmark_report.KerasTrain(train_data, b, FLAGS.window_seconds)
              for b in batch_sizes] if FLAGS.compare == "keras" else [])
  jax_passes, keras_passes = alternate(train_steps, kerases, FLAGS.rounds, FLAGS.windows,
                                       FLAGS.window_seconds)
  sweep = [{"batch_size": s.batch_size,
            "train_images_per_sec": benchmark_report.summarize_passes(passes),
            "compile_s": s.compile_s, "flops_per_image_xla": s.flops_per_image}
           for s, passes in zip(train_steps, jax_passes)]
  keras_sweep = [{"batch_size": k.batch_size,
                  "train_images_per_sec": benchmark_report.summarize_passes(passes),
                  "keras_version": k.version, "backend": k.backend}
                 for k, passes in zip(kerases, keras_passes)]
  best_index = max(range(len(sweep)), key=lambda i: sweep[i]["train_images_per_sec"]["median"])
  peak, peak_source = flops.device_peak_gflops(parallel.devices[0], config.compute_dtype,
                                               FLAGS.peak_gflops, early_peak)
  # All the devices' peak in FLOP/s; None for a device kind with no known peak (JSON has no NaN).
  peak_flops = peak * 1e9 * flops.peak_units(parallel) if math.isfinite(peak) else None
  profiled = (step_profile.profile(train_steps[best_index], FLAGS.profile_steps,
                                   (peak_flops or 0) / 1e9) if FLAGS.profile else None)
  del train_steps, kerases  # Their states and batches; the loop and eval below make their own.
  loops = []
  for r in sweep if FLAGS.loop else []:
    sized = config.copy_and_resolve_references()
    sized.batch_size = r["batch_size"]
    for variant in FLAGS.loop_variants:
      placement, per_dispatch = LOOP_VARIANTS[variant]
      loops.append(train_rates.measure_loop(
          sized, parallel, train_data, placement, r["train_images_per_sec"]["median"],
          FLAGS.windows, FLAGS.window_seconds, per_dispatch))
  cache = measure_compile_cache(config, parallel, train_data) if FLAGS.compile_cache else {}
  evaluation = measure_eval(config, parallel, test_data)
  inputs = {kind: measure_input(config, parallel, kind) for kind in ("idx", "tfds", "download")}

  best = sweep[best_index]
  best_rate = best["train_images_per_sec"]["median"]
  executed_flops = best["flops_per_image_xla"]
  flops_per_image = (flops.model_flops_per_image(config, best["batch_size"])
                     or flops.analytic_flops_per_image(config.model))  # None: not counted.
  achieved = best_rate * flops_per_image if flops_per_image else None
  mfu = achieved / peak_flops if achieved and peak_flops else None
  hfu = best_rate * executed_flops / peak_flops if executed_flops and peak_flops else None
  results = {
      # The whole config and the flags: a bfloat16 run's JSON had read as a float32 one's (only
      # the model, its impls and batch size were kept), and the windows timed were not said.
      "config": {**json.loads(config.to_json_best_effort()), "data": data_note},
      "flags": {name: FLAGS[name].value for name in (
          "batch_sizes", "windows", "window_seconds", "rounds", "compare", "loop", "loop_variants",
          "profile", "profile_steps", "compile_cache", "peak_gflops")},
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
      "achieved_gflops": achieved / 1e9 if achieved else None,
      "peak_gflops": peak_flops / 1e9 if peak_flops else None,  # All the devices'.
      "peak_gflops_per_device": peak if peak_flops else None, "peak_source": peak_source,
      "mfu": mfu,
      "hfu": hfu,
      "rounds": FLAGS.rounds,
      "per_round": round_figures(sweep, keras_sweep, FLAGS.rounds, peak_flops),
  }
  if profiled is not None:
    results["profile"] = profiled
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
  cli.refuse_arguments(argv)
  from fashion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import storage  # pylint: disable=g-import-not-at-top
  from fashion_jax.support.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    # Before JAX's import (quiet_console's): a mistyped flag or value said at once, not seconds on.
    config_lib.validate(FLAGS.config, warn=False, model=False)
    checks.flags(FLAGS, LOOP_VARIANTS)
    checks.parse_batch_sizes(FLAGS.batch_sizes, FLAGS.config.batch_size)
    output = checks.output(FLAGS.output)
    cli.quiet_console()  # --loop runs the real loop.
    results = run(FLAGS.config)
  except UserError as e:
    cli.fail(str(e))
  env = results["environment"]
  table = sys.stderr if output == checks.STDOUT else sys.stdout  # `--output=- | jq`: JSON alone.
  if env["backend"] == "cpu":  # The table is only comparable with the CPU and kernels named.
    print(benchmark_report.cpu_line(env), file=table)
  print(benchmark_report.format_table(results), file=table)
  if "profile" in results:
    print(step_profile.format_profile(results["profile"]), file=table)
  text = json.dumps(results, indent=2, allow_nan=False) + "\n"
  if output == checks.STDOUT:
    sys.stdout.write(text)
    return
  try:
    storage.write_text(output, text, checks.OUTPUT_FULL_FIX)
  except UserError as e:
    cli.fail(str(e))
  except OSError as e:  # Gone or made unwritable during the run, a cloud upload that failed.
    cli.fail(f"cannot write --output {output} ({e.strerror or e}); "
             f"{checks.OUTPUT_FIX}")
  benchmark_report.log(f"wrote {output}")

