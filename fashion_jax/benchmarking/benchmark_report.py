"""The benchmark's helpers: progress lines, statistics, the Keras baseline, the machine
description and the result table."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time

import fashion_jax
from fashion_jax.benchmarking import flops
from fashion_jax.support import backends
from fashion_jax.support.errors import UserError


def log(message: str) -> None:
  print(f"[benchmark {fashion_jax.seconds_since_start():6.1f}s] {message}", file=sys.stderr,
        flush=True)


def timed_windows(run_window, windows: int) -> list[float]:
  return [run_window() for _ in range(windows)]


def summarize(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "windows": len(values)}


def summarize_passes(passes: list[list[float]]) -> dict:
  """Rates of several passes of timed windows: the median of the passes' medians (robust to one
  slow or fast pass), the extremes of every window, and each pass's median (`passes`)."""
  medians = [statistics.median(rates) for rates in passes]
  every = [rate for rates in passes for rate in rates]
  return {**summarize(every), "median": statistics.median(medians), "passes": medians}


def keras_model(keras):
  layers = keras.layers
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      layers.Rescaling(1.0 / 255),
      layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
      layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
      layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10),
  ])


class KerasTrain:
  """The identical model in Keras (TensorFlow backend, its default `fit`) at one batch size, on
  the same images; compiled once, and `measure` times a pass of windows, as often as asked."""

  def __init__(self, data, batch_size: int, window_seconds: float):
    # Set, not defaulted: a user's KERAS_BACKEND=jax (or torch) made it another comparison, unsaid.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # pylint: disable=g-import-not-at-top
    if keras.backend.backend() != "tensorflow":  # Imported before on another (a notebook's).
      raise UserError(f"--compare=keras compares with Keras on TensorFlow, and Keras is loaded "
                      f"here on {keras.backend.backend()}; run the benchmark in a new process")
    backends.tensorflow_shares_the_gpu()

    keras.utils.set_random_seed(0)
    self.model = model = keras_model(keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    self.data, self.batch_size = data, batch_size
    self.version, self.backend = keras.__version__, keras.backend.backend()
    n_warm = min(len(data), batch_size * 20)
    self._fit(n_warm)  # Trace/compile.
    # One window = as many batches as take ~window_seconds at the warm-up rate.
    t0 = time.perf_counter()
    self._fit(n_warm)
    per_image = (time.perf_counter() - t0) / n_warm
    self.n = min(len(data), max(batch_size * 4, int(window_seconds / per_image)) // batch_size
                 * batch_size)
    self.passes = 0

  def _fit(self, n: int) -> None:
    self.model.fit(self.data.images[:n], self.data.labels[:n], batch_size=self.batch_size,
                   epochs=1, verbose=0, shuffle=False)

  def measure(self, windows: int) -> list[float]:
    """One pass: img/s of each of `windows` timed windows."""
    def window():
      start = time.perf_counter()
      self._fit(self.n)
      return self.n / (time.perf_counter() - start)

    rates = timed_windows(window, windows)
    self.passes += 1
    log(f"keras batch {self.batch_size:4d}: {statistics.median(rates):8,.0f} img/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}; pass {self.passes}; keras "
        f"{self.version}, backend {self.backend})")
    return rates


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
      # The CPUs this process may run on (taskset, a container's cpuset): what the peak counts.
      "cpu": _cpu_name(), "cpu_count": flops.usable_cpus(), "cpu_count_machine": os.cpu_count(),
      "cpu_isa": cpu_isa(), "cpu_id": cpu_id(),
      "native_kernels": _native_kernels() if jax.default_backend() == "cpu" else None,
      "threads": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS",
                                                  "TF_NUM_INTRAOP_THREADS") if os.environ.get(k)},
  }


def cpu_line(env: dict) -> str:
  """"AMD EPYC (2 cores; avx2,...); native kernels: ..." -- the CPU the numbers were measured on."""
  cores = f"{env['cpu_count']} cores" + (f" of {env['cpu_count_machine']}"
                                         if env["cpu_count_machine"] != env["cpu_count"] else "")
  known = f"; {env['cpu_id']}" if env.get("cpu_id") else ""
  return (f"{env['cpu']} ({cores}; {env['cpu_isa']}{known}); native kernels: "
          f"{env['native_kernels']}")


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "asimd", "sve")


