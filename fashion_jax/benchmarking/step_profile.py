"""The train step's time op by op (`python -m fashion_jax.benchmark --profile`).

Runs the compiled step under `jax.profiler.trace`, reads the trace's op events (those named
after an instruction of the compiled program: XLA's fusions, copies, the native kernels' custom
calls) and reports, per op, its time a step, its share of the step and, for fashion_jax's native
kernels, the FLOP/s it executes and their share of the device's peak: where the step's time goes
on this machine, and how close each kernel runs to the hardware. An op's time a step is the
median of its calls times their number a step (a shared machine stalls a call now and then: the
mean is in the JSON too); op times are summed over the threads and devices that ran them (ops
that overlap on two cores add up to more than the step).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time

from fashion_jax.benchmarking import benchmark_report
from fashion_jax.benchmarking import flops
from fashion_jax.support import runtime

TOP_OPS = 12  # Ops listed; the rest are summed as one line.


def op_times(events, names: set[str], module: str | None = None) -> dict[str, list[float]]:
  """The durations (microseconds) of each op's calls in a trace's events: complete events
  ("ph": "X") of one of the program's instructions (`names`): the event's `hlo_op` argument
  where it has one (XLA's CPU thunks do; its profiler gives GPU kernels, named after the kernel,
  the same stat: not tried on a GPU here), else its name. Where an event names its HLO module,
  it must be `module` (the program's)."""
  durations = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    args = e.get("args") if isinstance(e.get("args"), dict) else {}
    op = args.get("hlo_op", e.get("name"))
    if op in names and (module is None or args.get("hlo_module", module) == module):
      durations[op].append(float(e["dur"]))
  return dict(durations)


def read_trace(folder: str) -> list[dict]:
  """The events of the Perfetto trace `jax.profiler.trace(..., create_perfetto_trace=True)` wrote
  under `folder`."""
  found = glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise RuntimeError("the profiler wrote no Perfetto trace")
  with gzip.open(found[0], "rt") as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarize(durations: dict[str, list[float]], calls: dict, steps: int, step_ms: float,
              peak_gflops: float) -> list[dict]:
  """Per op, slowest first: ms a step (the median call's times the calls a step), share of the
  step, and for the native kernels (`calls`: flops.kernel_calls) GFLOP/s while the median call
  runs and that as a share of `peak_gflops`."""
  rows = []
  for name, us in durations.items():
    target, call_flops = calls.get(name, ("xla", None))
    median_us, per_step = statistics.median(us), len(us) / steps
    ms = median_us * per_step / 1000
    row = {"op": name, "kind": target, "ms_per_step": ms, "calls_per_step": per_step,
           "mean_ms_per_step": sum(us) / 1000 / steps,
           "share_of_step": ms / step_ms if step_ms > 0 else None, "gflops": None,
           "share_of_peak": None}
    if call_flops and median_us > 0:
      row["gflops"] = call_flops / (median_us * 1e-6) / 1e9
      row["share_of_peak"] = row["gflops"] / peak_gflops if peak_gflops > 0 else None
    rows.append(row)
  return sorted(rows, key=lambda r: -r["ms_per_step"])


def profile(train_step, steps: int, peak_gflops: float) -> dict:
  """Profiles `steps` calls of a benchmark TrainStep (train_rates.TrainStep) after one warm
  call. `peak_gflops`: the peak of all the devices together. Returns {"available": False,
  "reason": ...} where the profiler cannot run here."""
  import jax  # pylint: disable=g-import-not-at-top

  folder = runtime.scratch(tempfile.mkdtemp(prefix="fashion_jax_profile_"))
  try:
    batches, state = train_step.batches, train_step.state
    state, out = train_step.compiled(state, batches[0])
    jax.block_until_ready(out)
    # The step's time: the traced steps after the first, which carries the profiler's start (on
    # jax 0.7.2 one such step took 2-5x the others: 4 steps at batch 16 timed 3.9-9.2 ms a step,
    # their ops 1.6-1.8 ms).
    timed = max(1, steps - 1)
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for i in range(steps):
        if i == steps - timed:
          jax.block_until_ready(state)
          t0 = time.perf_counter()
        state, out = train_step.compiled(state, batches[i % len(batches)])
      jax.block_until_ready(out)
      step_ms = (time.perf_counter() - t0) / timed * 1000
    train_step.state = state
    events = read_trace(folder)
  except Exception as e:  # pylint: disable=broad-except
    reason = f"{type(e).__name__}: {e}"
    benchmark_report.log(f"profile: unavailable: {reason}")
    return {"available": False, "reason": reason}
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  text = train_step.compiled.as_text()
  durations = op_times(events, flops.instruction_names(text), flops.module_name(text))
  if not durations:
    reason = "the trace has no events named after the program's ops on this backend"
    benchmark_report.log(f"profile: unavailable: {reason}")
    return {"available": False, "reason": reason}
  ops = summarize(durations, flops.kernel_calls(text), steps, step_ms, peak_gflops)
  benchmark_report.log(f"profile: batch {train_step.batch_size}, {steps} steps, "
                       f"{step_ms:.3f} ms a step under the profiler, {len(ops)} ops")
  return {"available": True, "batch_size": train_step.batch_size, "steps": steps,
          "step_ms": step_ms, "ops_ms_per_step": sum(o["ms_per_step"] for o in ops),
          "peak_gflops": peak_gflops, "ops": ops}


def format_profile(p: dict) -> str:
  """The profile as a table (stdout)."""
  if not p.get("available"):
    return f"profile: unavailable ({p.get('reason')})"
  lines = [f"profile (batch {p['batch_size']}, {p['steps']} steps under jax.profiler: "
           f"{p['step_ms']:.3f} ms a step; ops sum to {p['ops_ms_per_step']:.3f} ms, "
           "summed over threads and devices, each the median call x calls a step; " +
           (f"% peak of {p['peak_gflops']:,.0f} GFLOP/s):" if p["peak_gflops"] > 0 else
            "no known peak):"),
           f"  {'op':<28} {'kind':<34} {'ms/step':>8} {'% step':>7} {'GFLOP/s':>8} {'% peak':>7}"]
  for o in p["ops"][:TOP_OPS]:
    gflops = f"{o['gflops']:8,.0f}" if o["gflops"] is not None else f"{'':8}"
    peak = f"{100 * o['share_of_peak']:6.1f}%" if o["share_of_peak"] is not None else f"{'':7}"
    share = f"{100 * o['share_of_step']:6.1f}%" if o["share_of_step"] is not None else f"{'':7}"
    lines.append(f"  {o['op'][:28]:<28} {o['kind'][:34]:<34} {o['ms_per_step']:8.3f} {share} "
                 f"{gflops} {peak}")
  rest = p["ops"][TOP_OPS:]
  if rest:
    ms = sum(o["ms_per_step"] for o in rest)
    share = 100 * ms / p["step_ms"] if p["step_ms"] > 0 else float("nan")
    lines.append(f"  {f'{len(rest)} other ops':<28} {'':<34} {ms:8.3f} {share:6.1f}%")
  return "\n".join(lines)
