"""Multi-process data parallelism on localhost (CPU, gloo) through the real launch script."""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, run_module, write_idx_folder
from tests.multidevice_check import final_state
from fashion_jax import config_lib
from fashion_jax.support import multihost
from fashion_jax.training import stops


def _free_port() -> int:
  """A free port below the kernel's ephemeral range: process 0 binds it seconds later, and a port
  the kernel hands out (port 0) could meanwhile go to another test's connection or server."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      low = int(f.read().split()[0])
  except (OSError, ValueError, IndexError):
    low = 32768
  rng = random.Random()
  for _ in range(100):
    port = rng.randrange(10_000, max(low, 10_001))
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port below the ephemeral range")


def _tiny(idx_dir):
  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.idx_dir = idx_dir
  return config


def test_two_processes_match_one_process(tmp_path, idx_dir):
  """2 processes x 2 devices train to the same parameters as 1 process x 4 devices.

  The two all-reduce in different orders, so parameters differ in the last
  bits. im2col keeps that difference at rounding level over 20 steps; under
  Winograd the same bits occasionally break a pooling tie the other way (a
  handful of windows per 1,000 images; see fashion_jax/kernels/winograd.py), which
  Adam amplifies past this test's 1e-5. The formulations' equivalence is
  tested in test_ops.py; here the parallel machinery is.
  """
  # With augmentation: each position of the global batch draws its own shift, so this also checks
  # that a position holds the same example however many processes share the batch.
  flags = ["--config=configs/tiny.py", f"--config.idx_dir={idx_dir}", "--config.parallelism=mesh",
           "--config.conv_impl=im2col", "--config.augment_translate=2"]
  single = str(tmp_path / "single")
  proc = run_module("fashion_jax.main", f"--workdir={single}", *flags,
                    env={"JAX_NUM_CPU_DEVICES": "4"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  ahead = "compiling the evaluation in the background"
  assert ahead in proc.stderr  # One process: while the first windows run.

  multi = str(tmp_path / "multi")
  env = dict(os.environ, FASHION_JAX_PORT=str(_free_port()), PYTHON=sys.executable)
  proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", multi, *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(open(os.path.join(multi, f"process_{i}.log")).read()[-2000:] for i in range(2)
                 if os.path.exists(os.path.join(multi, f"process_{i}.log")))
  assert proc.returncode == 0, proc.stderr + logs
  assert "process 1 of 2" in open(os.path.join(multi, "process_1.log")).read()
  for i in range(2):  # Several: never (a compile may wait for the other processes').
    assert ahead not in open(os.path.join(multi, f"process_{i}.log")).read()

  config = _tiny(idx_dir)
  a, b = final_state(config, single), final_state(config, multi)
  assert int(a.step) == int(b.step) == 20
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a.params, b.params)
  assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
  # Only process 0 writes metrics; evaluation is exact across hosts.
  def lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(l).items() if not k.endswith("_s") and "per_sec" not in k}
              for l in f]
  a_lines, b_lines = lines(single), lines(multi)
  assert [l.keys() for l in a_lines] == [l.keys() for l in b_lines]
  for x, y in zip(a_lines, b_lines):
    assert x == pytest.approx(y, rel=1e-5)


def test_two_processes_on_the_cpu_run_again_with_a_warm_compilation_cache(tmp_path, idx_dir,
                                                                          monkeypatch):
  """jax 0.12.1: a 2-process CPU job loading its programs from a warm persistent cache hung in
  its first window's all-reduce, every time. Such a job runs without the cache (the user's
  too, said in a warning), so running it twice with one cache folder finishes both times."""
  cache = tmp_path / "xla_cache"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  for run in ("first", "second"):
    workdir = tmp_path / run
    proc = _launch(workdir, *_stop_flags(idx_dir), "--config.num_train_steps=8")
    logs = _process_logs(workdir)
    assert proc.returncode == 0, proc.stderr + "".join(log[-2000:] for log in logs)
    for log in logs:
      assert f"not using the compilation cache {cache}" in log, log[-2000:]


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path, idx_dir):
  start = time.monotonic()
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    f"--config.idx_dir={idx_dir}", "--config.distributed=on",
                    f"--config.coordinator_address=localhost:{_free_port()}",
                    "--config.num_processes=2", "--config.process_id=1",
                    "--config.distributed_timeout_s=5", timeout=240)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "could not join the distributed job at localhost:" in proc.stderr
  assert time.monotonic() - start < 200


def test_process_0s_coordinator_port_is_checked_before_jax_starts_the_service(monkeypatch):
  """A port out of range: a C++ fatal error (exit 134); a port in use: a segmentation fault
  (139). Both are one line now, before jax.distributed starts anything."""
  from fashion_jax import default_config  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  config = default_config.get_config()
  config.distributed, config.num_processes, config.process_id = "on", 2, 0
  config.coordinator_address = "localhost:99999"
  with pytest.raises(UserError, match=r"'localhost:99999' is not host:port \(a TCP port 1-65535\)"):
    parallel.initialize_distributed(config)
  with socket.socket() as listener:
    listener.bind(("", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config.coordinator_address = f"localhost:{port}"
    with pytest.raises(UserError, match=rf"port {port} is in use on this machine, where process 0 "
                                        r"runs the job's coordinator .*FASHION_JAX_PORT"):
      parallel.initialize_distributed(config)
  # From the environment, the messages name the variable (they named config.coordinator_address).
  config.coordinator_address = ""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:99999")
  with pytest.raises(UserError, match=r"^JAX_COORDINATOR_ADDRESS='localhost:99999' is not host"):
    parallel.initialize_distributed(config)



_BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                 "SLURM_NODELIST": "node1", "SLURM_JOB_NODELIST": "node1"}


def test_one_process_in_a_slurm_allocation_of_several_tasks_runs_alone(monkeypatch):
  """`python -m fashion_jax.main` in an sbatch script or salloc shell of `-n 4` (no srun): its
  one process had been taken for a job of 4 and refused ("could not join the distributed job at
  the SLURM cluster: coordinator_address should be defined"). Inside an srun step it joins."""
  from fashion_jax import default_config  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import parallel  # pylint: disable=import-outside-toplevel
  for name in ("SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "JAX_COORDINATOR_ADDRESS"):  # (The suite run inside an srun step has the first.)
    monkeypatch.delenv(name, raising=False)
  for name, value in _BATCH_SCRIPT.items():
    monkeypatch.setenv(name, value)
  assert parallel.cluster_detected() is None
  assert parallel.initialize_distributed(default_config.get_config()) is False
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")  # srun -n 4: a step of 4 tasks.
  assert parallel.cluster_detected() == "SLURM"
  monkeypatch.setenv("SLURM_NTASKS", "")  # Not a number: no job of several, not a traceback.
  assert parallel.cluster_detected() is None

def test_coordinator_without_process_count_is_a_config_error(tmp_path):
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    "--config.coordinator_address=localhost:1234", timeout=120)
  assert proc.returncode == 2
  assert "needs config.num_processes >= 1" in proc.stderr


def _launch(workdir, *flags, wait=True, **env_overrides):
  env = {**os.environ, "FASHION_JAX_PORT": str(_free_port()), "PYTHON": sys.executable,
         **env_overrides}
  args = ["bash", "launch/local_multiprocess.sh", "2", "1", str(workdir), *flags]
  if not wait:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _process_logs(workdir) -> list[str]:
  return [open(os.path.join(workdir, f"process_{i}.log")).read() for i in range(2)]


def _pid_of(workdir, process_id: int) -> int:
  """The pid of `fashion_jax.main` process `process_id` of the job training into `workdir`."""
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    except (OSError, ValueError):
      continue
    if ("fashion_jax.main" in args and f"--workdir={workdir}" in args
        and f"--config.process_id={process_id}" in args):
      return int(entry)
  raise AssertionError(f"no process {process_id} training into {workdir}")


def _wait_for_stop(launcher, workdir, timeout: float = 90) -> str:
  """The launcher's stderr once it exits; kills the job and fails if that takes `timeout`."""
  try:
    return launcher.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    for process_id in (0, 1):
      try:
        os.kill(_pid_of(workdir, process_id), signal.SIGKILL)
      except AssertionError:
        pass
    launcher.kill()
    launcher.communicate()
    raise AssertionError(f"the job did not stop within {timeout} s of the signal")


def _start_and_wait_for_steps(workdir, flags, lines: int = 8):
  launcher = _launch(workdir, *flags, "--config.num_train_steps=100000", wait=False)
  metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
    assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
    time.sleep(0.2)
  return launcher


def _stop_flags(idx_dir) -> list[str]:
  """A long tiny run that logs every step, with a window boundary every 4 steps."""
  return ["--config=configs/tiny.py", f"--config.idx_dir={idx_dir}", "--config.log_every_steps=1",
          "--config.steps_per_dispatch=4", "--config.eval_every_steps=100000",
          "--config.checkpoint_every_steps=100000"]


def _assert_stopped_together(launcher, workdir, by_process: int | None) -> int:
  """Both processes stopped (within _wait_for_stop's 90 s) at one step, with one checkpoint
  there, naming the same process's signal (`by_process`, or either where both were signalled
  at once: the first to publish its signal at a boundary is named); that step."""
  err = _wait_for_stop(launcher, workdir)
  logs = _process_logs(workdir)
  assert launcher.returncode == 75, err + "".join(log[-2000:] for log in logs)
  who = r"\d" if by_process is None else str(by_process)
  pattern = rf"^fashion_jax: stopped by SIGTERM to process ({who}) at step (\d+);"
  stopped = [re.findall(pattern, log, re.M) for log in logs]
  assert len(stopped[0]) == len(stopped[1]) == 1 and stopped[0] == stopped[1], stopped
  assert os.listdir(workdir / "checkpoints") == [stopped[0][0][1]]
  return int(stopped[0][0][1])


def test_signals_to_every_process_and_the_launcher_stop_at_one_step(tmp_path, idx_dir):
  """What `pkill -f WORKDIR` does (the launcher forwards its SIGTERM too), and more signals
  while the collective save runs and after it, until the processes exit (pkill again): every
  process stops at one step and exits 75, no hang. A signal after the save, while a process
  shut down, ended it with 143 ("process 1 failed"): a late second round failed this test."""
  workdir = tmp_path / "run"
  launcher = _start_and_wait_for_steps(workdir, _stop_flags(idx_dir))
  pids = (_pid_of(workdir, 0), _pid_of(workdir, 1))
  for pid in (*pids, launcher.pid):
    os.kill(pid, signal.SIGTERM)
  checkpoints = workdir / "checkpoints"  # Once the save has begun, signal each process again,
  while launcher.poll() is None and not (checkpoints.exists() and os.listdir(checkpoints)):
    time.sleep(0.005)
  deadline = time.monotonic() + 90  # and again until they have exited.
  while launcher.poll() is None and time.monotonic() < deadline:
    for process_id in (0, 1):
      try:  # Looked up again: an exited process's pid may be another's by now.
        os.kill(_pid_of(workdir, process_id), signal.SIGTERM)
      except (AssertionError, ProcessLookupError):
        pass
    time.sleep(0.02)
  _assert_stopped_together(launcher, workdir, by_process=None)  # Both signalled at once.


def test_signal_to_one_process_stops_every_process_at_one_step(tmp_path, idx_dir):
  """SIGTERM to process 1 only: both save one checkpoint at one step and exit 75, within 60 s;
  the re-run resumes there and ends bitwise equal to an uninterrupted run."""
  flags = _stop_flags(idx_dir)
  interrupted = tmp_path / "interrupted"
  launcher = _start_and_wait_for_steps(interrupted, flags)
  os.kill(_pid_of(interrupted, 1), signal.SIGTERM)
  step = _assert_stopped_together(launcher, interrupted, by_process=1)
  assert step % 4 == 0
  said = ("fashion_jax: SIGTERM: stopping at the next window boundary, with a checkpoint there "
          "that every process agrees on, or at the end if that comes first")  # At once, by the
  # process signalled (several: its second signal would be ignored, not end it half-way).
  logs = _process_logs(interrupted)
  assert said not in logs[0] and logs[1].count(said) == 1, logs[1][-3000:]

  resumed = _launch(interrupted, *flags, f"--config.num_train_steps={step + 8}")
  assert resumed.returncode == 0, resumed.stderr + "".join(_process_logs(interrupted))
  assert all(f"resumed from checkpoint at step {step}" in log for log in _process_logs(interrupted))
  straight = tmp_path / "straight"
  proc = _launch(straight, *flags, f"--config.num_train_steps={step + 8}")
  assert proc.returncode == 0, proc.stderr + "".join(_process_logs(straight))
  config = _tiny(idx_dir)
  a, b = final_state(config, str(straight)), final_state(config, str(interrupted))
  assert int(a.step) == int(b.step) == step + 8
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)