def cpu_isa() -> str:
  """The vector ISA flags the CPU reports (lscpu's flags, the ones that matter here)."""
  from fashion_jax.kernels import native_build  # pylint: disable=g-import-not-at-top
  flags = native_build.cpu_flags()  # The same reading the native kernels' build choice makes.
  return ",".join(name for name in ISA_FLAGS if name in flags) or platform.machine()


def _native_kernels() -> str:
  """What the native kernels were built for: "target=x86-64-v4 lanes=16 (512-bit vectors)
  isa=avx512f,avx2,fma", or why none."""
  from fashion_jax.kernels import native  # pylint: disable=g-import-not-at-top
  built = native.info()
  return (f"target={built['target']} lanes={built['lanes']} ({32 * built['lanes']}-bit vectors) "
          f"isa={built['isa']}" if built else f"unavailable: {native._load()}")  # pylint: disable=protected-access


# /proc/cpuinfo's fields that name the CPU type as lscpu does (x86, then Arm), and how each reads.
_CPU_ID_FIELDS = (("vendor_id", "{}"), ("cpu family", "family {}"), ("model", "model {}"),
                  ("stepping", "stepping {}"), ("CPU implementer", "implementer {}"),
                  ("CPU part", "part {}"), ("CPU variant", "variant {}"),
                  ("CPU revision", "revision {}"))


