"""Data parallelism on fake CPU devices: every mode computes what one device computes."""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, run_module
from fashion_jax.support.errors import UserError
from fashion_jax.support import compile_ahead
from fashion_jax.support import parallel


def _run_check(tmp_path, idx_dir, devices, *modes):
  proc = run_module("tests.multidevice_check", ROOT, idx_dir, str(tmp_path), *modes,
                    env={"JAX_NUM_CPU_DEVICES": str(devices)})
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


# Each parallelism with each data placement (on the device, "auto", or numpy batches from the
# host); one of each in the default run, the other two with -m slow (the suite's time budget).
@pytest.mark.parametrize("modes", [("mesh", "pmap:host"),
                                   pytest.param(("pmap", "mesh:host"), marks=pytest.mark.slow)])
def test_mesh_and_pmap_match_one_device(tmp_path, idx_dir, modes):
  """4 devices, a BatchNorm model: every mode computes what one device computes.

  BatchNorm makes this strict: under pmap the batch statistics must come from
  the global batch (synchronised BatchNorm), or the losses differ at once
  (1.19 vs 1.07 at the first log line without it). Dropout and augmentation under pmap (each
  device had drawn its own: parameters 1.7e-2 from mesh's) are checked exactly, draw by draw,
  in test_recipes.py.
  """
  result = _run_check(tmp_path, idx_dir, 4, "model=cnn_bn", "none", *modes)
  assert result["device_count"] == 4
  reference = result["none"]
  for mode in modes:
    assert result[mode]["losses"] == pytest.approx(reference["losses"], rel=2e-3), mode
    assert result[mode]["max_param_diff"] < 2e-3, (mode, result[mode])  # Unsynced pmap: ~3e-2.
    assert result[mode]["max_batch_stats_rel_diff"] < 1e-2, (mode, result[mode])  # Unsynced: ~1.
    assert result[mode]["eval_accuracy"] == reference["eval_accuracy"]


def test_batch_must_divide_by_devices():
  par = parallel.Parallel("none")
  par.devices = [None] * 8  # Only the count matters to the check.
  with pytest.raises(UserError, match=r"batch_size=12 does not divide by the 8 devices.*8 or 16"):
    par.check_batch(12, "batch_size")
  assert par.check_batch(32, "batch_size")["per_device"] == 4


@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_non_divisible_batch_is_a_clear_cli_error(tmp_path, idx_dir, key):
  """Refused before anything is written: eval_batch_size had been checked after the data loaded
  and config.json was written (a refused resume recorded a run that never happened)."""
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    f"--config.idx_dir={idx_dir}", f"--config.{key}=12",
                    "--config.parallelism=mesh", env={"JAX_NUM_CPU_DEVICES": "8"}, timeout=300)
  assert proc.returncode == 2
  assert f"config.{key}=12 does not divide by the 8 devices" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_native_kernels_under_a_multi_device_mesh_are_refused(tmp_path, idx_dir):
  """They ran on the whole global batch on every device (an all-gather fed them), silently."""
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    f"--config.idx_dir={idx_dir}", "--config.conv_impl=native",
                    "--config.parallelism=mesh", env={"JAX_NUM_CPU_DEVICES": "2"}, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("config.conv_impl='native' under parallelism=mesh on 2 devices would run every "
          "device's native kernels on the whole global batch") in proc.stderr
  assert not (tmp_path / "w").exists()
  # The benchmark too, before its sweep (it had timed N x the work, then refused in --loop).
  proc = run_module("fashion_jax.benchmark", "--config=configs/tiny.py", "--config.conv_impl=native",
                    "--config.parallelism=mesh", f"--output={tmp_path / 'b.json'}",
                    env={"JAX_NUM_CPU_DEVICES": "2"}, timeout=300)
  assert proc.returncode == 2 and "would run every device's native kernels" in proc.stderr
  assert "jax  batch" not in proc.stderr  # Nothing measured.


def test_resume_under_another_mode(tmp_path, idx_dir):
  """A checkpoint written under pmap on 4 devices resumes under mesh on 2 (one logical copy)."""
  common = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.idx_dir={idx_dir}"]
  first = run_module("fashion_jax.main", *common, "--config.parallelism=pmap",
                     "--config.num_train_steps=10", env={"JAX_NUM_CPU_DEVICES": "4"})
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_module("fashion_jax.main", *common, "--config.parallelism=mesh",
                      env={"JAX_NUM_CPU_DEVICES": "2"})
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint at step 10" in second.stderr


