"""Config helpers: loading config files by path, validation, derived values.

Epochs are converted to steps here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

from fashion_jax.data import datasets
from fashion_jax.support.errors import UserError

DATASETS = tuple(datasets.CLASS_NAMES)  # Same IDX format, shape and number of classes.
PARALLELISM = ("auto", "mesh", "pmap", "none")
DISTRIBUTED = ("auto", "on", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
MAX_EVAL_BATCH = 1 << 20  # 100,000 took 1.8 GB on the CPU; beyond ~2**63 NumPy cannot shape it.
# The train state's step counter is int32; intervals past 2**63 were NumPy overflow tracebacks.
MAX_STEPS = 2**31 - 1
# The choices of settings whose code imports JAX, here so that a config is checked before JAX
# loads (`validate(..., model=False)`); tests/test_train.py checks they match model/models.py's,
# kernels/ops.py's and training/loop.py's.
MODELS = ("cnn", "cnn_bn", "linear", "resnet", "wrn")
CONV_IMPLS = ("auto", "xla", "im2col", "winograd", "native")
POOL_IMPLS = ("auto", "xla", "reshape", "select")
DATA_PLACEMENTS = ("auto", "host", "device")


def _private_group(gid: int) -> bool:
  """Whether the group `gid` is this user's alone: a user-private group (Debian and Ubuntu give
  each user one, and umask 002 then makes a checkout group-writable), no other member."""
  import grp  # pylint: disable=g-import-not-at-top  (POSIX only, like the check itself)
  import pwd  # pylint: disable=g-import-not-at-top
  try:
    if gid != os.getgid() or grp.getgrgid(gid).gr_mem:
      return False
    return all(user.pw_gid != gid for user in pwd.getpwall() if user.pw_uid != os.getuid())
  except KeyError:  # A group or user with no name.
    return False


def others_could_write(path: str) -> str | None:
  """Why another user could have written (or swapped in) the file `path`, or None.

  The file, and every folder above it (as named and as resolved), must belong to this user or
  root and be writable by nobody else: not by others, nor by a group that is not this user's
  alone; a folder may be, with the sticky bit (/tmp): there nobody can replace another's entry.
  (A folder further up that others may write lets them rename this one away and put theirs.)
  The user who owns fashion_jax itself counts as this user, and a group that may write its folder
  as this user's own: running its code trusts them already (a checkout bind-mounted into a
  container, its files the host user's, run as root; a team's group-writable checkout).
  """
  package = os.stat(os.path.dirname(os.path.abspath(__file__)))
  owners = {os.getuid(), 0, package.st_uid}
  team = package.st_gid if package.st_mode & 0o020 else None
  real = os.path.realpath(path)
  items, seen = [(real, False)], set()
  for folder in (os.path.dirname(real), os.path.dirname(os.path.abspath(path))):
    while folder not in seen:
      seen.add(folder)
      items.append((folder, True))
      folder = os.path.dirname(folder)
  for item, is_folder in items:
    info = os.stat(item)
    if info.st_uid not in owners:
      return f"{item} belongs to another user (uid {info.st_uid})"
    if is_folder and info.st_mode & 0o1000:  # Sticky (/tmp): writable by anyone, it is fine.
      continue
    own_group = (not info.st_mode & 0o020  # (Asked only then: _private_group lists every
                 or info.st_gid == team or _private_group(info.st_gid))  # user.)
    if info.st_mode & (0o002 if own_group else 0o022):
      return (f"{item} is writable by its group or others (mode {info.st_mode & 0o7777:o}; "
              f"chmod go-w {item} if that is not meant)")
  return None


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `path`, as `--config=path` loads it (the command line
  first refuses a file others could have written: cli, others_could_write)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"fashion_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_sibling(config_file: str, name: str) -> ml_collections.ConfigDict:
  """Returns `get_config()` of `<name>.py` in the folder of `config_file`.

  Lets configs build on each other without `configs/` being an importable package (the shipped
  ones build on `fashion_jax.default_config` instead). A file another user could have written is
  not run: a config copied into a shared folder must not pick up someone's `default.py` there.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  try:
    unsafe = others_could_write(path)
  except OSError as e:
    raise UserError(f"{config_file} builds on {path}, which cannot be read ({e.strerror}); put "
                    f"{name}.py beside it, or start from fashion_jax.default_config") from e
  if unsafe:
    raise UserError(f"{config_file} builds on {path}, which is not run: {unsafe}; or start from "
                    "the packaged defaults instead (from fashion_jax.default_config import "
                    "get_config)")
  return load_file(path)


