"""Serving opens and lists a run's checkpoints while the run may still be saving into them."""

import os
import shutil

import pytest

from fashion_jax.support import checkpointing


def _deleted_when_listed(monkeypatch, folder: str) -> list[str]:
  """Deletes `folder` (a step) right as Orbax, listing the checkpoints, reads its metadata: what a
  run keeping only its newest checkpoints does at any moment (Orbax's finalize thread)."""
  real_stat, deleted = os.stat, []

  def stat(path, *args, **kwargs):
    if not deleted and os.fspath(path) == os.path.join(folder, "_CHECKPOINT_METADATA"):
      deleted.append(folder)
      shutil.rmtree(folder)
    return real_stat(path, *args, **kwargs)

  monkeypatch.setattr(os, "stat", stat)
  return deleted


@pytest.mark.parametrize("when", ["opened", "listed again"])
def test_a_checkpoint_deleted_while_listed_is_not_a_folder_it_cannot_read(trained_tiny_workdir,
                                                                         tmp_path, monkeypatch,
                                                                         when):
  """Orbax stats each step it listed; one that a training run deleted meanwhile raised
  FileNotFoundError out of opening the folder, which predict, evaluate and export reported as
  'cannot read <workdir>/checkpoints (No such file or directory); make it readable by you'
  (~1 load in 60 with a run checkpointing every 2 steps). The listing is made again."""
  directory = tmp_path / "run" / "checkpoints"
  shutil.copytree(os.path.join(trained_tiny_workdir, "checkpoints"), directory)
  if when == "opened":
    deleted = _deleted_when_listed(monkeypatch, str(directory / "10"))
    checkpointer = checkpointing.Checkpointer(str(directory), keep=2, async_save=False)
  else:
    checkpointer = checkpointing.Checkpointer(str(directory), keep=2, async_save=False)
    assert checkpointer.all_steps() == [10, 20]
    deleted = _deleted_when_listed(monkeypatch, str(directory / "10"))
  try:
    assert checkpointer.all_steps(read=True) == [20]
  finally:
    checkpointer.close()
  assert deleted  # The race was staged (Orbax read the step's metadata while listing).


def test_serving_reads_only_the_weights(trained_tiny_workdir, monkeypatch):
  """predict/evaluate/export read a checkpoint's whole train state onto the device and kept only
  the weights: the optimizer's moments (twice the parameters with Adam: 290 MB of WRN-28-10's
  440) were read, placed and dropped. Only the served entries are read, as saved."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from fashion_jax.serving import inference  # pylint: disable=import-outside-toplevel
  read, real_restore = [], ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    restored = real_restore(self, step, *args, **kwargs)
    if restored.get("state") is not None:
      read.extend(key for key, value in restored.state.items() if jax.tree.leaves(value))
    return restored

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  classifier = inference.load(trained_tiny_workdir, step=20)
  assert sorted(read) == ["params"], read  # (The tiny CNN: no BatchNorm, no EMA.)
  checkpointer = checkpointing.Checkpointer(os.path.join(trained_tiny_workdir, "checkpoints"),
                                            keep=2, async_save=False)
  try:
    saved = checkpointer._read(20, None)  # pylint: disable=protected-access  (as saved)
  finally:
    checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, classifier.variables["params"], saved["params"])


def test_a_training_open_that_fails_leaves_no_orbax_thread_running(trained_tiny_workdir, tmp_path,
                                                                  monkeypatch):
  """Orbax removes a training run's temporary folders in a thread it starts before reading the
  steps. Where the reading failed (a damaged metrics file: a one-line error and exit 2), that
  thread outlived the error, met the exiting interpreter and printed a traceback under the line
  (CI, ~1 run in 30). Slowed here so that it is still running when the open fails."""
  import threading  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "run" / "checkpoints"
  shutil.copytree(os.path.join(trained_tiny_workdir, "checkpoints"), directory)
  (directory / "20" / "metrics" / "metrics").write_text("{")
  finished = _slow_cleanup(monkeypatch)
  before = set(threading.enumerate())
  with pytest.raises(checkpointing.UserError, match="the saved evaluation of checkpoint 20"):
    checkpointing.Checkpointer(str(directory), keep=2, training=True)
  assert finished == [True]
  assert not _orbax_threads_since(before)


def _slow_cleanup(monkeypatch) -> list:
  """Orbax's removal of a training run's temporary folders (in its own thread) slowed to 1 s;
  the list returned gets True when it has finished."""
  import asyncio  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=import-outside-toplevel
  finished = []

  async def slow_cleanup(*args, **kwargs):
    del args, kwargs
    await asyncio.sleep(1.0)
    finished.append(True)

  monkeypatch.setattr(checkpoint_manager.temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  return finished


def _orbax_threads_since(before: set) -> list:
  import threading  # pylint: disable=import-outside-toplevel
  return [t for t in set(threading.enumerate()) - before
          if t.is_alive() and type(t).__module__.startswith("orbax.")]


@pytest.mark.parametrize("async_save", [True, False])
def test_a_training_checkpointer_closed_before_any_save_leaves_no_orbax_thread_running(
    trained_tiny_workdir, tmp_path, monkeypatch, async_save):
  """A training run that ends before its first save closes its checkpoints with nothing saved: a
  resume refused (another config or model: exit 2), a metrics.jsonl it cannot read, a re-run of
  a finished run (exit 0). Orbax waits for its temporary-folder cleanup thread only in a save, not
  in close: left running, it met the exiting interpreter ('cannot schedule new futures after
  shutdown': a traceback under the one-line error). Slowed here so that it is still running."""
  import threading  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "run" / "checkpoints"
  shutil.copytree(os.path.join(trained_tiny_workdir, "checkpoints"), directory)
  finished = _slow_cleanup(monkeypatch)
  before = set(threading.enumerate())
  with checkpointing.Checkpointer(str(directory), keep=2, async_save=async_save, training=True):
    pass
  assert finished == [True]
  assert not _orbax_threads_since(before)


_SLOW_CLEANUP_MAIN = r"""
import asyncio, runpy, sys
from orbax.checkpoint import checkpoint_manager
real = checkpoint_manager.temporary_paths.cleanup_temporary_paths

async def slow_cleanup(*args, **kwargs):  # Still running as the refusal is printed.
  await asyncio.sleep(1.0)
  await real(*args, **kwargs)

checkpoint_manager.temporary_paths.cleanup_temporary_paths = slow_cleanup
sys.argv[0] = "fashion_jax.main"
runpy.run_module("fashion_jax.main", run_name="__main__")
"""


def test_a_refused_resume_is_one_line_with_the_cleanup_still_running(trained_tiny_workdir,
                                                                     tmp_path):
  """The command's side of the test above: a resume refused (another learning rate) while Orbax
  still removed a cut-short save's folder printed that thread's traceback under the one-line
  error ('cannot schedule new futures after shutdown'), and left the folder there."""
  from tests.conftest import ROOT, assert_one_line_error  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  cut_short = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints" / "20", cut_short)
  proc = subprocess.run(
      [sys.executable, "-c", _SLOW_CLEANUP_MAIN, "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.idx_dir={os.path.dirname(trained_tiny_workdir)}/idx",
       "--config.validation_size=32", "--config.learning_rate=0.123"], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", FASHION_JAX_MALLOC="default"))  # (No re-exec.)
  assert_one_line_error(proc, "learning_rate", "resuming would change the run's")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