class _Counted:
  """A compiled function that counts the calls that reach it (not its ahead-of-time program)."""

  def __init__(self, fn, lower_error=None):
    self.fn, self.calls, self.lower_error = fn, 0, lower_error

  def lower(self, *args):
    if self.lower_error:
      raise self.lower_error
    return self.fn.lower(*args)

  def __call__(self, *args):
    self.calls += 1
    return self.fn(*args)


def _sum_program(par):
  def total(state, batch, axis_name=None):
    s = (state["w"] * batch["x"]).sum()
    return jax.lax.psum(s, axis_name) if axis_name else s

  def train(state, batch, axis_name=None):  # Donates the state, as the train windows do.
    return {"w": state["w"] + 1}, batch["x"].sum()
  return par.compile(total, donate_state=False), par.compile(train)


@pytest.mark.parametrize("mode", ["none", "mesh", "pmap"])
def test_compiled_ahead_runs_its_own_program_after_the_state_was_donated(mode):
  par = parallel.Parallel(mode)
  total, train = _sum_program(par)
  state = par.put_state({"w": np.ones(4, np.float32)})
  batch = par.put_batch({"x": np.arange(32, dtype=np.float32).reshape(8, 4)})
  counted = _Counted(total)
  ahead = compile_ahead.CompiledAhead(counted, state, batch)
  state, _ = train(state, batch)  # The buffers the thread was given the shapes of are gone.
  assert float(par.fetch(ahead(state, batch))) == 2 * np.arange(32).sum()
  assert ahead.ready and ahead.ran_ahead and counted.calls == 0  # The background's program ran.
  # Other shapes: the function itself (compiled for them then), and said (the train loop times
  # that call as a compile).
  other = par.put_batch({"x": np.ones((16, 4), np.float32)})
  assert float(par.fetch(ahead(state, other))) == 2 * 64
  assert counted.calls == 1 and not ahead.ran_ahead


def test_compiled_ahead_that_failed_compiles_at_the_first_call():
  par = parallel.Parallel("none")
  total, _ = _sum_program(par)
  state = par.put_state({"w": np.ones(4, np.float32)})
  batch = par.put_batch({"x": np.ones((8, 4), np.float32)})
  counted = _Counted(total, lower_error=RuntimeError("out of memory"))
  ahead = compile_ahead.CompiledAhead(counted, state, batch)
  assert not ahead.ready
  assert float(par.fetch(ahead(state, batch))) == 32
  assert counted.calls == 1 and not ahead.ran_ahead


def test_compiles_queued_ahead_and_cancelled_are_skipped_and_the_running_one_finishes():
  """A run that ends early (a stop, an error) waits for the compile running, not for every
  window length queued after it (seven had held a stop for 10 s on a CPU)."""
  par = parallel.Parallel("none")
  total, _ = _sum_program(par)
  state = par.put_state({"w": np.ones(4, np.float32)})
  batch = par.put_batch({"x": np.ones((8, 4), np.float32)})
  started, release = threading.Event(), threading.Event()

  class Slow(_Counted):
    def lower(self, *args):
      started.set()
      release.wait(60)
      return super().lower(*args)

  first, second = Slow(total), _Counted(total, lower_error=AssertionError("compiled anyway"))
  running = compile_ahead.CompiledAhead(first, state, batch)
  queued = compile_ahead.CompiledAhead(second, state, batch, after=running)
  assert started.wait(60) and running.pending and queued.pending  # Queued: waits for the first.
  for program in (running, queued):
    program.cancel()
  release.set()
  assert running.ready and not queued.ready  # The running one finished; the other never began.
  assert float(par.fetch(queued(state, batch))) == 32 and second.calls == 1  # Compiles on use.


_EXIT_WHILE_COMPILING = """
import sys
import threading
import jax, jax.numpy as jnp, numpy as np
from fashion_jax.support import compile_ahead
from fashion_jax.support import parallel

def long_to_compile(state, batch, axis_name=None):
  x = batch["x"]
  for i in range(300):
    x = jnp.sin(x @ state["w"]) + i
  return x.sum()

class Signalling:  # Says when XLA's compile (~1 s) begins.
  def __init__(self, fn):
    self.fn, self.compiling = fn, threading.Event()

  def lower(self, *args):
    lowered, compiling = self.fn.lower(*args), self.compiling
    class Lowered:
      def compile(self):
        compiling.set()
        return lowered.compile()
    return Lowered()

par = parallel.Parallel("none")
program = Signalling(par.compile(long_to_compile, donate_state=False))
ahead = compile_ahead.CompiledAhead(program, par.put_state({"w": np.ones((64, 64), np.float32)}),
                                    par.put_batch({"x": np.ones((8, 64), np.float32)}))
program.compiling.wait()
sys.exit(3)  # An error exit (a refused config, a stop) while the thread compiles.
"""