def test_signal_right_after_joining_stops_every_process_at_the_first_boundary(tmp_path, idx_dir):
  """A SIGTERM between joining the job and training's start (config checks, logging, compile
  cache): jax.distributed's preemption notifier took it, and the job trained to the end, exit 0."""
  workdir = tmp_path / "run"
  env = dict(os.environ, FASHION_JAX_PORT=str(_free_port()), PYTHON=sys.executable,
             FASHION_JAX_SIGNAL_AT="joined")
  proc = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "1", str(workdir),
                         *_stop_flags(idx_dir), "--config.num_train_steps=40"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  logs = _process_logs(workdir)
  assert proc.returncode == 75, proc.stderr + "".join(log[-2000:] for log in logs)
  for log in logs:
    assert re.search(r"^fashion_jax: stopped by SIGTERM to process 0 at step 4;", log, re.M), log
  assert os.listdir(workdir / "checkpoints") == ["4"]


@pytest.mark.parametrize("args, says", [
    (["0", "1", "w"], "NUM_PROCESSES=0 is not a positive whole number"),
    (["2", "two", "w"], "DEVICES_PER_PROCESS=two is not a positive whole number"),
    (["2", "1", "--config=configs/tiny.py"], "WORKDIR=--config=configs/tiny.py: give the run's"),
    (["2", "1", "gs://bucket/run"], "WORKDIR=gs://bucket/run is a URL"),
])
def test_launcher_refuses_bad_arguments_with_exit_2(tmp_path, args, says):
  """Before, `0 1 w` started nothing and exited 0; the others failed later, or in each process."""
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch/local_multiprocess.sh"), *args],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"local_multiprocess.sh: error: {says}"), proc.stderr
  assert "started" not in proc.stdout and not os.listdir(tmp_path)


