"""Orbax checkpoints of the train state, with a compatibility check on restore.

Each checkpoint holds the whole train state (step, params, optimizer state,
RNG, BatchNorm statistics) and a small JSON description of the model it
belongs to, so restoring into a different model fails with a clear message
instead of a shape error deep inside Orbax.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from fashion_jax.errors import UserError


def describe_state(model_name: str, state) -> dict:
  """The JSON stored beside each checkpoint: model name and parameter shapes."""
  shapes = {jax.tree_util.keystr(path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return {"model": model_name, "param_shapes": shapes}


class Checkpointer:
  """Periodic and final saves, keep-N, async writes, restore of the latest step."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, description: dict) -> None:
    """Starts a save (asynchronous: the device arrays are copied before it returns)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(description)), force=True)

  def restore(self, step: int, abstract_state, description: dict):
    """Restores `step` into the structure/shardings of `abstract_state`.

    Raises UserError if the checkpoint belongs to a different model or shape.
    """
    where = os.path.join(self.directory, str(step))
    try:
      stored = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # Missing or unreadable description.
      raise UserError(f"checkpoint {where} has no readable model description ({e}); it was not "
                      "written by fashion_jax: use a new --workdir") from e
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
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state))).state
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"checkpoint {where} does not fit the configured train state "
                      f"({str(e).splitlines()[0]}); was it written with another optimizer? "
                      "Use a new --workdir or the config it was trained with") from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
