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
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

import fashion_jax
from fashion_jax import cli
from fashion_jax import runtime

FLAGS = flags.FLAGS
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

# Dense peak TFLOP/s per device (one chip or GPU): (float32, bfloat16). TPUs run float32 matmuls
# through their bf16 units (JAX's default precision), so both columns are the bf16 peak there;
# GPUs: float32 = the CUDA-core FP32 peak, bfloat16 = the dense tensor-core peak.
PEAK_TFLOPS = {
    "TPU v2": (22.5, 22.5), "TPU v3": (61.5, 61.5), "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0), "TPU v5p": (459.0, 459.0),
    "TPU v5": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0), "TPU v6e": (918.0, 918.0),
    "Tesla T4": (8.1, 65.0), "Tesla V100": (15.7, 125.0), "A100": (19.5, 312.0),
    "L4": (30.3, 121.0), "A10G": (31.2, 125.0), "H100": (67.0, 989.0), "H200": (67.0, 989.0),
    "L40S": (91.6, 362.0),
}


def log(message: str) -> None:
  print(f"[benchmark {fashion_jax.seconds_since_start():6.1f}s] {message}", file=sys.stderr,
        flush=True)


def cpu_peak_gflops() -> tuple[float, str]:
  """Cores x clock x 32 fp32 FLOP/cycle (AVX2: 2 FMA units x 8 lanes x 2), or x64 with AVX-512."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  mhz, flags_line = 0.0, ""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
    mhz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info))
    flags_line = re.search(r"flags\s*:(.*)", info).group(1)
  except (OSError, ValueError, AttributeError):
    pass
  if not mhz:
    mhz = 2500.0
  per_cycle = 64 if " avx512f" in flags_line else 32 if " fma" in flags_line else 16
  return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle"


def device_peak_gflops(device, dtype: str = "float32") -> tuple[float, str]:
  if FLAGS.peak_gflops > 0:
    return FLAGS.peak_gflops, "--peak_gflops"
  if device.platform == "cpu":
    return cpu_peak_gflops()
  kind = device.device_kind
  for name, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      column = 1 if dtype == "bfloat16" else 0
      return tflops[column] * 1000, f"table entry {name!r}, {dtype}"
  return float("nan"), f"unknown device kind {kind!r}: pass --peak_gflops"


def _peak_units(parallel) -> int:
  """How many times the per-device peak the run can use.

  CPU devices in one process share the host's cores (the CPU peak already
  counts all of them), so on CPU that is one host's peak per process.
  """
  if parallel.devices[0].platform == "cpu":
    return len({d.process_index for d in parallel.devices})
  return parallel.num_devices


def analytic_flops_per_image(model_name: str) -> float:
  """Training FLOPs per image of the classic CNN counted by hand (fallback for cost analysis).

  Forward: multiply-adds x 2 of each layer; backward ~2x forward.
  """
  if model_name != "cnn":
    return float("nan")
  forward = 2 * (26 * 26 * 32 * 9 * 1 + 11 * 11 * 64 * 9 * 32 + 1600 * 128 + 128 * 10)
  return 3.0 * forward


def _cost_flops(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis, or None where the backend has none."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # Not every backend implements cost analysis.
    return None


def model_flops_per_image(config, batch_size: int) -> float | None:
  """Training FLOPs per image of the model's math, whatever formulation runs.

  MFU counts the model's FLOPs (as in the PaLM paper's definition), so it is
  XLA's cost analysis of the train step written with the reference ops (XLA's
  own convolution and pooling), compiled on one device but never run. A faster
  formulation that needs fewer FLOPs for the same math (Winograd) then shows up
  as a higher MFU, while `hfu` reports the FLOPs the hardware actually executed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fashion_jax import train  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.conv_impl, config.pool_impl = "xla", "xla"
  model, tx = train.create_model(config), train.create_optimizer(config)
  state = train.create_train_state(model, tx, config.seed)
  batch = {"image": jnp.zeros((batch_size,) + train.IMAGE_SHAPE, jnp.uint8),
           "label": jnp.zeros((batch_size,), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  flops = _cost_flops(step.lower(state, batch).compile())
  return flops / batch_size if flops else None


def timed_windows(run_window, windows: int) -> list[float]:
  return [run_window() for _ in range(windows)]


def summarize(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "windows": len(values)}


def measure_jax_train(config, parallel, data, batch_size: int) -> dict:
  """Images/s of the compiled train step at one global batch size, batches already on device."""
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import input_pipeline, train  # pylint: disable=g-import-not-at-top
  from fashion_jax import parallel as parallel_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  parallel.check_batch(batch_size, "batch_size")
  model = train.create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  tx = train.create_optimizer(config)
  state = parallel.put_state(train.create_train_state(model, tx, config.seed))
  fn = parallel.compile(functools.partial(train.train_step, model=model, tx=tx))
  iterator = input_pipeline.train_batches(data, batch_size, config.seed, 0,
                                          parallel.process_index, parallel.process_count)
  batches = [parallel.put_batch(next(iterator)) for _ in range(8)]
  t0 = time.perf_counter()
  compiled = fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  flops = _cost_flops(compiled)
  if flops:  # XLA's cost analysis counts the native kernels' custom calls as no work.
    from fashion_jax import native  # pylint: disable=g-import-not-at-top
    flops += native.executed_flops(compiled.as_text())
  flops_per_image = (flops / batch_size * (parallel.num_devices if parallel.mode != "none"
                                           else 1)) if flops else None
  state, rates = _time_calls(lambda s, i: compiled(s, batches[i % len(batches)]), state,
                             batch_size)
  result = {"batch_size": batch_size, "train_images_per_sec": summarize(rates),
            "compile_s": compile_s, "flops_per_image_xla": flops_per_image}
  log(f"jax  batch {batch_size:4d}: {statistics.median(rates):8,.0f} img/s "
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

  rates = timed_windows(window, FLAGS.windows)  # Advances `state`: read it after.
  return state, rates


def measure_loop(config, parallel, data, placement: str, pure_step_rate: float,
                 steps_per_dispatch: int = -1) -> dict:
  """The real train loop end to end (train.train_and_evaluate), host work included.

  Beside it, the same compiled window run back to back on inputs already on the
  device ("pure window"): the loop's host work per step is the difference.
  Compilation, checkpoints and evaluation are outside the timed lines.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import config_lib, input_pipeline, loop  # pylint: disable=g-import-not-at-top
  from fashion_jax import metric_writers, train  # pylint: disable=g-import-not-at-top
  from fashion_jax import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data_placement, config.steps_per_dispatch = placement, steps_per_dispatch
  # The window the config trains with; the timed run below keeps it.
  window = loop.window_length(config, config_lib.steps_per_epoch(config, len(data)),
                              config_lib.checkpoint_every_steps(config, len(data)),
                              config_lib.eval_every_steps(config, len(data)), jax.default_backend())
  model = train.create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  tx = train.create_optimizer(config)
  state = parallel.put_state(train.create_train_state(model, tx, config.seed))
  windows = loop.Windows(functools.partial(train.train_step, model=model, tx=tx), data, config,
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
    train.train_and_evaluate(run_config, workdir, splits=(data, held))
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
  log(f"loop {name:7s} batch {config.batch_size:4d} ({window:4d} steps/dispatch): {loop_rate:8,.0f} img/s; pure window "
      f"{pure:,.0f} ({before:,.0f} before, {after:,.0f} after); host {result['loop_host_us_per_step']:.1f} us/step; "
      f"{100 * result['vs_pure_step']:.1f}% of the pure step")
  return result


def measure_compile_cache(config, parallel, data) -> dict:
  """First and second compile of the train step with JAX's persistent compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import train  # pylint: disable=g-import-not-at-top

  cache_dir = tempfile.mkdtemp(prefix="fashion_jax_cache_")
  previous = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:
    model, tx = train.create_model(config), train.create_optimizer(config)
    state = parallel.put_state(train.create_train_state(model, tx, config.seed))
    batch = parallel.put_batch({"image": data.images[:config.batch_size],
                                "label": data.labels[:config.batch_size]})
    times = []
    for _ in range(2):
      jax.clear_caches()
      fn = parallel.compile(functools.partial(train.train_step, model=model, tx=tx))
      t0 = time.perf_counter()
      fn.lower(state, batch).compile()
      times.append(time.perf_counter() - t0)
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
  log(f"compile with persistent cache: first {times[0]:.2f}s, second {times[1]:.2f}s")
  return {"compile_first_s": times[0], "compile_cached_s": times[1], "cache_dir": cache_dir}


def measure_eval(config, parallel, test_split) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import train  # pylint: disable=g-import-not-at-top

  model, tx = train.create_model(config), train.create_optimizer(config)
  state = parallel.put_state(train.create_train_state(model, tx, config.seed))
  evaluator = train.Evaluator(test_split, config, train.create_model(config, training=False),
                              parallel)
  jax.block_until_ready(evaluator(state))  # Compile + warm-up.
  times = []
  for _ in range(max(2, FLAGS.windows // 2)):
    t0 = time.perf_counter()
    jax.block_until_ready(evaluator(state))
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  log(f"eval: {len(test_split):,} images in {seconds:.3f}s "
      f"({len(test_split) / seconds:,.0f} img/s, batch {config.eval_batch_size})")
  return {"eval_images_per_sec": len(test_split) / seconds, "eval_seconds": seconds,
          "eval_examples": len(test_split), "eval_batch_size": config.eval_batch_size}


def measure_input(config, parallel, source: str) -> dict:
  """Load time and batching+transfer throughput of one data source on its own."""
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import download, input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  if source == "idx":
    where = input_pipeline.source(config)
    if where.kind != "idx":
      return {"available": False,
              "reason": f"no --config.idx_dir (or ${input_pipeline.IDX_ENV}) given"}
  elif source == "tfds":
    reason = tfds_unprepared_reason(config)
    if reason:
      log(f"input (tfds): unavailable: {reason}")
      return {"available": False, "reason": reason}
    where = input_pipeline.Source("tfds", config.data_dir, "benchmark")
  else:  # The verified download (fetched if missing: offline this fails within seconds).
    where = input_pipeline.Source(
        "download", download.default_folder(config.dataset, config.data_dir), "benchmark")
  t0 = time.perf_counter()
  try:
    split = input_pipeline.load(config, "train", where)
  except UserError as e:
    log(f"input ({source}): unavailable: {e}")
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
  log(f"input ({source}): load {load_s:.2f}s, batches {rate:,.0f} img/s")
  return {"available": True, "load_s": load_s, "images_per_sec": rate, "examples": len(split)}


def tfds_unprepared_reason(config) -> str | None:
  """Why the tfds source cannot be timed without downloading (None: it can)."""
  from fashion_jax import input_pipeline  # pylint: disable=g-import-not-at-top
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


def keras_model(keras):
  layers = keras.layers
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      layers.Rescaling(1.0 / 255),
      layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
      layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
      layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10),
  ])


def measure_keras(data, batch_size: int) -> dict:
  """The identical model in Keras (TensorFlow backend, its default `fit`), same batches."""
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import keras  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(0)
  model = keras_model(keras)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
  n_warm = min(len(data), batch_size * 20)
  model.fit(data.images[:n_warm], data.labels[:n_warm], batch_size=batch_size, epochs=1,
            verbose=0, shuffle=False)  # Trace/compile.
  # One window = as many batches as take ~window_seconds at the warm-up rate.
  t0 = time.perf_counter()
  model.fit(data.images[:n_warm], data.labels[:n_warm], batch_size=batch_size, epochs=1,
            verbose=0, shuffle=False)
  per_image = (time.perf_counter() - t0) / n_warm
  n = min(len(data), max(batch_size * 4, int(FLAGS.window_seconds / per_image)) // batch_size
          * batch_size)

  def window():
    start = time.perf_counter()
    model.fit(data.images[:n], data.labels[:n], batch_size=batch_size, epochs=1, verbose=0,
              shuffle=False)
    return n / (time.perf_counter() - start)

  rates = timed_windows(window, FLAGS.windows)
  log(f"keras batch {batch_size:4d}: {statistics.median(rates):8,.0f} img/s "
      f"(min {min(rates):,.0f}, max {max(rates):,.0f}; keras {keras.__version__}, "
      f"backend {keras.backend.backend()})")
  return {"batch_size": batch_size, "train_images_per_sec": summarize(rates),
          "keras_version": keras.__version__, "backend": keras.backend.backend()}


def environment(parallel) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  device = parallel.devices[0]
  return {
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__, "fashion_jax": fashion_jax.__version__,
      "backend": jax.default_backend(), "device_kind": device.device_kind,
      "num_devices": parallel.num_devices, "parallelism": parallel.mode,
      "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
      "threads": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS",
                                                  "TF_NUM_INTRAOP_THREADS") if os.environ.get(k)},
  }


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      match = re.search(r"model name\s*:\s*(.*)", f.read())
    return match.group(1).strip() if match else platform.processor()
  except OSError:
    return platform.processor()