@pytest.mark.parametrize("override, error", [
    ("--config.batch_size=0", "fashion_jax: error: config.batch_size=0 is invalid"),
    # After joining: one device for the job had left process 1 none (a traceback, exit 1).
    ("--config.parallelism=none", "fashion_jax: error: config.parallelism='none' runs on one "
                                  "device, but this job has 2 processes")])
def test_launcher_returns_a_processes_exit_2_and_says_its_error_once(tmp_path, idx_dir, override,
                                                                     error):
  """Each process refuses the config (exit 2): the launcher said exit 1, and the line twice."""
  proc = _launch(tmp_path / "run", "--config=configs/tiny.py", f"--config.idx_dir={idx_dir}",
                 override)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count(error) == 1, proc.stderr


def test_one_process_out_of_disk_stops_every_process_with_its_error(tmp_path, idx_dir):
  """Process 1 finds too little free disk before the step-10 save: every process refuses the
  save (exit 2, the line once), and the step-10 checkpoint is not started. Alone, process 1 had
  exited and left process 0 waiting in the collective save."""
  workdir = tmp_path / "run"
  start = time.monotonic()
  proc = _launch(workdir, "--config=configs/tiny.py", f"--config.idx_dir={idx_dir}",
                 FASHION_JAX_DISK_FULL="1")
  assert proc.returncode == 2, proc.stderr + "".join(_process_logs(workdir))[-3000:]
  assert proc.stderr.count("fashion_jax: error: process 1: not enough free disk") == 1, proc.stderr
  assert time.monotonic() - start < 180  # It was a 5-minute wait, then an abort.
  assert not os.path.exists(workdir / "checkpoints" / "10")


