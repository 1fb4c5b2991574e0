"""Orbax checkpoints of the train state, with a compatibility check on restore.

Each checkpoint holds the whole train state (step, params, optimizer state,
RNG, BatchNorm statistics) and a small JSON description of the model it
belongs to, so restoring into a different model fails with a clear message
instead of a shape error deep inside Orbax.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from absl import logging
import jax
import orbax.checkpoint as ocp

from fashion_jax import faults
from fashion_jax.errors import UserError


def describe_state(model_name: str, state) -> dict:
  """The JSON stored beside each checkpoint: model name and parameter shapes."""
  shapes = {jax.tree_util.keystr(path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return {"model": model_name, "param_shapes": shapes}


def _tree_paths(tree) -> set[str]:
  """Leaf paths as "a/b/0/c", the same for dataclass/NamedTuple trees and Orbax's dict metadata."""
  return {"/".join(re.findall(r"\w+", jax.tree_util.keystr(path)))
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  """Periodic and final saves, keep-N, async writes, restore of the latest step."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, description: dict) -> None:
    """Starts a save (asynchronous: the device arrays are copied before it returns)."""
    if step in self._manager.all_steps():
      return
    self._check_free_disk(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(description)), force=True)
    faults.maybe_kill("save", step)  # Tests: SIGKILL while the async write is in progress.

  def _check_free_disk(self, state) -> None:
    needed = 2 * sum(x.nbytes for x in jax.tree.leaves(state)) + (64 << 20)
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise UserError(
          f"not enough free disk to save a checkpoint in {self.directory}: {free >> 20} MB free, "
          f"{needed >> 20} MB needed; free some space (or use another --workdir) and re-run to "
          f"resume from the last checkpoint (step {self.latest_step()}), which is intact")

  def _check_description(self, step: int, description: dict) -> None:
    stored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    where = os.path.join(self.directory, str(step))
    if stored.get("model") != description["model"]:
      raise UserError(
          f"checkpoint {where} is of model {stored.get('model')!r} but the config asks for "
          f"{description['model']!r}; use a new --workdir, or --config.model={stored.get('model')}")
    if stored.get("param_shapes") != description["param_shapes"]:
      differ = sorted(k for k in set(stored.get("param_shapes", {})) | set(description["param_shapes"])
                      if stored.get("param_shapes", {}).get(k) != description["param_shapes"].get(k))
      first = differ[0] if differ else "?"
      raise UserError(
          f"checkpoint {where} has parameter shapes that do not match the configured "
          f"{description['model']!r} model ({len(differ)} differ, e.g. {first}: checkpoint "
          f"{stored.get('param_shapes', {}).get(first)} vs config "
          f"{description['param_shapes'].get(first)}); use a new --workdir or the config it "
          "was trained with")

  def restore_weights(self, step: int, description: dict) -> dict:
    """What inference needs -- params, batch_stats, ema_params -- onto the first local device.

    Reads the checkpoint in the structure it was saved with, so the
    optimizer state of older versions or other optimizers does not matter;
    the model and parameter shapes are checked as in `restore`.
    """
    self._check_description(step, description)
    metadata = self._manager.item_metadata(step)["state"]
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {key: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata[key])
                for key in metadata.keys()}
    state = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state
    return {key: state.get(key) for key in ("params", "batch_stats", "ema_params")}

  def restore(self, step: int, abstract_state, description: dict):
    """Restores `step` into the structure/shardings of `abstract_state`.

    Raises UserError if the checkpoint belongs to a different model or shape.
    """
    self._check_description(step, description)
    where = os.path.join(self.directory, str(step))
    stored_tree = self._manager.item_metadata(step)
    stored_keys = _tree_paths(stored_tree["state"]) if stored_tree.get("state") is not None else None
    wanted_keys = _tree_paths(abstract_state)
    if stored_keys is not None and stored_keys != wanted_keys:
      missing, extra = sorted(wanted_keys - stored_keys), sorted(stored_keys - wanted_keys)
      raise UserError(
          f"checkpoint {where} does not fit the configured train state (missing "
          f"{missing[:2]}, unexpected {extra[:2]}); was it written with another optimizer or ema_decay? "
          "Use a new --workdir or the config it was trained with")
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state

  def restore_latest(self, abstract_state, description: dict):
    """Restores the newest readable checkpoint: (step, state), or (None, None) if none.

    A checkpoint that cannot be read (truncated or partly written files) is
    moved aside to `<workdir>/checkpoints_unreadable/<step>` -- never deleted
    -- with a warning, and the previous one is tried. A checkpoint of another
    model or shape is an error (UserError), not a fallback.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, description)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/OS/parse errors)
        moved = self._quarantine(step)
        logging.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
                        "falling back to the previous checkpoint", step, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "", moved)
    return None, None

  def _quarantine(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target_dir = self.directory.rstrip("/") + "_unreadable"
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}.{int(time.time())}")
    if jax.process_index() == 0:
      shutil.move(source, target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