def run(config) -> dict:
  """Runs every measurement; returns the results dict (also written to --output)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fashion_jax import backends, config_lib, input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.errors import UserError  # pylint: disable=g-import-not-at-top

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
  env = environment(parallel)
  log(f"{env['device_kind']} x{env['num_devices']} ({env['backend']}), jax {env['jax']}, "
      f"{parallel.mode}; conv_impl={config.conv_impl} pool_impl={config.pool_impl}; "
      f"batch sizes {batch_sizes}")
  data_source = input_pipeline.source(config)
  try:
    if data_source.kind == "tfds" and (reason := tfds_unprepared_reason(config)):
      raise UserError(reason)
    train_data = input_pipeline.load(config, "train", data_source)
    test_data = input_pipeline.load(config, "test", data_source)
    data_note = data_source.describe()
  except UserError as e:
    log(f"no real data ({e}); timing on random images (throughput does not depend on content)")
    rng = np.random.default_rng(0)
    train_data = input_pipeline.Split(rng.integers(0, 256, (60_000, 28, 28, 1), np.uint8),
                                      rng.integers(0, 10, 60_000).astype(np.int32))
    test_data = input_pipeline.Split(train_data.images[:10_000], train_data.labels[:10_000])
    data_note = "random"

  sweep = [measure_jax_train(config, parallel, train_data, b) for b in batch_sizes]
  keras_sweep = []
  if FLAGS.compare == "keras":
    keras_sweep = [measure_keras(train_data, b) for b in batch_sizes]
    log("re-measuring jax after keras (same run, to bound drift)")
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
  flops_per_image = (model_flops_per_image(config, best["batch_size"])
                     or analytic_flops_per_image(config.model))
  peak, peak_source = device_peak_gflops(parallel.devices[0], config.compute_dtype)
  achieved = best_rate * flops_per_image
  mfu = achieved / (peak * 1e9 * _peak_units(parallel))
  hfu = (best_rate * executed_flops / (peak * 1e9 * _peak_units(parallel))
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
      "flops_per_image_analytic": analytic_flops_per_image(config.model),
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


def format_table(results: dict) -> str:
  rows = [f"{'batch':>6} {'jax img/s (median)':>19} {'min':>8} {'max':>8} {'compile s':>10}"
          + (f" {'keras img/s':>12} {'ratio':>6}" if "keras_sweep" in results else "")]
  keras = {r["batch_size"]: r for r in results.get("keras_sweep", [])}
  for r in results["sweep"]:
    t = r["train_images_per_sec"]
    row = (f"{r['batch_size']:>6} {t['median']:>19,.0f} {t['min']:>8,.0f} {t['max']:>8,.0f} "
           f"{r['compile_s']:>10.2f}")
    if keras:
      k = keras[r["batch_size"]]["train_images_per_sec"]["median"]
      row += f" {k:>12,.0f} {t['median'] / k:>6.2f}"
    rows.append(row)
  env = results["environment"]
  lines = [
      f"fashion_jax benchmark — {env['device_kind']} x{env['num_devices']}, {env['cpu']}, "
      f"jax {env['jax']}, {env['date']}",
      *rows,
      f"best: {results['train_images_per_sec']:,.0f} img/s at batch {results['best_batch_size']}; "
      f"model {results['flops_per_image'] / 1e6:.2f} MFLOP/image -> "
      f"{results['achieved_gflops']:.1f} GFLOP/s = MFU {100 * results['mfu']:.1f}% of {results['peak_gflops_per_device']:.0f} GFLOP/s "
      f"peak ({results['peak_source']})",
      *([f"executed: {results['flops_per_image_executed'] / 1e6:.2f} MFLOP/image "
         f"(XLA cost analysis of the program that ran, plus fashion_jax's native kernels) -> "
         f"{100 * results['hfu']:.1f}% of peak (hardware FLOP utilization)"]
        if results.get("hfu") else []),
      *(["(MFU counts the model's FLOPs; above 100% means the formulation that ran needs fewer "
         "FLOPs for the same math, e.g. Winograd, and the executed line is the hardware's view)"]
        if results["mfu"] > 1 else []),
      f"eval: {results['eval_examples']:,} images in {results['eval_seconds']:.3f}s "
      f"({results['eval_images_per_sec']:,.0f} img/s)",
  ]
  for r in results.get("loop", []):
    lines.append(f"loop {r['name']} (batch {r['batch_size']}, "
                 f"{r['steps_per_dispatch']} steps/dispatch): {r['loop_images_per_sec']:,.0f} img/s "
                 f"= {100 * r['vs_pure_step']:.1f}% of the pure step; pure window "
                 f"{r['pure_window_images_per_sec']:,.0f} img/s; host work "
                 f"{r['loop_host_us_per_step']:.1f} us/step")
  if "compile_cached_s" in results:
    lines.append(f"compile: {results['compile_first_s']:.2f}s, with persistent cache "
                 f"{results['compile_cached_s']:.2f}s")
  for source, r in results["input"].items():
    lines.append(f"input {source}: " + (f"load {r['load_s']:.2f}s, {r['images_per_sec']:,.0f} img/s"
                                        if r["available"] else f"unavailable ({r['reason'][:80]})"))
  if "speedup_vs_keras" in results:
    lines.append(f"speedup vs keras (best batch each): {results['speedup_vs_keras']:.2f}x "
                 f"({results['train_images_per_sec']:,.0f} vs "
                 f"{results['keras_train_images_per_sec']:,.0f} img/s at batch "
                 f"{results['keras_best_batch_size']})")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(cli.QuietLibraries())  # --loop runs the real loop.
  from fashion_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    results = run(FLAGS.config)
  except UserError as e:
    print(f"fashion_jax: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(results))
  with open(FLAGS.output, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  log(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  runtime.reexec_with_tuned_malloc("fashion_jax.benchmark")
  app.run(main, flags_parser=cli.parse_flags)