def validate(config: ml_collections.ConfigDict, serving: bool = False, warn: bool = True,
             model: bool = True) -> None:
  """Checks every value before anything is loaded or compiled.

  Raises UserError with one line per problem, each naming the key and the fix. `serving`: a
  trained run's saved config, for inference -- the optimizer's and the data order's settings
  are not checked (they no longer matter, and an older version may have allowed more).
  `model=False`: all but `model_kwargs`, whose check builds the model (flax, so JAX): a
  command's first check, a mistake said in a fraction of a second, not after JAX's import.
  """
  import math  # pylint: disable=g-import-not-at-top
  import numbers  # pylint: disable=g-import-not-at-top
  from fashion_jax.support import backends  # pylint: disable=g-import-not-at-top
  if not serving:
    _check_keys(config)
  problems = []

  def check(ok: bool, key: str, want: str):
    if not ok:
      problems.append(f"config.{key}={config.get(key)!r} is invalid: {want}")

  def number(key: str) -> bool:  # A real, finite number (nan and inf pass some comparisons).
    value = config.get(key)
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))

  def whole(key: str) -> bool:
    return isinstance(config.get(key), numbers.Integral) and not isinstance(config.get(key), bool)

  def choice(key: str, choices):
    check(config.get(key) in choices, key, f"use one of {', '.join(map(str, choices))}")

  choice("dataset", DATASETS)
  choice("model", MODELS)
  choice("conv_impl", CONV_IMPLS)
  choice("pool_impl", POOL_IMPLS)
  choice("optimizer", OPTIMIZERS)
  choice("parallelism", PARALLELISM)
  choice("backend", backends.BACKENDS)
  choice("distributed", DISTRIBUTED)
  choice("on_nonfinite", ("stop", "skip"))
  choice("lr_schedule", SCHEDULES)
  choice("compute_dtype", ("float32", "bfloat16"))
  choice("progress_bar", ("auto", "on", "off"))
  check(whole("tensorboard_samples") and config.tensorboard_samples >= 0, "tensorboard_samples",
        "zero or more images")
  check(number("ema_decay") and 0 <= config.ema_decay < 1, "ema_decay", "in [0, 1) (0 = off)")
  most = f" (at most {MAX_STEPS:,}: the step counter is int32)"
  if not serving:  # (A run trained before a check was added is still served.)
    # At 4,000 the grid was a 263 MB image, drawn for 2.5 s at every evaluation.
    check(config.tensorboard_samples <= 256, "tensorboard_samples", "0 (off) to 256 images")
    check(whole("warmup_steps") and 0 <= config.warmup_steps <= MAX_STEPS, "warmup_steps",
          "zero or more steps" + most)
    check(number("weight_decay") and config.weight_decay >= 0, "weight_decay",
          "a finite number, zero or more")
    check(number("momentum") and 0 <= config.momentum < 1, "momentum",
          "in [0, 1) (sgd's momentum)")
    check(number("label_smoothing") and 0 <= config.label_smoothing < 1, "label_smoothing",
          "in [0, 1)")
    # Wider than the 28-pixel image only pads in blank images (and huge pads overflow).
    check(whole("augment_translate") and 0 <= config.augment_translate <= 28,
          "augment_translate", "0 to 28 pixels (the image side)")
    check(number("random_erasing") and 0 <= config.random_erasing <= 1, "random_erasing",
          "a probability in [0, 1]")
    # np.random.default_rng (the epoch order) takes no negative seed, and without
    # jax_enable_x64 jax.random.key keeps only the low 32 bits (2**32 trains like 0) and
    # overflows past 2**63.
    check(whole("seed") and 0 <= config.seed < 2**32, "seed", "a whole number in [0, 2**32), "
          "i.e. 0 to 4294967295")
    check(number("learning_rate") and config.learning_rate > 0, "learning_rate",
          "a positive finite number")
  check(config.validation_size >= 0, "validation_size", "zero or more examples")
  if model and config.model in MODELS:
    # Here, not at the top: loading a config file (which imports this module) needs no JAX.
    from fashion_jax.model import models  # pylint: disable=g-import-not-at-top
    try:
      wrong = models.setting_problems(
          models.create_model(config.model, **config.model_kwargs.to_dict()))
    except TypeError as e:
      wrong = [str(e)]
    if wrong:
      problems.append(f"config.model_kwargs={config.model_kwargs.to_dict()} do not fit model "
                      f"{config.model!r}: {'; '.join(wrong)}")
  # (jax.distributed takes an int32: past it "could not join ... incompatible function arguments".)
  check(0 < config.distributed_timeout_s < 2**31, "distributed_timeout_s",
        "a positive number of seconds, at most 2,147,483,647")
  check(isinstance(config.idx_dir, str), "idx_dir",
        "a folder path, or '' ($FASHION_JAX_IDX_DIR, else tfds, else the download)")
  check(config.batch_size > 0, "batch_size", "a positive global batch size")
  check(0 < config.eval_batch_size <= MAX_EVAL_BATCH, "eval_batch_size",
        f"a positive global batch size, at most {MAX_EVAL_BATCH:,} (the test set is padded to it)")
  check(0 < config.num_train_steps <= MAX_STEPS
        or (config.num_train_steps == -1 and config.num_epochs > 0),  # (Too many: total_steps.)
        "num_train_steps", "a positive step count, or -1 with num_epochs > 0" + most)
  check(0 < config.log_every_steps <= MAX_STEPS, "log_every_steps",
        "a positive number of steps" + most)
  check(0 < config.checkpoint_every_steps <= MAX_STEPS or config.checkpoint_every_steps == -1,
        "checkpoint_every_steps", "a positive number of steps, or -1 for every epoch" + most)
  check(config.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
  check(0 < config.eval_every_steps <= MAX_STEPS or config.eval_every_steps == -1,
        "eval_every_steps", "a positive number of steps, or -1 for every epoch" + most)
  check(1 <= config.steps_per_dispatch <= MAX_STEPS or config.steps_per_dispatch == -1,
        "steps_per_dispatch", "at least 1, or -1 for auto" + most)
  choice("data_placement", DATA_PLACEMENTS)
  if problems:
    raise UserError("; ".join(problems))
  if warn and not serving:  # (`warn=False`: a first check; training's own warns.)
    _warn_about_settings_that_hurt(config)


def _check_keys(config: ml_collections.ConfigDict) -> None:
  """A config file's keys are default_config's: one it lacks was an AttributeError traceback,
  and a mistyped one (`c.lerning_rate = 0.5`) was kept and ignored, the run trained at the
  default. (Command-line overrides are checked by absl: --config.lerning_rate is an error.)"""
  import difflib  # pylint: disable=g-import-not-at-top
  from fashion_jax import default_config  # pylint: disable=g-import-not-at-top
  known, have = set(default_config.get_config().keys()), set(config.keys())
  problems = []
  for key in sorted(have - known):
    close = difflib.get_close_matches(key, known, n=1)
    problems.append(f"config.{key} is no setting of fashion_jax"
                    + (f" (did you mean config.{close[0]}?)" if close else ""))
  if known - have:
    lacks = sorted(known - have)
    problems.append(f"the config lacks {', '.join(lacks[:6])}"
                    + (f" and {len(lacks) - 6} more keys" if len(lacks) > 6 else ""))
  if problems:
    raise UserError("; ".join(problems) + "; a config file starts from "
                    "fashion_jax.default_config.get_config() and changes its keys")


def _warn_about_settings_that_hurt(config: ml_collections.ConfigDict) -> None:
  """Valid settings that do nothing, or harm, in this combination: a warning each."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  flips = [k for k in ("augment_flip", "eval_flip_tta") if config.get(k)]
  if config.dataset == "mnist" and flips:
    logging.warning("config.dataset='mnist' with %s: mirrored digits are no digits any more (a 3 "
                    "mirrors into an Ɛ); these recipes were made for garments, "
                    "which mirror into themselves. Pass %s to turn the flips off",
                    " and ".join(f"config.{k}=True" for k in flips),
                    " ".join(f"--config.{k}=False" for k in flips))
  elif config.eval_flip_tta and not config.augment_flip:
    logging.warning("config.eval_flip_tta=True without config.augment_flip: the evaluation "
                    "averages in mirrored images the model never trained on, which lowers its "
                    "accuracy (89.4 -> 77.9 % on a default-config run); pass "
                    "--config.augment_flip=True, or --config.eval_flip_tta=False")
  if config.optimizer == "adam" and config.weight_decay:
    logging.warning("config.weight_decay=%g does nothing with optimizer='adam'; pass "
                    "--config.optimizer=adamw for Adam with decoupled weight decay",
                    config.weight_decay)
  if config.lr_schedule == "onecycle" and config.warmup_steps:
    logging.warning("config.warmup_steps=%d does nothing with lr_schedule='onecycle', whose "
                    "warm-up is part of the schedule (its first 30 %% of the steps)",
                    config.warmup_steps)


# What fixes a run's data order, learning-rate schedule, update rule and model: a resume
# that would change any of them is refused (keys that change nothing -- logging, eval and
# checkpoint intervals, op formulations, placement, parallelism -- may change).
FINGERPRINT_KEYS = (
    "dataset", "seed", "batch_size", "validation_size", "augment_translate", "augment_flip",
    "random_erasing", "model", "model_kwargs", "compute_dtype", "optimizer", "learning_rate",
    "lr_schedule", "warmup_steps", "weight_decay", "momentum", "label_smoothing", "ema_decay")


def fingerprint(config: ml_collections.ConfigDict, train_examples: int, total_steps: int,
                train_data: str | None = None) -> dict:
  """The values of FINGERPRINT_KEYS, the train split's size, the total steps where the
  schedule depends on them (cosine/onecycle, or a warmup longer than the run), and the digest
  of the train split in its order (`input_pipeline.digest`: another source's order is another
  run's data order and validation set)."""
  values = {key: config[key].to_dict() if isinstance(config[key], ml_collections.ConfigDict)
            else config[key] for key in FINGERPRINT_KEYS}
  values["train_examples"] = train_examples
  if train_data is not None:
    values["train_data"] = train_data
  if config.lr_schedule != "constant" or config.warmup_steps >= total_steps:
    values["total_steps"] = total_steps
  return json.loads(json.dumps(values))  # As the checkpoint's JSON gives it back.


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  steps = num_train_examples // config.batch_size
  if steps == 0:
    held = config.get("validation_size", 0)
    if held > 0:  # The split is what validation_size leaves: either setting fixes it.
      raise UserError(f"config.batch_size={config.batch_size} is larger than the "
                      f"{num_train_examples} training examples left after "
                      f"config.validation_size={held}; lower batch_size to "
                      f"{num_train_examples} or less, or lower validation_size")
    raise UserError(f"config.batch_size={config.batch_size} is larger than the "
                    f"{num_train_examples} training examples; lower it")
  return steps


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.num_train_steps > 0:
    steps = config.num_train_steps
  else:
    steps = config.num_epochs * steps_per_epoch(config, num_train_examples)
    if steps > MAX_STEPS:
      raise UserError(f"config.num_epochs={config.num_epochs} is {steps:,} steps at batch "
                      f"{config.batch_size}, more than the {MAX_STEPS:,} the step counter (int32) "
                      "holds; lower it")
  if (config.lr_schedule != "onecycle" and config.warmup_steps > 0
      and 0 < steps <= config.warmup_steps + 1):  # (Steps count from 0.)
    # (Warned, not refused: a recipe tried for a few steps is a fair use.)
    # The schedule squeezes the warm-up into the run: configs/accelerator_best.py shortened to
    # --config.num_epochs=2 (214 steps, warmup 500) trained without a word at a learning rate
    # that reached its peak only at the last step, and never decayed.
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("config.warmup_steps=%d takes the whole run (%d steps): the learning "
                    "rate ramps up over the whole run and reaches config.learning_rate=%g only at "
                    "its last step%s; pass --config.warmup_steps=N with N well under %d, or train "
                    "longer", config.warmup_steps, steps, config.learning_rate,
                    " (the cosine decay never runs)" if config.lr_schedule == "cosine" else "",
                    steps)
  return steps


def eval_every_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.eval_every_steps > 0:
    return config.eval_every_steps
  return steps_per_epoch(config, num_train_examples)


def checkpoint_every_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.checkpoint_every_steps > 0:
    return config.checkpoint_every_steps
  return steps_per_epoch(config, num_train_examples)
