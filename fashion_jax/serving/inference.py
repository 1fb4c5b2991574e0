"""A trained model, loaded from a workdir, as a jitted uint8-images -> probabilities function.

Shared by `fashion_jax.predict`, `fashion_jax.evaluate` and `fashion_jax.export`.
The run's own `config.json` rebuilds the model, and the checkpoint is restored
through the same compatibility checks as a resumed training run. Evaluation
uses exactly what training's evaluation used: the EMA parameters when the run
kept them, BatchNorm statistics, and flip test-time augmentation when the run
evaluated with it.

Which checkpoint: the best one by validation accuracy when the run held out a
validation split (`validation_size` > 0) and evaluated at a retained
checkpoint's step; otherwise the latest. The test split is never used to pick.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fashion_jax import config_lib
from fashion_jax.data import datasets
from fashion_jax import default_config
from fashion_jax.model import steps
from fashion_jax.support import checkpointing
from fashion_jax.support.errors import UserError
from fashion_jax.support.paths import others_could_write, put_by_others
from fashion_jax.support import metric_writers
from fashion_jax.support import storage

CLASS_NAMES = datasets.CLASS_NAMES["fashion_mnist"]


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  path = storage.join(workdir, "config.json")
  if not storage.isdir(workdir):
    what = "is a file, not a folder" if storage.exists(workdir) else "does not exist"
    raise UserError(f"--workdir {workdir!r} {what}; pass the --workdir of a training run "
                    "(python -m fashion_jax.main --config=... --workdir=DIR)")
  if not storage.exists(path):
    raise UserError(f"{path} not found: {workdir!r} is not a fashion_jax training run; "
                    + _inside_a_run(workdir))
  damaged = f"; it should be the JSON settings object training wrote (restore {path}, or retrain)"
  try:
    values = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8.
    raise UserError(f"cannot read {path} ({e}){damaged}") from e
  if not isinstance(values, dict):
    raise UserError(f"{path} holds {json.dumps(values)[:40]}, not a settings object{damaged}")
  values.pop("_derived", None)
  # The saved values over the current defaults: keys added since that run keep their
  # defaults (what that run did before they existed); keys since removed are dropped.
  config = default_config.get_config()
  unknown = sorted(set(values) - set(config.keys()))
  if unknown:
    logging.info("%s: ignoring settings this version no longer has: %s", path, ", ".join(unknown))
  for key in sorted(set(values) - set(unknown)):
    try:
      config.update({key: values[key]})
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # ml_collections' type checks
      raise UserError(f"{path}: setting {key!r} = {values[key]!r} does not fit this version's "
                      f"config ({type(e).__name__}){damaged}") from e
  try:
    config_lib.validate(config, serving=True)
  except UserError as e:
    raise UserError(f"{path}: {e}; this version refuses that saved setting: use the fashion_jax "
                    "version that trained the run, or correct the value in that file") from e
  except AttributeError as e:
    raise UserError(f"{path} lacks a setting this version of fashion_jax needs ({e}); use the "
                    "fashion_jax version that trained it") from e
  return config


def _inside_a_run(workdir: str) -> str:
  """What to pass where `workdir` is not a run: the run it is in, where it is one's checkpoints
  folder or a checkpoint (--workdir=RUN/checkpoints/20: --workdir=RUN --step=20)."""
  parts = os.path.normpath(workdir).split(os.sep)
  for up in (1, 2):
    run = os.sep.join(parts[:-up])
    if not storage.is_url(workdir) and run and parts[-up] == "checkpoints" and os.path.isfile(
        os.path.join(run, "config.json")):
      step = (f" --step={parts[-1]} (a checkpoint is picked by its step)"
              if up == 2 and parts[-1].isdigit() else "")
      return f"it is in the run {run}: pass --workdir={run}{step}"
  return "pass the --workdir that python -m fashion_jax.main wrote"


def recorded_idx_folder(workdir: str) -> tuple[str | None, str | None]:
  """(folder, None): the local IDX folder training read its data from, as config.json records it
  (`_derived.data_source`: "IDX folder /data/fm ($FASHION_JAX_IDX_DIR)"), resolved, where no
  other user could have written its data (support.paths.others_could_write); else (None, why
  not), or (None, None) where config.json records no local folder (a bucket, an older run)."""
  try:
    values = json.loads(storage.read_text(storage.join(workdir, "config.json")))
    described = values["_derived"]["data_source"]
  except (OSError, ValueError, KeyError, TypeError):  # No record: an older or edited run.
    return None, None
  found = re.fullmatch(r"IDX folder (/.+) \((\$FASHION_JAX_IDX_DIR|config\.idx_dir)\)",
                       described) if isinstance(described, str) else None
  if not found:
    return None, None
  try:
    folder, unsafe = others_could_write(found.group(1))  # (Resolved once: that is read.)
  except OSError as e:  # Gone, or a folder on the way not searchable.
    folder, unsafe = None, f"{found.group(1)}: {e.strerror or e}"
  return (None, unsafe) if unsafe else (folder, None)


def _eval_accuracies(workdir: str, key: str) -> dict[int, float]:
  return {r["step"]: float(r[key]) for r in metric_writers.read_lines(workdir)
          if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
          and math.isfinite(r[key])}  # An edited or damaged value is no accuracy.


def choose_step(workdir: str, steps: list[int]) -> tuple[int, str]:
  """(step, why): the best retained checkpoint by validation accuracy, else the latest."""
  if not steps:
    raise UserError(f"no checkpoint in {storage.join(workdir, 'checkpoints')}; train first "
                    "(python -m fashion_jax.main ... --workdir=" + workdir + ")")
  val = _eval_accuracies(workdir, "val_accuracy")
  scored = [(val[s], s) for s in steps if s in val]
  if scored:
    accuracy, step = max(scored)  # Ties: the later step.
    return step, f"best validation accuracy {100 * accuracy:.2f}% of {len(scored)} evaluated checkpoints"
  return max(steps), "latest: no validation split to pick the best by"


@dataclasses.dataclass
class _Params:
  params: Any  # What checkpointing.describe_state reads.


@dataclasses.dataclass
class Classifier:
  """A trained model: `probabilities(uint8 images) -> [N, 10]`, jitted, fixed-size batches."""
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  step: int
  why: str
  checkpoint_dir: str
  batch_size: int = 256

  @property
  def class_names(self) -> tuple[str, ...]:
    return datasets.class_names(self.config.get("dataset", "fashion_mnist"))

  def apply_uint8(self, variables, images: jax.Array) -> jax.Array:
    """Logits of uint8 images [N, 28, 28] or [N, 28, 28, 1]; pure, so it can be jitted/exported."""
    if images.ndim == 3:
      images = images[..., None]
    return steps.eval_logits(self.model, variables, images, self.config.eval_flip_tta)

  @functools.cached_property
  def _jitted_logits(self):
    return jax.jit(self.apply_uint8)

  @functools.cached_property
  def _scanned_logits(self):
    """Logits of stacked batches [num_batches, batch, ...] in one call, a `lax.scan` over them
    as training's evaluation runs its batches (steps.eval_sums): XLA compiles the model in a
    loop body unlike alone, and bfloat16 logits rounded otherwise (evaluate's accuracy was 2 in
    10,000 off training's own for a bfloat16 run)."""
    def scanned(variables, batches):
      return jax.lax.scan(lambda _, batch: (None, self.apply_uint8(variables, batch)),
                          None, batches)[1]
    return jax.jit(scanned)

  def logits(self, images: np.ndarray, scan: bool = False) -> np.ndarray:
    """Logits [N, classes] of uint8 images, in padded batches of `batch_size`. `scan`: all the
    batches in one call, as training's evaluation (evaluate: its logits, bfloat16's rounding
    included; a program per number of batches); else one program for any number of images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:3] != (28, 28):
      raise ValueError(f"expected uint8 images [N, 28, 28(, 1)], got {images.dtype} {images.shape}")
    n = len(images)
    if not n:
      return np.zeros((0, len(self.class_names)), np.float32)
    padding = -n % self.batch_size  # Padded to whole batches: one compiled batch shape.
    if padding:
      images = np.concatenate([images, np.zeros((padding,) + images.shape[1:], images.dtype)])
    batches = images.reshape((-1, self.batch_size) + images.shape[1:])
    if scan:
      logits = np.asarray(self._scanned_logits(self.variables, batches))
    else:
      logits = np.stack([np.asarray(self._jitted_logits(self.variables, b)) for b in batches])
    return logits.reshape((-1,) + logits.shape[2:])[:n]

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(self.logits(images), axis=-1))


def _tree(folder: str) -> list[str]:
  """A local folder and everything under it (links not followed into); [] for gs://."""
  found = [] if storage.is_url(folder) else [folder]
  for root, dirs, files in os.walk(found[0]) if found else ():
    found += [os.path.join(root, name) for name in dirs + files]
  return found


def _refuse_open_to_others(workdir: str, paths: list[str]) -> None:
  """A UserError where another user could have written what would be served (another owner is
  fine, a teammate's run, but for the last case): one of the local `paths` every user may write (a folder, or a file in
  it: config.json, a checkpoint's), or a folder above the workdir every user may write without
  the sticky bit (anyone could have put another run in its place), or an entry on the way that
  is neither this user's nor root's in a sticky one (/tmp: whoever made /tmp/fj first)."""
  if storage.is_url(workdir) or os.environ.get(storage.TRUST_ENV) == "1":
    return
  for named in dict.fromkeys((os.path.abspath(workdir), os.path.realpath(workdir))):
    try:
      why = put_by_others(named)
    except OSError:  # Said when the run is read.
      why = None
    if why and why.startswith("the folder "):
      raise UserError(f"{why}: anyone could have put another run in place of {workdir} that "
                      "this would serve; chmod o-w that folder (or +t), or set "
                      f"{storage.TRUST_ENV}=1 if nobody else can reach it")
    if why:
      raise UserError(f"{why}: anyone could have made it there before the run you mean (a "
                      f"squatted /tmp/fj); set {storage.TRUST_ENV}=1 if it is a teammate's run "
                      "you trust, or use a run of your own")
  if open_to_all := storage.writable_by_all(paths):
    raise UserError(f"{open_to_all} is writable by every user: anyone could have put the "
                    f"checkpoint or config.json there that this would serve; chmod o-w "
                    f"{open_to_all}, or set {storage.TRUST_ENV}=1 if nobody else can reach it")


def load(workdir: str, step: int | None = None, batch_size: int = 256,
         portable: bool = False) -> Classifier:
  """Loads a training run's model and checkpoint (`step`, else the best/latest one). The model
  is evaluation's (`steps.create_model`): the native CPU kernels where they are built, unless
  `portable` (XLA's ops only, for export)."""
  workdir = storage.resolve(workdir, "--workdir")
  directory = storage.join(workdir, "checkpoints")
  _refuse_open_to_others(workdir, [workdir, storage.join(workdir, "config.json"),
                                   storage.join(workdir, "metrics.jsonl"), directory])
  config = load_run_config(workdir)
  if not storage.isdir(directory):
    raise UserError(f"no checkpoints folder in {workdir}; train first, or pass the right --workdir")
  try:
    checkpointer = checkpointing.Checkpointer(directory, keep=max(config.keep_checkpoints, 1),
                                              async_save=False)
  except OSError as e:
    raise storage.unreadable(directory, e) from e
  try:
    try:
      saved = checkpointer.all_steps()
    except OSError as e:
      raise storage.unreadable(directory, e) from e
    if step is None:
      step, why = choose_step(workdir, saved)
    elif step not in saved:
      raise UserError(f"no checkpoint at step {step} in {directory}; available: "
                      f"{', '.join(map(str, saved)) or 'none'}")
    else:
      why = "requested with --step"
    model = steps.create_model(config, training=False, portable=portable)  # Builds nothing.
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1,) + steps.IMAGE_SHAPE, jnp.float32))["params"]
    description = checkpointing.describe_state(config.model, _Params(params))
    for attempt in range(3):
      try:
        _refuse_open_to_others(workdir, _tree(storage.join(directory, str(step))))
        weights = checkpointer.restore_weights(step, description)
        break
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/OS/parse errors)
        where = storage.join(directory, str(step))
        try:
          now = checkpointer.all_steps(read=True)
        except OSError as listing:
          raise storage.unreadable(directory, listing) from e
        if step in now:
          others = ", ".join(str(s) for s in now if s != step)
          fix = (f"pass --step with another checkpoint ({others}), or re-train" if others else
                 "re-train (it is the only checkpoint)")
          raise UserError(f"checkpoint {where} is unreadable ({checkpointing.first_line(e)}); "
                          f"{fix}") from e
        # Deleted while it was read: a run still training into this workdir keeps only its
        # newest checkpoints (and its best). Choose again among those it keeps now.
        if why == "requested with --step" or not now or attempt == 2:
          raise UserError(f"checkpoint {where} was deleted while it was read (is a run still "
                          "training into this workdir?); run the command again" +
                          (f", with --step from {', '.join(map(str, now))}" if now else "")) from e
        step, why = choose_step(workdir, now)
  finally:
    checkpointer.close()
  return Classifier(config=config, model=model,
                    variables=steps.eval_variables(**weights), step=int(step), why=why,
                    checkpoint_dir=storage.join(directory, str(step)), batch_size=batch_size)
