"""The benchmark command runs end to end and writes the promised JSON keys."""

import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_module, run_module_noting_jax


def _keras_present() -> bool:
  return all(importlib.util.find_spec(m) for m in ("tensorflow", "keras"))


def test_benchmark_json(tmp_path, idx_dir):
  compare = _keras_present()  # Without them, the --compare=keras error is tested below.
  output = tmp_path / "benchmark.json"
  args = ["--config=configs/tiny.py", f"--config.idx_dir={idx_dir}", "--batch_sizes=8,16",
          "--windows=2", "--window_seconds=0.05", f"--output={output}", "--loop",
          "--loop_variants=device", "--rounds=2", "--profile", "--profile_steps=4"]
  # KERAS_BACKEND=jax: Keras trained on JAX where the user's environment said so (unsaid).
  proc = run_module("fashion_jax.benchmark", *args, *(["--compare=keras"] if compare else []),
                    env={"KERAS_BACKEND": "jax"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(output.read_text())
  assert {k["backend"] for k in results.get("keras_sweep", [])} <= {"tensorflow"}
  for key in ("train_images_per_sec", "compile_s", "eval_images_per_sec", "input_images_per_sec",
              "flops_per_image", "mfu"):
    assert isinstance(results[key], float) and results[key] > 0, key
  assert [r["batch_size"] for r in results["sweep"]] == [8, 16]
  # What ran, whole: the config (a bfloat16 run had read as a float32 one) and the flags.
  assert results["config"]["compute_dtype"] == "float32" and results["config"]["batch_size"] == 16
  assert results["flags"]["windows"] == 2 and results["flags"]["loop_variants"] == ["device"]
  # XLA's count and the hand count agree (the step is ~3x the forward pass, less the first
  # conv's input gradient).
  assert results["flops_per_image"] == pytest.approx(results["flops_per_image_analytic"], rel=0.05)
  # MFU counts the model's FLOPs; on CPU the Winograd conv+pool executes fewer, so MFU may pass
  # 100 % (it did here, at batch 16, once Adam's square root got 3x faster); the hardware's
  # share of its measured peak may not.
  assert results["flops_per_image_executed"] < 0.8 * results["flops_per_image"]
  assert 0 < results["hfu"] < min(results["mfu"], 1)
  assert results["compile_cached_s"] > 0 and results["input"]["idx"]["available"]
  assert "best:" in proc.stdout and "eval:" in proc.stdout  # The printed table.
  # The CPU, its ISA and the native kernels' vector width, beside the numbers they explain.
  from fashion_jax.benchmarking import benchmark, benchmark_report  # pylint: disable=import-outside-toplevel
  from fashion_jax.kernels import native  # pylint: disable=import-outside-toplevel
  env = results["environment"]
  assert env["cpu_isa"] and f"native kernels: {env['native_kernels']}" in proc.stdout
  # The CPUs it could use (what the peak counts), not the machine's (it had said "2 cores" under
  # `taskset -c 0` beside a one-core peak).
  assert env["cpu_count"] == len(os.sched_getaffinity(0))
  assert env["cpu_count_machine"] == os.cpu_count()
  pinned = dict(env, cpu="CPU", cpu_count=1, cpu_count_machine=2)
  assert benchmark_report.cpu_line(pinned).startswith("CPU (1 cores of 2; ")
  if native.available():
    built = native.info()
    assert env["native_kernels"].startswith(f"target={built['target']} lanes={built['lanes']} ")
  assert "jax  batch    8" in proc.stderr  # Progress while it runs.
  # The real loop, timed at each batch size beside its pure window.
  assert [(r["name"], r["batch_size"]) for r in results["loop"]] == [("device", 8), ("device", 16)]
  for r in results["loop"]:
    assert r["loop_images_per_sec"] > 0 and r["pure_window_images_per_sec"] > 0
    assert r["loop_host_us_per_step"] == pytest.approx(
        1e6 * r["batch_size"] * (1 / r["loop_images_per_sec"] - 1 / r["pure_window_images_per_sec"]))
    assert r["steps_timed"] >= 2 * r["steps_per_dispatch"]
  best = results["best_batch_size"]
  assert results["loop_images_per_sec_device"] == next(
      r["loop_images_per_sec"] for r in results["loop"] if r["batch_size"] == best)
  assert "loop device (batch 16" in proc.stdout
  # Two rounds: jax, Keras, jax, Keras, jax (each Keras pass between two jax passes), or two jax
  # passes alone; each rate is the median of its passes, each round reported on its own.
  assert results["rounds"] == 2 and len(results["per_round"]) == 2
  for side in ("sweep", "keras_sweep") if compare else ("sweep",):
    for r in results[side]:
      rates = r["train_images_per_sec"]
      assert len(rates["passes"]) == (3 if compare and side == "sweep" else 2)
      assert rates["median"] == pytest.approx(statistics.median(rates["passes"]))
      assert rates["windows"] == 2 * len(rates["passes"])
  for index, r in enumerate(results["per_round"]):
    at_best = next(s for s in results["sweep"] if s["batch_size"] == r["best_batch_size"])
    passes = at_best["train_images_per_sec"]["passes"]
    assert r["train_images_per_sec"] == pytest.approx(
        statistics.mean(passes[index:index + 2]) if compare else passes[index])
    assert r["train_images_per_sec"] == max(  # The best batch size of that round.
        (statistics.mean(s["train_images_per_sec"]["passes"][index:index + 2]) if compare
         else s["train_images_per_sec"]["passes"][index]) for s in results["sweep"])
    assert r["hfu"] == pytest.approx(
        results["hfu"] * r["train_images_per_sec"] / results["train_images_per_sec"]
        * at_best["flops_per_image_xla"] / results["flops_per_image_executed"])
    if compare:
      assert r["keras_train_images_per_sec"] == max(
          k["train_images_per_sec"]["passes"][index] for k in results["keras_sweep"])
      assert r["speedup_vs_keras"] == pytest.approx(
          r["train_images_per_sec"] / r["keras_train_images_per_sec"])
  assert "2 rounds" in proc.stdout
  if compare:
    assert results["keras_train_images_per_sec"] > 0
    assert results["speedup_vs_keras"] == pytest.approx(
        results["train_images_per_sec"] / results["keras_train_images_per_sec"])
  else:
    assert "speedup_vs_keras" not in results
  tfds_input = results["input"]["tfds"]  # Offline it is reported unavailable, never downloaded.
  assert tfds_input["available"] or ("not prepared" in tfds_input["reason"]
                                     or "cannot be imported" in tfds_input["reason"]
                                     or "TensorFlow is not installed" in tfds_input["reason"])
  downloaded = results["input"]["download"]
  assert downloaded["available"] or "could not download" in downloaded["reason"]
  # The step op by op at the best batch size: XLA's ops as well as the kernels (not a share of
  # the step's wall time: under the suite's parallel workers the process waits between ops), and
  # each native kernel's GFLOP/s is its executed FLOPs over its own time, a share of the peak the
  # table names.
  profile = results["profile"]
  assert profile["available"], profile
  assert profile["batch_size"] == best and profile["steps"] == 4
  assert profile["ops_ms_per_step"] > 0 and len(profile["ops"]) >= 10
  ops = profile["ops"]
  assert [o["ms_per_step"] for o in ops] == sorted((o["ms_per_step"] for o in ops), reverse=True)
  kernels = [o for o in ops if o["kind"].startswith("fashion_jax_")]
  assert bool(kernels) == native.available()
  for o in kernels:
    assert 0 < o["gflops"] and o["share_of_peak"] == pytest.approx(
        o["gflops"] / profile["peak_gflops"])
  assert all(o["gflops"] is None for o in ops if o["kind"] == "xla")
  assert f"profile (batch {best}, 4 steps" in proc.stdout
  # A device with no known peak (a GPU missing from the table): no MFU, said so, and valid JSON
  # (it had printed "MFU nan%" and written a bare NaN, which JSON readers reject).
  why = "unknown device kind 'NVIDIA RTX 9090': pass --peak_gflops"
  unknown = dict(results, mfu=None, hfu=None, peak_gflops_per_device=None, peak_source=why,
                 per_round=benchmark.round_figures(results["sweep"], results.get("keras_sweep", []),
                                                   2, peak_flops=None))
  table = benchmark_report.format_table(unknown)
  assert f"MFU unknown ({why})" in table and "nan" not in table.lower(), table
  assert all(r["hfu"] is None for r in unknown["per_round"])
  json.dumps(unknown, allow_nan=False)


class _Side:
  """A stand-in for TrainStep or KerasTrain: records each pass in a shared log."""

  def __init__(self, name: str, batch_size: int, log: list):
    self.name, self.batch_size, self.log = name, batch_size, log

  def measure(self, windows: int, window_seconds: float = 0.0) -> list[float]:
    self.log.append((self.name, self.batch_size))
    rate = 1000.0 * len(self.log) + self.batch_size  # Every pass's rates tell which pass it was.
    return [rate + w for w in range(windows)]


@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("keras", [False, True])
def test_alternate_puts_each_keras_pass_between_two_jax_passes(rounds, keras):
  from fashion_jax.benchmarking import benchmark  # pylint: disable=import-outside-toplevel
  log = []
  jax_sides = [_Side("jax", b, log) for b in (32, 512)]
  keras_sides = [_Side("keras", b, log) for b in (32, 512)] if keras else []
  jax_passes, keras_passes = benchmark.alternate(jax_sides, keras_sides, rounds, 3, 0.0)
  one_round = [("jax", 32), ("jax", 512)] + ([("keras", 32), ("keras", 512)] if keras else [])
  assert log == one_round * rounds + ([("jax", 32), ("jax", 512)] if keras else [])
  assert [len(p) for p in jax_passes] == [rounds + keras] * 2
  assert [len(p) for p in keras_passes] == ([rounds] * 2 if keras else [])
  assert all(len(rates) == 3 for side in (jax_passes, keras_passes) for p in side for rates in p)


def test_round_figures_pair_each_keras_pass_with_the_jax_passes_around_it():
  from fashion_jax.benchmarking import benchmark  # pylint: disable=import-outside-toplevel
  sweep = [{"batch_size": 32, "flops_per_image_xla": 2.0,
            "train_images_per_sec": {"passes": [100.0, 300.0, 500.0]}},
           {"batch_size": 512, "flops_per_image_xla": 1.0,
            "train_images_per_sec": {"passes": [150.0, 250.0, 200.0]}}]
  keras_sweep = [{"batch_size": 32, "train_images_per_sec": {"passes": [50.0, 40.0]}},
                 {"batch_size": 512, "train_images_per_sec": {"passes": [20.0, 80.0]}}]
  first, second = benchmark.round_figures(sweep, keras_sweep, 2, peak_flops=1000.0)
  # Round 1: jax passes 1-2 (32: 200, 512: 200: the first best wins), Keras pass 1 (best 50).
  assert first == {"train_images_per_sec": 200.0, "best_batch_size": 32, "hfu": 0.4,
                   "keras_train_images_per_sec": 50.0, "speedup_vs_keras": 4.0}
  # Round 2: jax passes 2-3 (32: 400, 512: 225), Keras pass 2 (best 80).
  assert second == {"train_images_per_sec": 400.0, "best_batch_size": 32, "hfu": 0.8,
                    "keras_train_images_per_sec": 80.0, "speedup_vs_keras": 5.0}
  alone = benchmark.round_figures(sweep[1:], [], 3, peak_flops=1000.0)  # No Keras: one pass each.
  assert [r["train_images_per_sec"] for r in alone] == [150.0, 250.0, 200.0]
  assert all("speedup_vs_keras" not in r for r in alone)


def test_drift_warning_names_the_passes_that_disagree_most():
  from fashion_jax.benchmarking import benchmark_report  # pylint: disable=import-outside-toplevel
  entry = lambda batch, passes: {"batch_size": batch, "train_images_per_sec": {"passes": passes}}
  steady = {"rounds": 2, "sweep": [entry(32, [100.0, 110.0, 120.0]), entry(512, [200.0, 240.0])],
            "keras_sweep": [entry(32, [50.0, 55.0])]}
  assert benchmark_report.drift_warning(steady) is None  # 1.20 at most: below DRIFT.
  halved = {"rounds": 2, "sweep": [entry(32, [100.0, 110.0, 120.0]), entry(512, [200.0, 100.0])],
            "keras_sweep": [entry(32, [50.0, 70.0])]}
  warning = benchmark_report.drift_warning(halved)
  assert warning.startswith("warning: the jax passes at batch 512 differ by 100% ")
  assert "--rounds (now 2)" in warning
  keras_moved = {"rounds": 1, "sweep": [entry(32, [100.0, 101.0])],
                 "keras_sweep": [entry(64, [50.0, 80.0])]}
  assert "the Keras passes at batch 64 differ by 60%" in benchmark_report.drift_warning(keras_moved)
  assert benchmark_report.drift_warning({"sweep": [entry(32, [100.0])]}) is None  # One pass.


@pytest.mark.skipif(_keras_present(), reason="TensorFlow and Keras are installed here")
def test_compare_keras_without_tensorflow_is_one_line(tmp_path, idx_dir):
  proc = run_module("fashion_jax.benchmark", "--config=configs/tiny.py",
                    f"--config.idx_dir={idx_dir}", "--compare=keras",
                    f"--output={tmp_path / 'b.json'}")
  assert_one_line_error(proc, "--compare=keras", "pip install 'fashion_jax[tf]'")


@pytest.mark.parametrize("flag,message", [
    ("--config.batch_size=-4", "config.batch_size=-4 is invalid"),
    ("--rounds=0", "--rounds=0 is invalid"),
    # A traceback after compiling (no median of no windows), int(nan), a peak taken as "0".
    ("--windows=0", "--windows=0 is invalid; give 1 or more timed windows"),
    ("--window_seconds=nan", "--window_seconds=nan is invalid; give a positive number"),
    ("--window_seconds=0", "--window_seconds=0.0 is invalid"),
    ("--peak_gflops=-5", "--peak_gflops=-5.0 is invalid; give one device's peak in GFLOP/s"),
    ("--peak_gflops=nan", "--peak_gflops=nan is invalid"),
    ("--batch_sizes=0", "'0' is not a positive whole number"),
    # A list of nothing ("$SIZES," with SIZES unset) had timed config.batch_size, exit 0.
    ("--batch_sizes=,", "--batch_sizes=, names no batch size"),
    ("--batch_sizes=32,-8", "'-8' is not a positive whole number"),
    ("--batch_sizes=12x", "--batch_sizes=12x: '12x' is not a positive whole number"),
    ("--config=configs/no_such.py", "--config=configs/no_such.py: cannot read the config file "
                                    "(No such file or directory"),
    ("--batch_sizes=²", "'²' is not a positive whole number"),
    # Had been found after the sweep and the other loops had run (minutes, no JSON written).
    ("--loop --loop_variants=classic,bogus", "--loop_variants=classic,bogus names 'bogus', "
                                             "which is not a loop to time; use some of "
                                             "classic,host,device"),
    # Accepted and ignored (exit 0, neither in the JSON).
    ("--loop_variants=host", "--loop_variants sets what --loop does, and --loop is off; add"),
    ("--profile_steps=7", "--profile_steps sets what --profile does, and --profile is off"),
    # A ZeroDivisionError traceback (no step in an epoch).
    ("--batch_sizes=32,100000", "--batch_sizes: 100000 is larger than the 60000 training "
                                "examples"),
    # Had timed jax's linear model against the Keras CNN: "124.47x".
    ("--config.model=linear --compare=keras", "--compare=keras trains the classic CNN in Keras, "
                                              "and config.model is 'linear'"),
    # The jax step flipped and shifted its images (since it is the config's own), Keras's not.
    ("--config.augment_flip=true --compare=keras", "--compare=keras trains the Keras twin in "
     "float32 with Adam, no augmentation or EMA, and the config has augment_flip=True"),
    # A mistyped folder had timed random images, exit 0, the table silent about it.
    ("--config.idx_dir=/no/such/idx", "IDX folder '/no/such/idx' does not exist"),
    # Each process of a pod had timed itself alone, and each written --output.
    ("--config.distributed=on", "the benchmark measures one process"),
    # Batch 8 had compiled first, then config.batch_size (not given) was blamed.
    ("--batch_sizes=8,9 JAX_NUM_CPU_DEVICES=2", "--batch_sizes: 9 does not divide by the 2 "
                                                "devices"),
    # The config's own sizes (the compile-cache, input and eval measures') were found after the
    # sweep: an error or a traceback, no JSON.
    ("--batch_sizes=6 JAX_NUM_CPU_DEVICES=3", "config.batch_size=16 does not divide by the 3"),
    ("--batch_sizes=6 --config.batch_size=6 JAX_NUM_CPU_DEVICES=3",
     "config.eval_batch_size=64 does not divide by the 3 devices"),
    ("--batch_sizes=16 --config.batch_size=70000", "config.batch_size=70000 is larger than the "
                                                   "60000 training examples; lower it"),
    # (Not "left after config.validation_size": the benchmark holds none out.)
    ("--batch_sizes=16 --config.batch_size=70000 --config.validation_size=5000",
     "config.batch_size=70000 is larger than the 60000 training examples; lower it")])
def test_benchmark_bad_input_is_one_line(tmp_path, flag, message):
  output = tmp_path / "b.json"
  flags = [f for f in flag.split() if f.startswith("--")]
  env = dict(f.split("=") for f in flag.split() if not f.startswith("--"))
  config = [] if flag.startswith("--config=") else ["--config=configs/tiny.py"]
  proc = run_module("fashion_jax.benchmark", *config, *flags, f"--output={output}", env=env)
  assert_one_line_error(proc, message)
  assert not output.exists()
  assert "jax  batch" not in proc.stderr  # Found before anything was timed.


def test_flag_and_config_mistakes_are_said_before_jax_starts(tmp_path):
  """They had been found after JAX's import (seconds); the data folder's is found later, as the
  data loads (the probe sees JAX there)."""
  output = tmp_path / "b.json"
  for flag, imported, says in [("--rounds=0", False, "--rounds=0 is invalid"),
                               ("--batch_sizes=8,x", False, "'x' is not a positive whole number"),
                               ("--config.batch_size=-4", False, "config.batch_size=-4 is invalid"),
                               ("--config.idx_dir=/no/such/idx", True, "IDX folder '/no/such/idx'")]:
    proc, jax_imported = run_module_noting_jax("fashion_jax.benchmark", "--config=configs/tiny.py",
                                               flag, f"--output={output}")
    assert proc.returncode == 2 and jax_imported == imported, (flag, proc.stderr[-2000:])
    assert says in proc.stderr and "Traceback" not in proc.stderr, (flag, proc.stderr[-2000:])
  assert not output.exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (not Linux)")
def test_a_write_that_fails_at_the_end_is_one_line_for_any_model(idx_dir):
  """/dev/full takes the JSON into a full disk: one line, not a traceback with training's
  "resumes from the last checkpoint". The linear model's JSON had failed to serialize (a NaN
  analytic FLOP count), a traceback after the whole run."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  # Asked first: code that replaced the path would make /dev/full a regular file (as root).
  assert storage.written_in_place("/dev/full")
  proc = run_module("fashion_jax.benchmark", "--config=configs/tiny.py", "--config.model=linear",
                    f"--config.idx_dir={idx_dir}", "--batch_sizes=8,08", "--windows=1",
                    "--window_seconds=0.05", "--compile_cache=false", "--output=/dev/full",
                    "--peak_gflops=100")  # Given: the peak's measurement is ~2 s, not tested here.
  assert_one_line_error(proc, "no space left where /dev/full is written (No space left on "
                        "device); free some space or pass another --output (the table above has "
                        "the results)")
  assert [l.split()[0] for l in proc.stdout.splitlines() if l.strip()[:1].isdigit()] == ["8"]
  assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_output_to_a_redirected_stdout_keeps_the_table(tmp_path):
  """--output=/dev/stdout into a file: the JSON is appended after the table (a replace had left
  the JSON alone), into a pipe it is written (the resolved /proc path had failed)."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  assert storage.written_in_place("/dev/stdout")  # Else, as root, the link would be replaced.
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "fashion_jax.benchmark", "--config=configs/tiny.py",
                           "--batch_sizes=8", "--windows=1", "--window_seconds=0.05",
                           "--compile_cache=false", "--peak_gflops=100", "--output=/dev/stdout"],
                          cwd=ROOT, stdout=f,
                          stderr=subprocess.PIPE, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = out.read_text()
  assert "best:" in text and json.loads(text[text.index("\n{") + 1:])["sweep"][0]["batch_size"] == 8


def test_output_dash_writes_the_json_alone_to_stdout(tmp_path):
  """--output=-: stdout is the JSON alone (`| jq`), the table on stderr (it wrote a file "-")."""
  proc = subprocess.run([sys.executable, "-m", "fashion_jax.benchmark",
                         f"--config={ROOT}/configs/tiny.py", "--batch_sizes=8", "--windows=1",
                         "--window_seconds=0.05", "--compile_cache=false", "--peak_gflops=100",
                         "--output=-"],
                        cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                     "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["sweep"][0]["batch_size"] == 8
  assert "best:" in proc.stderr and not (tmp_path / "-").exists()


@pytest.mark.parametrize("where,message", [
    ("a_file/b.json", "--output's folder"), ("", "is a folder; pass a file name"),
    ("s3://bucket/b.json", "s3:// folders are not supported")])
def test_an_output_it_cannot_write_is_refused_before_measuring(tmp_path, where, message):
  """Not after minutes of measurements (it was: a traceback at the end, the results lost)."""
  (tmp_path / "a_file").write_text("")
  output = where if "://" in where else str(tmp_path / where)
  proc = run_module("fashion_jax.benchmark", "--config=configs/tiny.py", f"--output={output}")
  assert_one_line_error(proc, message)


def test_compile_cache_measure_uses_its_own_cache(tmp_path, tiny_config, monkeypatch):
  """A cache the user set up (JAX_COMPILATION_CACHE_DIR) neither serves nor receives the measure.

  JAX opens its persistent cache once per process; before the fix, the benchmark's own folder was
  ignored once any compile had happened, so its "first compile" could be a hit in the user's cache.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
  from fashion_jax.benchmarking import benchmark  # pylint: disable=import-outside-toplevel
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=import-outside-toplevel

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  previous = {name: getattr(jax.config, name) for name in names}
  user_cache = tmp_path / "user_cache"
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  try:
    jax.config.update("jax_compilation_cache_dir", str(user_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    jax.jit(lambda x: x * 3 + 1)(1.0)  # Opens the user's cache.
    before = set(os.listdir(user_cache))
    assert before
    data = input_pipeline.load(tiny_config, "train", input_pipeline.source(tiny_config))
    result = benchmark.measure_compile_cache(tiny_config, parallel_lib.Parallel("none"), data)
    assert set(os.listdir(user_cache)) == before  # Nothing of the measure in the user's cache...
    assert result["compile_cache_entries"] >= 1  # ...it went to the benchmark's own folder.
    assert not os.listdir(scratch)  # Its folder is removed.
    jax.jit(lambda x: x * 5 - 2)(1.0)
    assert len(os.listdir(user_cache)) > len(before)  # The user's cache is back afterwards.
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def test_each_jax_log_line_is_printed_once():
  """jax 0.7.2 (Colab's) gives its loggers a stderr handler of their own: under absl's, each jax
  line came twice (on Colab's TPU runtime, "Unable to initialize backend" among the first)."""
  code = ("import logging\n"
          "import jax  # As every command does before its main.\n"
          "from absl import app\n"
          "from fashion_jax import cli\n"
          "def main(_):\n"
          "  cli.quiet_console()\n"
          "  logging.getLogger('jax._src.xla_bridge').warning('jax says this once')\n"
          "app.run(main)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.count("jax says this once") == 1, proc.stderr[-2000:]


def test_library_info_chatter_is_filtered_and_warnings_are_not():
  """jax printed "Resetting cache at ..." each time the compile measure switched caches (twice a
  benchmark) and "Unable to initialize backend 'tpu'" at every start, Orbax a few lines a save; their warnings, and this project's lines, still show."""
  import logging as logging_std  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  from jax._src import profiler  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  from fashion_jax import cli  # pylint: disable=import-outside-toplevel
  quiet = cli.QuietLibraries()

  def shown(path, level):
    return quiet.filter(logging_std.LogRecord("absl", level, path, 1, "m", None, None))

  for chatter in (compilation_cache.__file__, orbax.checkpoint.__file__, xla_bridge.__file__,
                  profiler.__file__):  # (--profile: "Loading trace.json.gz ...")
    assert not shown(chatter, logging_std.INFO) and shown(chatter, logging_std.WARNING)
  assert shown(cli.__file__, logging_std.INFO)


def test_an_unavailable_sources_reason_is_cut_with_an_ellipsis():
  """The summary cut the reason at 80 characters, mid-address ("http://fashion-mni)")."""
  from fashion_jax.benchmarking import benchmark_report  # pylint: disable=import-outside-toplevel
  reason = "could not download fashion_mnist (a.gz): http://" + "x" * 200 + "\nsecond line"
  short = benchmark_report._short(reason)  # pylint: disable=protected-access
  assert len(short) == 160 and short.endswith("…") and "second" not in short
  assert benchmark_report._short("not prepared") == "not prepared"  # pylint: disable=protected-access


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("delay", [0.0, 0.4, 1.0, 3.0])
def test_an_interrupt_at_any_point_is_one_line_exit_130(tmp_path, delay):
  """Ctrl-C while JAX imported (swallowed: the benchmark ran on to exit 0; or an ImportError,
  exit 1) or while XLA compiled (a segfault at exit, -11): now one line, exit 130, and the
  --output there before is kept whole."""
  from tests.test_preemption import _holds_its_interrupts  # pylint: disable=import-outside-toplevel
  output = tmp_path / "b.json"
  output.write_text('{"kept": 1}\n')
  proc = subprocess.Popen(
      [sys.executable, "-m", "fashion_jax.benchmark", "--config=configs/tiny.py",
       "--batch_sizes=8,16,32,64", "--windows=3", "--window_seconds=0.5",  # Still running at 3 s.
       "--compile_cache=false", f"--output={output}"], cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  deadline = time.monotonic() + 60
  while not _holds_its_interrupts(proc.pid) and time.monotonic() < deadline:
    time.sleep(0.005)
  time.sleep(delay)  # Into its imports (absl, JAX), the backend's start, the compiles...
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
  assert "Fatal Python error" not in stderr, stderr[-3000:]
  ours = [l for l in stderr.splitlines() if l.startswith("fashion_jax: ")]
  assert ours == ["fashion_jax: error: interrupted before it finished; what it had saved stays (a "
                  "training run resumes from its latest checkpoint when re-run)"], stderr[-3000:]
  assert output.read_text() == '{"kept": 1}\n'


def test_an_interrupt_in_the_timed_loop_is_an_interrupt(tmp_path, tiny_config, monkeypatch):
  """Training holds Ctrl-C while --loop runs it and stops with stops.Preempted: that had been a
  traceback, exit 1, saying to resume from a checkpoint in the loop's folder, already removed."""
  from fashion_jax.benchmarking import train_rates  # pylint: disable=import-outside-toplevel
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=import-outside-toplevel
  from fashion_jax.training import stops, train  # pylint: disable=import-outside-toplevel

  runs = []

  def stopped(config, *args, **kwargs):
    del args, kwargs
    runs.append(config)
    raise stops.Preempted("stopped by SIGINT at step 3; checkpoint saved in ...")

  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  monkeypatch.setattr(train, "train_and_evaluate", stopped)
  data = input_pipeline.load(tiny_config, "train", input_pipeline.source(tiny_config))
  with pytest.raises(KeyboardInterrupt):
    train_rates.measure_loop(tiny_config, parallel_lib.Parallel("none"), data, "device", 1e4, 1,
                             0.01)
  assert not os.listdir(scratch)  # The loop's folder is removed.
  # A recipe's warm-up (configs/accelerator_best.py: 500 steps) is longer than the timed run,
  # which config_lib warns about: the loop times the run without one (the same work a step).
  tiny_config.warmup_steps, tiny_config.lr_schedule = 500, "cosine"
  with pytest.raises(KeyboardInterrupt):
    train_rates.measure_loop(tiny_config, parallel_lib.Parallel("none"), data, "device", 1e4, 1,
                             0.01)
  assert [run.warmup_steps for run in runs] == [0, 0] and runs[1].lr_schedule == "cosine"


def test_batch_sizes_parse():
  """Empty: the config's; each size once, in order; a list of only commas is an error (it had
  timed config.batch_size as if --batch_sizes were not given)."""
  from fashion_jax.benchmarking import checks  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  assert checks.parse_batch_sizes("", 32) == checks.parse_batch_sizes("  ", 32) == [32]
  assert checks.parse_batch_sizes(" 16, 8,,016 ", 32) == [16, 8]
  for text in (",", " , ,"):
    with pytest.raises(UserError, match="names no batch size"):
      checks.parse_batch_sizes(text, 32)


def test_the_timed_step_is_the_configs_own(tiny_config, monkeypatch):
  """The sweep (and --loop's pure window, the compile measure) had timed the bare train step:
  configs/cpu_best.py's flips and shifts and label smoothing, accelerator_best.py's EMA left out
  of the rates (and --loop's "host work" counting them). It is the step training runs."""
  from fashion_jax.benchmarking import train_rates  # pylint: disable=import-outside-toplevel
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from fashion_jax.model import steps  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=import-outside-toplevel
  traced = []
  real_step = steps.train_step

  def train_step(state, batch, **kwargs):
    traced.append(kwargs)
    return real_step(state, batch, **kwargs)

  monkeypatch.setattr(steps, "train_step", train_step)
  config = tiny_config.copy_and_resolve_references()
  config.update(augment_flip=True, augment_translate=1, label_smoothing=0.1, ema_decay=0.99)
  data = input_pipeline.load(config, "train", input_pipeline.source(config))
  timed = train_rates.TrainStep(config, parallel_lib.Parallel("none"), data, 8)
  assert traced and traced[-1]["augment"] is not None
  assert (traced[-1]["label_smoothing"], traced[-1]["ema_decay"]) == (0.1, 0.99)
  assert timed.state.ema_params is not None
  timed.measure(1, 0.01)  # And it runs.


def test_the_json_names_the_cpu_type_its_model_name_does_not():
  """These VMs' cpuinfo says "AMD EPYC" for Zen 3, Zen 4 and Zen 5 alike (issue 17's table tells
  them apart by lscpu's family and model): the JSON had only that name and the ISA flags, which
  Zen 4 and Zen 5 share."""
  from fashion_jax.benchmarking import benchmark_report  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel as parallel_lib  # pylint: disable=import-outside-toplevel
  x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
         "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
  assert benchmark_report.cpu_id(x86) == "AuthenticAMD family 25 model 17 stepping 1"
  arm = ("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
         "CPU variant\t: 0x1\nCPU part\t: 0xd40\nCPU revision\t: 1\n")
  assert benchmark_report.cpu_id(arm) == "implementer 0x41 part 0xd40 variant 0x1 revision 1"
  assert benchmark_report.cpu_id("") is None
  env = benchmark_report.environment(parallel_lib.Parallel("none"))
  assert env["cpu_id"] == benchmark_report.cpu_id()
  line = benchmark_report.cpu_line(dict(env, cpu="CPU", cpu_count=2, cpu_count_machine=2,
                                        cpu_isa="avx2", cpu_id="GenuineIntel family 6 model 167"))
  assert line.startswith("CPU (2 cores; avx2; GenuineIntel family 6 model 167); native kernels: ")


def test_help_documents_the_exit_statuses():
  proc = run_module("fashion_jax.benchmark", "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Exit status: 0 " in proc.stdout and "; 2 a problem with the input" in proc.stdout
  assert "130 Ctrl-C" in proc.stdout and "1 a crash" in proc.stdout


def test_the_download_source_without_a_home_folder_is_reported_unavailable(tiny_config,
                                                                          monkeypatch):
  """No home folder (HOME unset for a uid without a passwd entry) and no FASHION_JAX_CACHE_DIR:
  the download source's default folder raised out of measure_input, after every other
  measurement had run, and the report was lost. Now that source is unavailable, saying why."""
  from fashion_jax.benchmarking import benchmark  # pylint: disable=g-import-not-at-top
  for name in ("HOME", "XDG_CACHE_HOME", "FASHION_JAX_CACHE_DIR"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # As for a uid not in passwd.
  config = tiny_config.copy_and_resolve_references()
  config.data_dir = ""
  result = benchmark.measure_input(config, None, "download")
  assert result["available"] is False and "set FASHION_JAX_CACHE_DIR" in result["reason"], result
