"""The benchmark's request checked before anything is measured: every flag, the batch sizes, the
Keras comparison, multi-process settings and the output file. Each problem is one UserError line;
found after minutes of measuring (it was, for several) the results would be lost."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

# What a failed write of --output at the end says: the results are on the screen.
OUTPUT_FIX = "pass another --output (the table above has the results)"
OUTPUT_FULL_FIX = f"free some space or {OUTPUT_FIX}"


def parse_batch_sizes(text: str, default: int) -> list[int]:
  """--batch_sizes as positive integers, each once, in the order given (`default`,
  config.batch_size, when empty); a UserError naming the entry otherwise."""
  sizes = []
  for part in (p.strip() for p in text.split(",")) if text.strip() else ():
    if not part:
      continue
    if not (part.isascii() and part.isdecimal()) or int(part) == 0:
      raise UserError(f"--batch_sizes={text}: {part!r} is not a positive whole number; pass "
                      "comma-separated batch sizes, e.g. --batch_sizes=32,128,512")
    if int(part) not in sizes:  # "8,08" had compiled and timed batch 8 twice.
      sizes.append(int(part))
  if text.strip() and not sizes:  # "," (a variable left empty) had timed config.batch_size.
    raise UserError(f"--batch_sizes={text} names no batch size; pass comma-separated batch "
                    "sizes, e.g. --batch_sizes=32,128,512, or leave it out for the config's")
  return sizes or [default]


def flags(flag_values, loop_variants) -> None:
  """The numeric and list flags (`flag_values`: absl's FLAGS)."""
  f = flag_values
  if f.rounds < 1:
    raise UserError(f"--rounds={f.rounds} is invalid; give 1 or more passes")
  if f.windows < 1:
    raise UserError(f"--windows={f.windows} is invalid; give 1 or more timed windows per pass")
  if not (math.isfinite(f.window_seconds) and f.window_seconds > 0):
    raise UserError(f"--window_seconds={f.window_seconds} is invalid; give a positive "
                    "number of seconds, e.g. 2")
  if f.profile_steps < 1:
    raise UserError(f"--profile_steps={f.profile_steps} is invalid; give 1 or more steps")
  if not (math.isfinite(f.peak_gflops) and f.peak_gflops >= 0):
    raise UserError(f"--peak_gflops={f.peak_gflops} is invalid; give one device's peak in "
                    "GFLOP/s (a positive number), or 0 to look it up or measure it")
  for given, needs in (("loop_variants", "loop"), ("profile_steps", "profile")):
    if f[given].present and not f[needs].value:  # (It was accepted and did nothing.)
      raise UserError(f"--{given} sets what --{needs} does, and --{needs} is off; add --{needs} "
                      f"(or leave out --{given})")
  unknown = [v for v in f.loop_variants if v not in loop_variants]
  if unknown or not f.loop_variants:
    raise UserError(f"--loop_variants={','.join(f.loop_variants)} " +
                    (f"names {unknown[0]!r}, which" if unknown else "is empty; it") +
                    f" is not a loop to time; use some of {','.join(loop_variants)}")


def compare(config, what: str) -> None:
  """--compare=keras: the same model (only the classic CNN has a Keras twin), and a Keras that
  imports (one installed but broken had failed after the jax compiles, with a traceback)."""
  if what != "keras":
    return
  if config.model != "cnn":
    raise UserError(f"--compare=keras trains the classic CNN in Keras, and config.model is "
                    f"{config.model!r}; leave out --compare, or benchmark --config.model=cnn")
  # The Keras twin trains float32 with Adam on the batches as they are: a jax step that does more
  # (augmentation, EMA) or in another dtype is not the same work, and its ratio no comparison.
  differs = [f"{key}={config[key]}" for key, same in (
      ("compute_dtype", "float32"), ("optimizer", "adam"), ("augment_translate", 0),
      ("augment_flip", False), ("random_erasing", 0.0), ("ema_decay", 0.0)) if config[key] != same]
  if differs:
    raise UserError(f"--compare=keras trains the Keras twin in float32 with Adam, no "
                    f"augmentation or EMA, and the config has {', '.join(differs)}; leave out "
                    "--compare, or override those (--config.KEY=VALUE) to compare the same work")
  missing = [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m) is None]
  if missing:
    raise UserError(f"--compare=keras trains the Keras model on TensorFlow, and "
                    f"{' and '.join(missing)} {'are' if missing[1:] else 'is'} not installed "
                    "here; pip install 'fashion_jax[tf]' (or leave out --compare)")
  # Imported in a child process: here TensorFlow would load its CUDA libraries before JAX.
  env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, "KERAS_BACKEND": "tensorflow"}
  try:
    proc = subprocess.run([sys.executable, "-c", "import keras"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  except subprocess.TimeoutExpired:
    raise UserError("--compare=keras: importing Keras took over 5 minutes here; repair the "
                    "install or leave out --compare") from None
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:200]
    raise UserError(f"--compare=keras: Keras cannot be imported here ({last}); repair it "
                    "(pip install 'fashion_jax[tf]') or leave out --compare")


def one_process(config) -> str | None:
  """Refuses a multi-process request (the benchmark times one process; its peers would each write
  --output alone); returns the cluster launch detected, if any, to be logged."""
  from fashion_jax.support import parallel  # pylint: disable=g-import-not-at-top
  if config.distributed == "on" or config.coordinator_address:
    raise UserError("the benchmark measures one process, and the config asks for a "
                    "multi-process job (config.distributed / config.coordinator_address); run it "
                    "on one host with --config.distributed=off")
  return parallel.cluster_detected() if config.distributed == "auto" else None


def batches_fit(batch_sizes: list[int], parallel, train_examples: int, given: bool) -> None:
  """Every batch size splits over the devices and fits the training set. `given`: by
  --batch_sizes (else the one is config.batch_size)."""
  name = "--batch_sizes:" if given else "config.batch_size (no --batch_sizes given):"
  for b in batch_sizes:
    if b % parallel.num_devices:
      raise UserError(f"{name} {b} does not divide by the {parallel.num_devices} "
                      f"devices ({parallel.mode}); pass multiples of {parallel.num_devices}")
    if b > train_examples:  # The train step cycles through the training set a batch at a time.
      raise UserError(f"{name} {b} is larger than the {train_examples} training "
                      "examples; pass smaller batch sizes")


STDOUT = "-"  # --output=-: the JSON on stdout.


def output(path: str) -> str:
  """--output resolved (a local file or gs://bucket/path), its folder created and proved
  writable: before the measurements, so that minutes of them are never lost at the end."""
  if not path.strip():
    raise UserError("--output is empty; pass the JSON file to write, e.g. --output=benchmark.json")
  if path == STDOUT:  # (It had written a file named "-".)
    return path
  path = storage.resolve(path, "--output")
  if storage.written_in_place(path):  # /dev/null, /dev/stdout, a FIFO: appended to, no folder.
    if not os.path.exists(path):
      raise UserError(f"--output {path} does not exist; pass a file name, or an existing device "
                      "such as /dev/null")
    return path
  if storage.isdir(path):
    raise UserError(f"--output {path!r} is a folder; pass a file name, e.g. "
                    f"--output={storage.join(path, 'benchmark.json')}")
  folder = path.rsplit("/", 1)[0] if storage.is_url(path) else os.path.dirname(path)
  storage.ensure_writable_dir(folder, "--output's folder")
  return path
