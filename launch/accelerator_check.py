r"""What fashion_jax does on one GPU or TPU chip, measured in one run and written to one JSON file.

  launch/accelerator_check.sh IDX_DIR [OUTPUT.json]      # or: python launch/accelerator_check.py

Needs only a preinstalled JAX stack (jax, flax, optax, orbax-checkpoint), the pure-Python
ml-collections and tensorboardX, and a Fashion-MNIST IDX folder: no network. Each stage runs
the project's own commands in fresh processes and is written to the JSON as soon as it ends, so
a run cut short by its time budget (--budget_s, default 540) still reports what it measured:

  devices     backend, device kind and count, versions
  default     configs/default.py per data placement (device, host): wall time from process start
              to the final eval, test accuracy, compile time, first eval's seconds, loop images/s;
              then the device run once more in a new workdir. One persistent compilation cache,
              fresh for this check, serves every stage: the first run compiles everything, the
              host run and the rerun load what it compiled
  tests       pytest -m "gpu or tpu": every placement x parallelism against host placement
  speedrun    configs/speedrun_cpu.py with the data on the device: time to 91 % test accuracy
  benchmark   pure-step and real-loop images/s, MFU against the chip's peak, compile times
              (python -m fashion_jax.benchmark --loop): float32 at batch 128..8192 with the data on
              the host and on the device, bfloat16 at 512..8192 on the device

Exit status: 0 done (a stage's own failure is in the JSON); 2 bad input, or no accelerator;
128+N stopped by signal N (INT, TERM, HUP), the running stage's processes with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, log_path, timeout, env=None):
  """Runs `python args...` from the repository root; (exit status or 'timeout', seconds)."""
  start = time.monotonic()
  with open(log_path, "w") as log:
    # In a session of its own: a stage out of time goes with everything it started (a compiler
    # building the native kernels outlived it, competing with the stages timed after it).
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    try:
      status = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      status = "timeout"
    except BaseException:  # Interrupted: the stage goes too.
      os.killpg(proc.pid, signal.SIGKILL)
      raise
  return status, time.monotonic() - start


def _fail(message: str):
  print(f"accelerator_check: error: {message}", file=sys.stderr)
  sys.exit(2)


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _tail(path, lines=5):
  with open(path, errors="replace") as f:
    return f.read().splitlines()[-lines:]


class Check:
  def __init__(self, output, budget_s):
    self.output = output
    self.deadline = time.monotonic() + budget_s
    self.results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "budget_s": budget_s, "stages": {}}

  def remaining(self):
    return self.deadline - time.monotonic()

  def record(self, stage, value):
    self.results["stages"][stage] = value
    self.results["elapsed_s"] = round(self.results["budget_s"] - self.remaining(), 1)
    with open(self.output + ".tmp", "w") as f:
      json.dump(self.results, f, indent=2)
      f.write("\n")
    os.replace(self.output + ".tmp", self.output)
    print(f"[accelerator_check {self.results['elapsed_s']:6.1f}s] {stage}: "
          f"{json.dumps(value)[:300]}", flush=True)

  def stage(self, name, cap_s, fn):
    timeout = min(cap_s, self.remaining() - 5)
    if timeout < 20:
      self.record(name, {"skipped": f"out of time budget ({self.remaining():.0f}s left)"})
      return
    try:
      self.record(name, fn(timeout))
    except Exception as e:  # pylint: disable=broad-except  (report, go on with the next stage)
      self.record(name, {"error": f"{type(e).__name__}: {e}"})


def devices(timeout):
  code = ("import jax, json, importlib.metadata as m\n"
          "def v(n):\n"
          "  try: return m.version(n)\n"
          "  except m.PackageNotFoundError: return None\n"
          "d = jax.devices()\n"
          "print(json.dumps({'backend': jax.default_backend(), 'device_kind': d[0].device_kind,"
          " 'device_count': len(d), 'versions': {n: v(n) for n in ('jax', 'jaxlib', 'flax',"
          " 'optax', 'orbax-checkpoint', 'numpy', 'jax-cuda12-plugin', 'jax-cuda13-plugin',"
          " 'libtpu')}}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, check=True)
  return json.loads(out.stdout.splitlines()[-1])


def train_run(config, idx_dir, work, name, timeout, *flags):
  workdir = os.path.join(work, name)
  log = os.path.join(work, f"{name}.log")
  status, seconds = _run(["-m", "fashion_jax.main", f"--config={config}", f"--workdir={workdir}",
                          f"--config.idx_dir={idx_dir}", "--config.progress_bar=off", *flags],
                         log, timeout)
  lines = _metrics(workdir)
  evals = [l for l in lines if "eval_accuracy" in l]
  rates = [l["train_images_per_sec"] for l in lines if "train_images_per_sec" in l]
  with open(log, errors="replace") as f:
    text = f.read()
  compiles = [float(s) for s in re.findall(r"compiled and ran the \d+-step train window in "
                                           r"([\d.]+)s", text)]
  # The first eval's seconds: ~0.1 when its program was compiled during the first windows.
  eval_seconds = [float(s) for s in re.findall(r"eval  step .*\| ([\d.]+)s for \d+ images", text)]
  result = {"status": status, "process_seconds": round(seconds, 1),
            "wall_time_s": evals[-1]["wall_time_s"] if evals else None,
            "eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "evals": [(l["step"], round(l["eval_accuracy"], 4), l["wall_time_s"]) for l in evals],
            "train_images_per_sec_median": sorted(rates)[len(rates) // 2] if rates else None,
            "compile_s": compiles, "first_eval_s": eval_seconds[:1],
            "placement_line": re.findall(r"train loop: .*", text)[:1]}
  if status != 0:
    result["log_tail"] = _tail(log)
  return result


def main():
  parser = argparse.ArgumentParser(prog="accelerator_check", description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", default=os.environ.get("FASHION_JAX_IDX_DIR", ""))
  parser.add_argument("--output", default="accelerator_check.json")
  parser.add_argument("--budget_s", type=float, default=540)
  parser.add_argument("--batch_sizes", default="128,512,2048,8192")
  parser.add_argument("--bf16_batch_sizes", default="512,2048,8192")
  parser.add_argument("--allow_cpu", action="store_true",
                      help="run on the CPU when JAX finds no accelerator (a dry run of the check)")
  args = parser.parse_args()
  if not args.idx_dir or not os.path.isdir(args.idx_dir):
    _fail(f"--idx_dir={args.idx_dir!r} is not a folder; pass the folder holding the four "
          "Fashion-MNIST IDX files (or set FASHION_JAX_IDX_DIR)")
  idx_dir = os.path.abspath(args.idx_dir)
  output = os.path.abspath(args.output)
  if not args.budget_s >= 25:  # A stage needs 20 s and a 5 s margin (Check.stage).
    _fail(f"--budget_s={args.budget_s:g} (BUDGET_S) leaves no time for the first stage; give "
          "it at least 25 seconds (default 540)")  # (It blamed the chip: 'JAX found no GPU'.)
  if os.path.isdir(output):  # (The first stage's write failed with a traceback, exit 1.)
    _fail(f"--output={args.output} is a folder; pass the JSON file's path, e.g. "
          f"{os.path.join(args.output, 'accelerator_check.json')}")
  if not (os.path.isdir(os.path.dirname(output)) and os.access(os.path.dirname(output), os.W_OK)):
    _fail(f"--output={args.output}: its folder {os.path.dirname(output)} does not exist or is not "
          "writable; pass a path in a folder you can write")
  check = Check(output, args.budget_s)
  check.stage("devices", 120, devices)
  backend = check.results["stages"]["devices"].get("backend")
  if backend in ("cpu", None) and not args.allow_cpu:
    _fail(f"JAX found no GPU or TPU (backend: {backend or 'unknown'}; see {output}): check that "
          "the chip's plugin (jax-cuda12-plugin, libtpu) matches jax, or pass --allow_cpu for a "
          "dry run on the CPU")
  # The stages' logs and workdirs, made only now (a refused run leaves no empty folder behind).
  work = tempfile.mkdtemp(prefix="fashion_jax_accelerator_check_")
  # A fresh cache root (mkdtemp: this user's alone) for every command it runs: the first run
  # compiles everything, as on a new machine; the rerun stage shows what the cache saves.
  os.environ["FASHION_JAX_CACHE_DIR"] = os.path.join(work, "cache")
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  check.results["work_dir"] = work
  for placement in ("device", "host"):
    check.stage(f"default_{placement}", 150, lambda t, p=placement: train_run(
        "configs/default.py", idx_dir, work, f"default_{p}", t, f"--config.data_placement={p}"))
  check.stage("default_rerun", 90, lambda t: train_run(
      "configs/default.py", idx_dir, work, "default_rerun", t, "--config.data_placement=device"))

  def tests(timeout):
    log = os.path.join(work, "tests.log")
    if importlib.util.find_spec("pytest") is None:
      return {"skipped": "pytest is not installed"}
    # One process (no -n): xdist workers would each take most of the chip's memory.
    status, seconds = _run(["-m", "pytest", "-q", "-o", "addopts=-ra", "-m", "gpu or tpu",
                            "tests/test_accelerator.py"], log, timeout)
    return {"status": status, "seconds": round(seconds, 1), "summary": _tail(log, 3)}
  check.stage("tests", 150, tests)

  def speedrun(timeout):
    result = train_run("configs/speedrun_cpu.py", idx_dir, work, "speedrun", timeout,
                       "--config.data_placement=device")
    reached = [e for e in result["evals"] if e[1] >= 0.91]
    result["time_to_91_s"] = reached[0][2] if reached else None
    return result
  check.stage("speedrun", 120, speedrun)
  # Caps from an H200 (session 21): float32 took ~215 s; bfloat16, now 3 sizes on the device
  # only, ~110 s by its measured parts (~21 s a size compiling, ~13 s a loop run).
  for dtype, sizes, variants, cap in (("float32", args.batch_sizes, "host,device", 250),
                                      ("bfloat16", args.bf16_batch_sizes, "device", 160)):
    def benchmark(timeout, dtype=dtype, sizes=sizes, variants=variants):
      out = os.path.join(work, f"benchmark_{dtype}.json")
      log = os.path.join(work, f"benchmark_{dtype}.log")
      status, seconds = _run(
          ["-m", "fashion_jax.benchmark", "--config=configs/default.py",
           f"--config.idx_dir={idx_dir}", f"--config.compute_dtype={dtype}",
           f"--batch_sizes={sizes}", "--loop", f"--loop_variants={variants}",
           "--windows=3", "--window_seconds=0.5", "--compile_cache=false", f"--output={out}"],
          log, timeout)
      if status != 0 or not os.path.exists(out):  # Keep what it measured before it stopped.
        with open(log, errors="replace") as f:
          measured = [line.strip() for line in f if line.startswith("[benchmark")]
        return {"status": status, "measured": measured, "log_tail": _tail(log)}
      with open(out) as f:
        bench = json.load(f)
      keep = ("train_images_per_sec", "best_batch_size", "mfu", "hfu", "peak_gflops_per_device",
              "peak_source", "flops_per_image", "eval_images_per_sec", "compile_s")
      return {"status": status, "seconds": round(seconds, 1), **{k: bench.get(k) for k in keep},
              "sweep": [{"batch_size": r["batch_size"],
                         "step_images_per_sec": r["train_images_per_sec"]["median"],
                         "compile_s": r["compile_s"]} for r in bench["sweep"]],
              "loop": bench.get("loop", [])}
    check.stage(f"benchmark_{dtype}", cap, benchmark)

  print(f"wrote {output}")


class _Stop(BaseException):
  """SIGINT, SIGTERM or SIGHUP (Ctrl-C, timeout, kill, a closed ssh session, a job manager),
  raised where the check waits: the running stage's process group goes too (_run). Python's
  default for the last two ended the check alone, and the stage, in a session of its own, held
  the chip on."""

  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop(signum, _frame):
  for each in _STOPS:  # Once: a second signal inside _run's cleanup would skip its killpg.
    signal.signal(each, signal.SIG_IGN)
  raise _Stop(signum)


if __name__ == "__main__":
  for signum in _STOPS:
    if signal.getsignal(signum) is not signal.SIG_IGN:  # (nohup's ignored hang-up stays so.)
      signal.signal(signum, _stop)
  try:
    main()
  except (KeyboardInterrupt, _Stop) as e:  # (Ctrl-C printed a traceback.)
    for each in _STOPS:
      signal.signal(each, signal.SIG_IGN)
    signum = e.signum if isinstance(e, _Stop) else signal.SIGINT
    try:
      print(f"accelerator_check: stopped by {signal.Signals(signum).name}; the stages it "
            "finished are in its --output JSON", file=sys.stderr)
    except OSError:  # (After a hang-up: no terminal left.)
      pass
    sys.exit(128 + signum)