def test_an_error_on_one_process_alone_stops_every_process_with_it(tmp_path, idx_dir):
  """Process 1's host lacks the data (its own --config.idx_dir): it printed its one line and then
  waited in JAX's exit barrier while process 0 waited for it in the workdir lock's agreement;
  both aborted after 5 minutes (exit 134, a C++ stack). Now every process stops in seconds with
  exit 2 and that line, process 0 naming process 1."""
  wrapper = tmp_path / "python_on_a_host_without_data"
  wrapper.write_text(f"""#!/bin/sh
case "$*" in *--config.process_id=1*) exec {sys.executable} "$@" --config.idx_dir=/nonexistent ;; esac
exec {sys.executable} "$@"
""")
  wrapper.chmod(0o755)
  workdir = tmp_path / "run"
  start = time.monotonic()
  proc = _launch(workdir, "--config=configs/tiny.py", f"--config.idx_dir={idx_dir}",
                 PYTHON=str(wrapper))
  logs = _process_logs(workdir)
  assert proc.returncode == 2, proc.stderr + "".join(logs)[-3000:]
  assert time.monotonic() - start < 180, proc.stderr  # It was a 5-minute wait, then an abort.
  assert "fashion_jax: error: IDX folder '/nonexistent' does not exist" in logs[1], logs[1][-2000:]
  assert "fashion_jax: error: process 1: IDX folder '/nonexistent' does not exist" in logs[0], \
      logs[0][-2000:]
  assert "Terminating process" not in "".join(logs) and "Fatal Python error" not in "".join(logs)



