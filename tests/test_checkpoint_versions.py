"""Checkpoints written by earlier fashion_jax versions: resumed where they hold the same train
state, refused in one line where they do not."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from fashion_jax.support import checkpointing
from fashion_jax.training import train
from tests.multidevice_check import final_state


def _as_written_before_fingerprints(config, workdir: str, step: int) -> None:
  """Rewrites `step` as fashion_jax wrote it before the fingerprint (fd02266): its TrainState had
  no ema_batch_stats field, and the JSON beside it held only the model and its shapes."""
  directory = os.path.join(workdir, "checkpoints")
  state = final_state(config, workdir)
  checkpointer = checkpointing.Checkpointer(directory, keep=5, async_save=False)
  meta = checkpointer.meta(step)
  checkpointer.close()
  shutil.rmtree(os.path.join(directory, str(step)))
  old = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
         if field.name != "ema_batch_stats"}
  manager = ocp.CheckpointManager(directory)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(old),
      meta=ocp.args.JsonSave({"model": meta["model"], "param_shapes": meta["param_shapes"]})))
  manager.wait_until_finished()
  manager.close()


def test_a_checkpoint_from_before_the_fingerprint_resumes(tiny_config, tmp_path):
  """Such a checkpoint was to resume unchecked (check_fingerprint), but Orbax refused to read it
  into the TrainState that has ema_batch_stats, and the run stopped with 'could not be read on
  process 0 (ValueError: User-provided restore item and on-disk value metadata tree structures
  do not match:); that is not recognised damage ...: check the storage, then re-run to resume',
  on every re-run. An entry that holds no array here (None, {}) is not read: it resumes."""
  straight, old = str(tmp_path / "straight"), str(tmp_path / "old")
  train.train_and_evaluate(tiny_config, straight)
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, old)
  _as_written_before_fingerprints(tiny_config, old, 10)
  tiny_config.num_train_steps = 20
  train.train_and_evaluate(tiny_config, old)
  a, b = final_state(tiny_config, straight), final_state(tiny_config, old)
  assert int(a.step) == int(b.step) == 20
  jax.tree.map(np.testing.assert_array_equal, a, b)  # Resumed from step 10 as it was saved.