def cpu_id(cpuinfo: str | None = None) -> str | None:
  """The CPU type where its model name does not tell it ("AMD EPYC" on these VMs is Zen 3, 4 or
  5): "AuthenticAMD family 25 model 17 stepping 1", Arm's "implementer 0x41 part 0xd40 ...";
  None where /proc/cpuinfo (`cpuinfo`: its text) has none of it."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      return None
  first = cpuinfo.split("\n\n", 1)[0]  # The first processor's block.
  found = [how.format(m.group(1).strip()) for key, how in _CPU_ID_FIELDS
           if (m := re.search(rf"^{key}\s*:\s*(\S.*)$", first, re.MULTILINE))]
  return " ".join(found) or None


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      match = re.search(r"model name\s*:\s*(.*)", f.read())
  except OSError:
    match = None
  # Arm's /proc/cpuinfo has no model name (and platform.processor() is often empty there).
  return match.group(1).strip() if match else (platform.processor() or
                                               f"{platform.machine() or 'unknown'} CPU")


DRIFT = 1.25  # Passes of one side at one batch size this far apart: the machine's speed moved.


def drift_warning(results: dict) -> str | None:
  """A line naming the batch size whose passes disagree most, where fastest / slowest pass
  reaches DRIFT (a shared or virtual machine whose speed changed during the run); else None."""
  spreads = [(max(r["train_images_per_sec"]["passes"]) / min(r["train_images_per_sec"]["passes"]),
              side, r["batch_size"])
             for side in ("sweep", "keras_sweep") for r in results.get(side, [])
             if len(r["train_images_per_sec"].get("passes", ())) > 1]
  if not spreads or max(spreads)[0] < DRIFT:
    return None
  spread, side, batch = max(spreads)
  return (f"warning: the {'Keras' if side == 'keras_sweep' else 'jax'} passes at batch {batch} "
          f"differ by {100 * (spread - 1):.0f}% (fastest / slowest): this machine's speed changed "
          f"during the run; read the medians, compare within rounds, or rerun with more "
          f"--rounds (now {results.get('rounds', 1)})")


def _peak(results: dict) -> str:
  """The peak MFU is a share of: all the devices' ("8 x 989" where there are several)."""
  total, each = results.get("peak_gflops"), results["peak_gflops_per_device"]
  if total is None or abs(total - each) < 0.5:
    return f"{each:,.0f}"
  return f"{total:,.0f} ({total / each:.0f} x {each:,.0f})"


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
  random = results["config"].get("data") == "random"
  lines = [
      f"fashion_jax benchmark — {env['device_kind']} x{env['num_devices']}, {env['cpu']}, "
      f"jax {env['jax']}, {env['date']}" + (", on random images (no data found)" if random else ""),
      *rows,
      f"best: {results['train_images_per_sec']:,.0f} img/s at batch {results['best_batch_size']}; " +
      (f"model {results['flops_per_image'] / 1e6:.2f} MFLOP/image -> "
       f"{results['achieved_gflops']:.1f} GFLOP/s = " if results["flops_per_image"] else
       "model FLOPs not counted (no XLA cost analysis here): ") +
      (f"MFU {100 * results['mfu']:.1f}% of {_peak(results)} GFLOP/s peak "
       if results["mfu"] is not None else "MFU unknown ") + f"({results['peak_source']})",
      *([f"executed: {results['flops_per_image_executed'] / 1e6:.2f} MFLOP/image "
         f"(XLA cost analysis of the program that ran, plus fashion_jax's native kernels) -> "
         f"{100 * results['hfu']:.1f}% of peak (hardware FLOP utilization)"]
        if results.get("hfu") else []),
      *(["(MFU counts the model's FLOPs; above 100% means the formulation that ran needs fewer "
         "FLOPs for the same math, e.g. Winograd, and the executed line is the hardware's view)"]
        if (results["mfu"] or 0) > 1 else []),
      f"eval: {results['eval_examples']:,} images in {results['eval_seconds']:.3f}s "
      f"({results['eval_images_per_sec']:,.0f} img/s)",
  ]
  for r in results.get("loop", []):
    lines.append(f"loop {r['name']} (batch {r['batch_size']}, "
                 f"{r['steps_per_dispatch']} steps/dispatch): {r['loop_images_per_sec']:,.0f} img/s "
                 f"= {100 * r['vs_pure_step']:.1f}% of the pure step; pure window "
                 f"{r['pure_window_images_per_sec']:,.0f} img/s; host work "
                 f"{r['loop_host_us_per_step']:.1f} us/step")
  if (warning := drift_warning(results)) is not None:
    lines.insert(1 + len(rows), warning)  # Under the table it qualifies.
  if results.get("rounds", 1) > 1:
    per_round = results["per_round"]
    lines.append(f"{len(per_round)} rounds" + (", each Keras pass between two jax passes"
                                               if "keras_sweep" in results else "") + ": best "
                 + " / ".join(f"{r['train_images_per_sec']:,.0f}" for r in per_round) + " img/s"
                 + ("; executed " + " / ".join(f"{100 * r['hfu']:.1f}" for r in per_round) + " %"
                    if all(r["hfu"] for r in per_round) else "")
                 + ("; vs keras " + " / ".join(f"{r['speedup_vs_keras']:.2f}" for r in per_round)
                    + "x" if "keras_sweep" in results else ""))
  if "compile_cached_s" in results:
    lines.append(f"compile: {results['compile_first_s']:.2f}s, with persistent cache "
                 f"{results['compile_cached_s']:.2f}s")
  for source, r in results["input"].items():
    lines.append(f"input {source}: " + (f"load {r['load_s']:.2f}s, {r['images_per_sec']:,.0f} img/s"
                                        if r["available"] else f"unavailable ({_short(r['reason'])})"))
  if "speedup_vs_keras" in results:
    lines.append(f"speedup vs keras (best batch each): {results['speedup_vs_keras']:.2f}x "
                 f"({results['train_images_per_sec']:,.0f} vs "
                 f"{results['keras_train_images_per_sec']:,.0f} img/s at batch "
                 f"{results['keras_best_batch_size']})")
  return "\n".join(lines)


def _short(reason: str, most: int = 160) -> str:
  """A reason's first line, cut with an ellipsis where longer (the progress line has it whole)."""
  first = (reason.splitlines() or [""])[0]
  return first if len(first) <= most else first[:most - 1].rstrip() + "…"