def test_the_leads_config_json_failing_stops_every_process_with_its_error(tmp_path, idx_dir):
  """Only process 0 writes config.json: a full disk there was its one line, while process 1 had
  gone on into the first window's all-reduce and crashed in it ("Gloo all-reduce failed",
  "Fatal Python error: Aborted", exit 134); on a GPU or TPU it waited for the heartbeat timeout."""
  site = tmp_path / "site"  # Process 0's disk fills as config.json is written.
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      "from fashion_jax.support import storage\nfrom fashion_jax.support.errors import UserError\n"
      "write = storage.write_text\n"
      "def full(path, *args):\n"
      "  if path.endswith('config.json'):\n"
      "    raise UserError(f'no space left where {path} is written (No space left on device); "
      "free some space')\n"
      "  return write(path, *args)\n"
      "storage.write_text = full\n")
  wrapper = tmp_path / "python_with_a_full_disk_on_process_0"
  wrapper.write_text(f"""#!/bin/sh
case "$*" in *--config.process_id=0*) PYTHONPATH={site}:{ROOT} exec {sys.executable} "$@" ;; esac
exec {sys.executable} "$@"
""")
  wrapper.chmod(0o755)
  workdir = tmp_path / "run"
  proc = _launch(workdir, "--config=configs/tiny.py", f"--config.idx_dir={idx_dir}",
                 PYTHON=str(wrapper))
  logs = _process_logs(workdir)
  assert proc.returncode == 2, proc.stderr + "".join(logs)[-3000:]
  assert "fashion_jax: error: no space left where" in logs[0], logs[0][-2000:]
  assert "fashion_jax: error: no space left where" in logs[1], logs[1][-2000:]  # Its refusal too.
  assert proc.stderr.count("fashion_jax: error: no space left where") == 1, proc.stderr
  assert "Fatal Python error" not in "".join(logs) and "Traceback" not in "".join(logs)
  assert not os.path.exists(workdir / "checkpoints" / "10")


def _launch_with_process_1_given(tmp_path, extra: str, *flags):
  """Two processes of configs/tiny.py with `flags`, process 1 also given `extra` (a flag left
  out of, or added to, one host's command) through the launcher's $PYTHON."""
  wrapper = tmp_path / "python_for_process_1"
  wrapper.write_text(f"""#!/bin/sh
case "$*" in *--config.process_id=1*) exec {sys.executable} "$@" {extra} ;; esac
exec {sys.executable} "$@"
""")
  wrapper.chmod(0o755)
  return _launch(tmp_path / "run", "--config=configs/tiny.py", *flags, PYTHON=str(wrapper))


def test_a_process_given_another_config_stops_the_job_with_a_line(tmp_path, idx_dir):
  """Process 1 alone with another learning rate (a flag left out of one host's command): it had
  trained with its own, each host's "replicated" parameters drifting apart silently (exit 0, the
  metrics and checkpoint process 0's alone). Now every process refuses it at once, exit 2."""
  proc = _launch_with_process_1_given(tmp_path, "--config.learning_rate=0.5",
                                      f"--config.idx_dir={idx_dir}")
  assert proc.returncode == 2, proc.stderr + "".join(_process_logs(tmp_path / "run"))[-3000:]
  assert proc.stderr.count("fashion_jax: error: process 1 of the job was given another config "
                           "than process 0: learning_rate=0.5 (process 0: 0.001); give every "
                           "process the same config and flags (only process_id, idx_dir,") == 1, \
      proc.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")