def test_exiting_while_compiling_ahead_keeps_the_exit_status():
  """A daemon compile thread still inside XLA when the interpreter shut down aborted the
  process ("terminate called ...", status 134) instead of its documented exit status."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false"}
  proc = subprocess.run([sys.executable, "-c", _EXIT_WHILE_COMPILING], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("mode", ["none", "mesh", "pmap"])
def test_a_state_already_in_its_placement_is_not_copied_again(mode):
  """A resume restores the state into its replicated placement; put_state then copied each array
  through the host again (on a GPU: a device-host round trip, two copies of the state at the
  peak). Arrays placed otherwise, and every array under pmap (stacked per device), are still
  placed."""
  par = parallel.Parallel(mode)
  restored = par.logical_state(par.put_state({"w": np.arange(4, dtype=np.float32)}))
  placed = par.put_state(restored)
  np.testing.assert_array_equal(par.fetch(placed)["w"], np.arange(4))
  assert (placed["w"] is restored["w"]) == (mode != "pmap")
  for device in (jax.devices()[0], jax.devices()[-1]):  # (A fresh state is on the first.)
    elsewhere = jax.device_put(np.arange(4, dtype=np.float32), device)
    moved = par.put_state({"w": elsewhere})["w"]
    # The very sharding the train windows return: an equivalent one (one device's, where the
    # mesh has one) missed jit's cache and compiled the second window again (~1 s on a CPU).
    assert moved.sharding == par.put_state(restored)["w"].sharding


_PMAP_HOST_WINDOW = r"""
import json, tracemalloc
import jax, ml_collections, numpy as np
from fashion_jax.data import input_pipeline
from fashion_jax.support import compile_ahead
from fashion_jax.support import parallel
from fashion_jax.training import loop
rng = np.random.default_rng(0)
split = input_pipeline.Split(rng.integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8),
                             rng.integers(0, 10, 4096).astype(np.int32))
config = ml_collections.ConfigDict({"batch_size": 64, "seed": 3})
par = parallel.Parallel("pmap")
windows = loop.Windows(None, split, config, par, "host", 0)
windows.inputs(0, 60)  # (The epochs' orders, computed once, are not the window's copies.)
tracemalloc.start()
got = windows.inputs(60, 60)
jax.block_until_ready(got)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
same = True
for first, n in ((0, 64), (40, 60), (127, 1)):  # (40: into the second epoch.)
  expected = input_pipeline.train_batches(split, 64, config.seed, first)
  expected = [next(expected) for _ in range(n)]
  (got,) = windows.inputs(first, n)
  for key in ("image", "label"):  # [devices, steps, batch/devices, ...] -> [steps, batch, ...]
    value = np.asarray(got[key])
    value = np.swapaxes(value, 0, 1).reshape((n, 64) + value.shape[3:])
    same = same and np.array_equal(value, np.stack([b[key] for b in expected]))
    same = same and got[key].shape[0] == 4 and got[key].dtype == expected[0][key].dtype
print("RESULT " + json.dumps({"peak": peak, "same": bool(same), "devices": jax.device_count()}))
"""


def test_a_pmap_host_window_is_gathered_once_into_the_device_layout():
  """pmap, data_placement=host: the loop gathered a window as [steps, batch, ...], then put_batch
  copied it again to lay it out per device ([devices, steps, batch/devices, ...]): two copies of
  the window on the host at the peak. Now the gather's index is laid out per device, so the one
  gather is the layout; the batches are bit for bit the per-step iterator's."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
  proc = subprocess.run([sys.executable, "-c", _PMAP_HOST_WINDOW], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  window_bytes = 60 * 64 * (28 * 28 + 4)
  assert result["devices"] == 4 and result["same"], result
  assert result["peak"] < 1.5 * window_bytes, (result, window_bytes)  # (Was 2.0x.)
