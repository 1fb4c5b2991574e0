"""Fault injection: a training process SIGKILLed at several points resumes to the same result.

Kill points (fashion_jax/support/faults.py): right after a step is dispatched (mid-step) and right after
a checkpoint save has started writing in the background (mid-save), before and after checkpoints
and at the very end. Each killed run is re-run with the same command and must finish with
parameters, optimizer state and metrics bitwise identical to an uninterrupted run.
"""

import functools
import json
import os
import signal

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, run_module
from tests.multidevice_check import final_state
from fashion_jax import config_lib

# Between checkpoints (step:15, step:33) is the same situation as before the first one
# (step:7) with a checkpoint to resume from, and a kill in the first save (save:20) the same as
# one in a later save (save:40) with nothing to fall back to; those run with -m slow (the suite's
# time budget), as do the host-placement kills (the reference runs with the data on the device:
# the placements are bitwise equal on CPU, so a host run must resume to the very same state;
# tests/test_train.py checks that equality by default).
_slow = functools.partial(pytest.param, marks=pytest.mark.slow)
KILL_POINTS = ["step:7", _slow("step:15"), _slow("save:20"), _slow("step:33"), "save:40",
               _slow("host/step:7"), _slow("host/save:40")]


def _flags(idx_dir, workdir):
  return ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.idx_dir={idx_dir}",
          "--config.num_train_steps=40", "--config.checkpoint_every_steps=10",
          "--config.eval_every_steps=20", "--config.deterministic=true"]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in ("wall_time_s",
                                                                   "train_images_per_sec")}
            for l in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("faults"))
  from tests.conftest import write_idx_folder
  idx_dir = write_idx_folder(os.path.join(folder, "idx"))
  workdir = os.path.join(folder, "reference")
  proc = run_module("fashion_jax.main", *_flags(idx_dir, workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return idx_dir, workdir


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_killed_run_resumes_bitwise_identical(reference, tmp_path, kill_at):
  idx_dir, reference_dir = reference
  workdir = str(tmp_path / "killed")
  placement, _, kill_at = kill_at.rpartition("/")
  flags = _flags(idx_dir, workdir) + ([f"--config.data_placement={placement}"] if placement else [])
  killed = run_module("fashion_jax.main", *flags, env={"FASHION_JAX_KILL_AT": kill_at})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run_module("fashion_jax.main", *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]

  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  a, b = final_state(config, reference_dir), final_state(config, workdir)
  assert int(a.step) == int(b.step) == 40
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, opt_state, rng: bitwise.
  assert _metrics(reference_dir) == _metrics(workdir)  # Same series, no gaps or repeats.