@pytest.mark.parametrize("crashing", [1, 0])
def test_a_crash_on_one_process_alone_stops_every_process_in_seconds(tmp_path, idx_dir, crashing):
  """A process crashes (a RuntimeError: a bug) after the step-8 checkpoint. Process 1's had
  printed its traceback and then waited in JAX's shutdown barrier while process 0 waited for it
  at the next boundary; after 5 minutes both aborted (exit 134, C++ stacks). Now it exits 1
  with its traceback at once, the other ends with one line naming it and exits 1 too (process
  0's crash had the other exit 2, "fix the input", and the launcher returned that), and the
  checkpoint stays."""
  wrapper = tmp_path / "python_that_crashes"
  wrapper.write_text(f"""#!/bin/sh
case "$*" in *--config.process_id={crashing}*) export FASHION_JAX_CRASH_AT=step:10 ;; esac
exec {sys.executable} "$@"
""")
  wrapper.chmod(0o755)
  workdir = tmp_path / "run"
  start = time.monotonic()
  proc = _launch(workdir, *_stop_flags(idx_dir), "--config.num_train_steps=40",
                 "--config.checkpoint_every_steps=8", PYTHON=str(wrapper))
  logs = _process_logs(workdir)
  assert proc.returncode == 1, proc.stderr + "".join(log[-2000:] for log in logs)
  assert time.monotonic() - start < 120, proc.stderr  # It was a 5-minute wait, then an abort.
  crashed, other = logs[crashing], logs[1 - crashing]
  assert "RuntimeError: crash injected at step:10" in crashed, crashed[-2000:]
  said = [line for line in other.splitlines() if line.startswith("fashion_jax: error: ")]
  assert said == [f"fashion_jax: error: process {crashing}: crashed (RuntimeError: crash injected "
                  "at step:10 (FASHION_JAX_CRASH_AT)); see its log for the traceback"], other[-2000:]
  assert "Traceback" not in other and "Fatal Python error" not in "".join(logs)
  assert "8" in os.listdir(workdir / "checkpoints")


class _FailedKeys:
  """A coordination-service client with these `fashion_jax/failed/I` values."""

  def __init__(self, failed: dict):
    self.failed = failed

  def key_value_dir_get(self, prefix):
    return [(key, text) for key, text in self.failed.items() if key.startswith(prefix)]


@pytest.mark.parametrize("failed, said, code", [
    ({"1": "2:not enough disk: 3 GB free"}, "process 1: not enough disk: 3 GB free", 2),
    # An older fashion_jax's value, its message alone: int('not enough disk') had crashed.
    ({"1": "not enough disk: 3 GB free"}, "process 1: not enough disk: 3 GB free", 2),
    ({"1": "1:process 0: crashed (KeyError: 'a:b')", "0": "1:crashed (KeyError: 'a:b'); see"},
     "process 0: crashed (KeyError: 'a:b'); see", 1),
])
def test_a_peers_failure_is_read_whatever_its_message_holds(failed, said, code):
  client = _FailedKeys({f"fashion_jax/failed/{i}": text for i, text in failed.items()})
  with pytest.raises(multihost.PeerFailed) as raised:
    multihost._raise_if_a_peer_failed(client)  # pylint: disable=protected-access
  assert (str(raised.value), raised.value.code) == (said, code)


@pytest.mark.parametrize("code", [1, 2])
def test_a_peers_crash_ends_this_process_with_1_after_its_saves_and_flushes(monkeypatch, capsys,
                                                                            code):
  """It left with os._exit from inside the stop barrier: the lead's pending save was abandoned and
  its metrics and TensorBoard events since the last flush lost. A peer's bad input stays exit 2."""
  cleaned, left = [], []

  def fail_fast(message, status):
    left.append((message, status, list(cleaned)))
    raise SystemExit(status)  # (os._exit, there.)

  monkeypatch.setattr(multihost, "fail_fast", fail_fast)
  client = _FailedKeys({"fashion_jax/failed/0": f"{code}:crashed (RuntimeError: x)"})
  with pytest.raises((SystemExit, multihost.PeerFailed)) as raised:
    with contextlib.ExitStack() as cleanup:
      cleanup.enter_context(stops.a_crash_ends_the_job())
      cleanup.callback(cleaned.append, "saves finished, files flushed")
      multihost._raise_if_a_peer_failed(client)  # pylint: disable=protected-access
  if code == 2:  # A UserError: the command's own one line, exit 2 (cli.fail).
    assert isinstance(raised.value, multihost.PeerFailed) and not left
    return
  assert raised.value.code == 1
  assert left == [("process 0: crashed (RuntimeError: x)", 1, ["saves finished, files flushed"])]
  assert capsys.readouterr().err == "fashion_jax: error: process 0: crashed (RuntimeError: x)\n"


def test_launcher_refuses_a_workdir_a_run_is_training_into_before_touching_its_logs(tmp_path):
  """The processes refuse such a workdir too, but the launcher had truncated their logs
  (the running job's own) before they could."""
  import fcntl
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "process_0.log").write_text("the running job's log\n")
  with open(workdir / ".fashion_jax.lock", "a+") as running:
    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
    running.write("4242\n")
    running.flush()
    proc = _launch(workdir, "--config=configs/tiny.py")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("local_multiprocess.sh: error: another run (pid 4242) is "
                                f"training into {workdir}"), proc.stderr
  assert (workdir / "process_0.log").read_text() == "the running job's log\n"


