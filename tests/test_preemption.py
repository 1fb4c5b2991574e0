"""SIGTERM/SIGINT during training: save at the current step, exit 75 ("preempted"), resume there."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fashion_jax.training import stops
from tests.conftest import ROOT


# SIGINT takes the same path as SIGTERM; it runs with -m slow (the suite's time budget).
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_and_resumes(tmp_path, idx_dir, sig):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.idx_dir={idx_dir}", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(args + ["--config.num_train_steps=100000"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == stops.EXIT_PREEMPTED == 75, stderr[-3000:]
  message = [l for l in stderr.splitlines() if l.startswith(f"fashion_jax: stopped by {sig.name} at step")]
  assert message, stderr[-3000:]
  stopped_at = int(message[0].split(" at step ")[1].split(";")[0])
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()  # Durable before exit.

  resumed = subprocess.run(args + [f"--config.num_train_steps={stopped_at + 3}"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from checkpoint at step {stopped_at}" in resumed.stderr
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
  assert steps[-1] == stopped_at + 3 and steps == sorted(steps)


def test_signal_before_the_train_loop_stops_at_the_first_boundary(tmp_path, idx_dir):
  """A preemption notice while the run starts (data, restore, compile) is not lost: before,
  the handlers came with the loop, so in a multi-process job jax.distributed's own notifier took
  it and the job trained to the end (exit 0), and a single process died with exit 143."""
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.idx_dir={idx_dir}", "--config.steps_per_dispatch=5",
          "--config.num_train_steps=1000"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", FASHION_JAX_SIGNAL_AT="restored")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == stops.EXIT_PREEMPTED, proc.stderr[-3000:]
  assert "fashion_jax: stopped by SIGTERM at step 5;" in proc.stderr, proc.stderr[-3000:]
  assert (workdir / "checkpoints" / "5").is_dir()