_FAKE_PROCESS = r"""#!/usr/bin/env bash
# Stands in for `python -m fashion_jax.main ...`: FAKE_<process id> picks what it does.
for a in "$@"; do case $a in --config.process_id=*) i=${a#*=} ;; esac; done
mode_var="FAKE_$i"
case ${!mode_var} in
  # Fails once the other holds its trap (a fixed second lost that race on a loaded machine).
  fail) for _ in $(seq 600); do [ -e "$MARK.ready" ] && break; sleep 0.05; done; exit 1 ;;
  slow_save) trap 'sleep 3; echo saved >"$MARK"; exit 75' TERM; touch "$MARK.ready"
    while :; do sleep 0.1; done ;;
  stubborn) trap '' TERM; echo $$ >"$MARK"; touch "$MARK.ready"; while :; do sleep 0.1; done ;;
  plain) echo $$ >>"$MARK.started"; exec sleep 600 ;;
esac
"""


def _fake_job(tmp_path, grace_s=1, **modes):
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_PROCESS)
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), MARK=str(tmp_path / "mark"), GRACE_S=str(grace_s),
             **{f"FAKE_{i}": mode for i, mode in modes.items()})
  return subprocess.Popen(["bash", os.path.join(ROOT, "launch/local_multiprocess.sh"), "2", "1",
                           str(tmp_path / "run")], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_launcher_outlives_its_processes_whatever_signal_comes(tmp_path):
  """After a failure the launcher stops the others; a signal to it meanwhile cut its last `wait`
  short and it returned with process 0 still saving (orphaned)."""
  launcher = _fake_job(tmp_path, grace_s=30, **{"0": "slow_save", "1": "fail"})
  said = launcher.stderr.readline()  # Process 1 has failed; process 0 now saves for 3 s.
  assert said.startswith("process 1 failed (exit 1"), said
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode == 1, said + stderr
  assert (tmp_path / "mark").read_text() == "saved\n"  # Finished before the launcher did.


def test_a_process_that_ignores_the_stop_is_killed_after_the_grace(tmp_path):
  """One that waits in a collective for the failed one took JAX's heartbeat timeout (~93 s) and
  aborted with a C++ stack; the launcher now sends SIGKILL after GRACE_S."""
  launcher = _fake_job(tmp_path, **{"0": "stubborn", "1": "fail"})
  try:
    _, stderr = launcher.communicate(timeout=60)
  finally:
    if (tmp_path / "mark").exists():
      subprocess.run(["kill", "-KILL", (tmp_path / "mark").read_text().strip()], check=False)
  assert launcher.returncode == 1 and "process 1 failed (exit 1" in stderr, stderr
  stubborn = int((tmp_path / "mark").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(stubborn, 0)


def test_a_signal_before_training_holds_it_is_no_failure(tmp_path):
  """The processes' default end (143 after SIGTERM) was reported as 'process 0 failed'."""
  launcher = _fake_job(tmp_path, **{"0": "plain", "1": "plain"})
  started = tmp_path / "mark.started"
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and not (
      started.exists() and len(started.read_text().split()) == 2):
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode == 143 and "failed" not in stderr, stderr


class _Coordinator:
  """A coordination-service client whose other processes set their `failed/` keys at given
  times (None: never), on a fake clock."""

  def __init__(self, others_fail_at):
    self.now, self.keys, self.others_fail_at = 0.0, {}, others_fail_at

  def key_value_set(self, key, value):
    self.keys[key] = value

  def key_value_dir_get(self, prefix):
    for i, at in enumerate(self.others_fail_at, start=1):
      if at is not None and self.now >= at:
        self.keys.setdefault(f"fashion_jax/failed/{i}", "2:process 0: bad input")
    return [(k, v) for k, v in self.keys.items() if k.startswith(prefix)]


@pytest.mark.parametrize("others_fail_at, leaves_at", [
    ([0.5, 7.0], 7.0),  # The one busy for 7 s (a long window, an evaluation) reads it first.
    ([0.5, None], multihost.LEAD_WAIT_S),  # One that never does: not for ever.
])
def test_process_0_failing_waits_for_the_others_to_read_it(monkeypatch, others_fail_at,
                                                            leaves_at):
  """Process 0 runs the coordinator: failing, it left after a fixed 2 s, and a process busy for
  longer then lost contact with the job's coordinator (exit 2) or was aborted by JAX."""
  from jax._src import distributed
  client = _Coordinator(others_fail_at)
  monkeypatch.setattr(distributed, "global_state", types.SimpleNamespace(
      client=client, num_processes=3, process_id=0))
  monkeypatch.setattr(multihost.time, "monotonic", lambda: client.now)
  monkeypatch.setattr(multihost.time, "sleep", lambda s: setattr(client, "now", client.now + s))
  monkeypatch.setattr(multihost.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
  with pytest.raises(SystemExit) as e:
    multihost.fail_fast("IDX folder '/x' does not exist", 2)
  assert e.value.code == 2
  assert client.keys["fashion_jax/failed/0"] == "2:IDX folder '/x' does not exist"
  assert leaves_at <= client.now < leaves_at + 0.5


_GATHER_TWICE = """
import sys
import jax
index, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", 2, index, initialization_timeout=60)
from fashion_jax.support import multihost
print("first", multihost.gather("workdir_lock", None if index else "refused"))
print("second", multihost.gather("workdir_lock", f"p{index}"))  # A second run in the same job.
multihost.barrier("done")
"""


def test_a_barrier_name_used_again_in_the_job_is_a_barrier_again():
  """A second `train_and_evaluate` in one job (two runs from a notebook on a pod, the first
  refused): its "workdir_lock" agreement set keys the first had set, and every process crashed
  (JaxRuntimeError ALREADY_EXISTS); a value set again could have been read stale."""
  port = str(_free_port())
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", _GATHER_TWICE, str(i), port], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for proc, (out, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines() == ["first {0: 'refused'}", "second {0: 'p0', 1: 'p1'}"], out


_JOIN_FROM_THE_VARIABLE = """
import sys
from fashion_jax import default_config
from fashion_jax.support import parallel
config = default_config.get_config()
config.num_processes, config.process_id = 2, int(sys.argv[1])
assert parallel.initialize_distributed(config)
import jax
print("joined", jax.process_index(), jax.process_count())
"""


def test_the_coordinator_from_the_environment_with_the_process_count_from_the_config():
  """JAX_COORDINATOR_ADDRESS (documented beside config.coordinator_address) with
  --config.num_processes and --config.process_id: those two were dropped, and every process
  refused with "could not join ...: Number of processes must be defined"."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}"}
  procs = [subprocess.Popen([sys.executable, "-c", _JOIN_FROM_THE_VARIABLE, str(i)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (proc, (out, err)) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == f"joined {i} 2", out


def test_a_launch_jax_cannot_read_says_to_give_the_coordinator(tmp_path):
  """mpirun of Open MPI 5 (OMPI_COMM_WORLD_SIZE, but not the OMPI_MCA_orte_hnp_uri JAX's
  detection reads): "could not join ...: coordinator_address should be defined.; check that every
  process uses the same coordinator address", for a coordinator nobody had given."""
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                    env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("fashion_jax: error: config.distributed='auto': JAX could not read the job's processes "
          "from this Open MPI launch (coordinator_address should be defined.); pass process 0's "
          "--config.coordinator_address=HOST:PORT") in proc.stderr, proc.stderr[-3000:]


def test_a_process_that_read_other_data_stops_the_job_with_a_line(tmp_path):
  """Process 1 reading another IDX folder (each host reads its own copy): it had trained on its
  own files, the "replicated" data and parameters differing between the hosts, exit 0."""
  ours = write_idx_folder(str(tmp_path / "idx"))
  theirs = write_idx_folder(str(tmp_path / "other_idx"), seed=1)
  proc = _launch_with_process_1_given(tmp_path, f"--config.idx_dir={theirs}",
                                      f"--config.idx_dir={ours}")
  assert proc.returncode == 2, proc.stderr + "".join(_process_logs(tmp_path / "run"))[-3000:]
  assert proc.stderr.count("fashion_jax: error: process 1 of the job read other data than "
                           "process 0 (train/test digests ") == 1, proc.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_coordinator_from_the_environment_without_a_process_count_says_to_give_it():
  """JAX_COORDINATOR_ADDRESS alone, outside any cluster JAX reads counts from: the message told
  the user to pass the --config.coordinator_address they had given as the variable."""
  script = ("from fashion_jax import default_config\n"
            "from fashion_jax.support import parallel\n"
            "parallel.initialize_distributed(default_config.get_config())\n")
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "TPU_WORKER"))}
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0
  assert ("JAX could not read the job's processes from the environment (no cluster detected) "
          "(Number of processes must be defined.); with JAX_COORDINATOR_ADDRESS pass "
          "--config.num_processes and each process's --config.process_id") in proc.stderr, \
      proc.stderr[-2000:]
