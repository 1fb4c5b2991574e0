"""Stronger models and training features (issue 5): each runs, learns and checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.data import augment
from fashion_jax.model import models, steps
from fashion_jax.support.errors import UserError
from fashion_jax.training import train
from tests.multidevice_check import final_state
from tests.conftest import ROOT


# "wrn" is covered by test_accelerator_recipe_runs_shrunk_on_cpu, and "resnet" is the same
# WideResNet class at another depth/width, so it runs with -m slow (the suite's time budget).
@pytest.mark.parametrize("name,kwargs", [("cnn_bn", {}),
                                         pytest.param("resnet", {}, marks=pytest.mark.slow)])
def test_models_train_with_batchnorm_state(tiny_config, tmp_path, name, kwargs):
  tiny_config.model = name
  tiny_config.model_kwargs = kwargs
  tiny_config.num_train_steps = 10
  tiny_config.eval_every_steps = 10
  workdir = str(tmp_path / name)
  result = train.train_and_evaluate(tiny_config, workdir)
  assert np.isfinite(result["eval_loss"])
  state = final_state(tiny_config, workdir)
  assert int(state.step) == 10
  _assert_running_stats_moved(tiny_config, state)


def _assert_running_stats_moved(config, state):
  """Every BatchNorm mean and variance moved from its initial value (mean 0, variance 1)."""
  init = steps.create_train_state(steps.create_model(config), steps.create_optimizer(config),
                                  config.seed)
  paths = jax.tree_util.tree_flatten_with_path(init.batch_stats)[0]
  assert {p[-1].key for p, _ in paths} == {"mean", "var"}, paths
  for (path, before), after in zip(paths, jax.tree.leaves(state.batch_stats)):
    assert np.all(np.asarray(before) == (1.0 if path[-1].key == "var" else 0.0))
    assert np.all(np.asarray(after) != np.asarray(before)), jax.tree_util.keystr(path)


def test_wrn_rejects_bad_depth():
  model = models.create_model("wrn", depth=12, width=1)
  with pytest.raises(ValueError, match="6n\\+4"):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_unknown_model_kwargs_are_a_config_error(tiny_config, tmp_path):
  tiny_config.model_kwargs = {"depht": 3}
  with pytest.raises(UserError, match="model_kwargs.*do not fit model 'cnn'"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "w"))


def test_augmentations():
  key = jax.random.key(0)
  images = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  np.testing.assert_array_equal(augment.random_translate(key, images, 0), images)
  shifted = augment.random_translate(key, images, 3)
  assert shifted.shape == images.shape
  assert not np.array_equal(shifted, images)
  np.testing.assert_array_equal(shifted, augment.random_translate(key, images, 3))  # Pure.
  flipped = np.asarray(augment.random_flip(key, images))
  same = [np.array_equal(a, b) for a, b in zip(flipped, np.asarray(images))]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, np.asarray(images))]
  assert all(s != m for s, m in zip(same, mirrored))  # Each image: as it was, or its mirror.
  assert 0 < sum(mirrored) < len(images), mirrored  # Some flipped, some not (this key: both).
  np.testing.assert_array_equal(augment.random_erasing(key, images, 0.0), images)
  erased = np.asarray(augment.random_erasing(key, images, 1.0))
  changed = (erased != np.asarray(images)).reshape(8, -1).mean(1)
  assert np.all(changed > 0.005) and np.all(changed < 0.5)
  assert augment.make_augment() is None


@pytest.mark.parametrize("native", [False, True])
def test_per_device_draws_are_the_global_batchs_rows(native):
  """What each of 4 devices draws under pmap (here vmap with the same axis name: the same
  collectives) is exactly its rows of the one-device draw: augmentation (translate, flip,
  erasing with its noise) and both dropout paths. Each device had drawn its own values."""
  from fashion_jax.model import models  # pylint: disable=import-outside-toplevel
  from fashion_jax.kernels import native as native_lib  # pylint: disable=import-outside-toplevel
  if native and not native_lib.available():
    pytest.skip("the native kernels (the native dropout mask) are unavailable here")
  key = jax.random.key(3)
  images = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  shards = images.reshape(4, 4, 28, 28, 1)
  recipe = augment.make_augment(translate=2, flip=True, erasing=0.7)
  whole = recipe(key, images)
  per_device = jax.vmap(lambda x: recipe(key, x, "d"), axis_name="d")(shards)
  np.testing.assert_array_equal(per_device.reshape(whole.shape), whole)
  drop = lambda axis: models.Dropout(0.3, deterministic=False, native=native, axis_name=axis)
  x = jax.random.normal(jax.random.key(2), (16, 7, 7, 8))
  rngs = {"dropout": jax.random.key(4)}
  whole = drop(None).apply({}, x, rngs=rngs)
  per_device = jax.vmap(lambda s: drop("d").apply({}, s, rngs=rngs), axis_name="d")(
      x.reshape(4, 4, 7, 7, 8))
  np.testing.assert_array_equal(per_device.reshape(whole.shape), whole)


def test_full_recipe_runs_and_reports_validation(tiny_config, tmp_path):
  tiny_config.update({
      "optimizer": "adamw", "weight_decay": 5e-4, "lr_schedule": "cosine", "warmup_steps": 5,
      "label_smoothing": 0.1, "ema_decay": 0.9, "augment_translate": 2, "augment_flip": True,
      "random_erasing": 0.5, "eval_flip_tta": True, "validation_size": 50})
  workdir = str(tmp_path / "recipe")
  train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(l) for l in f if "eval_loss" in l]
  assert evals and all({"val_loss", "val_accuracy"} <= set(e) for e in evals)
  state = final_state(tiny_config, workdir)
  assert state.ema_params is not None
  assert not np.array_equal(state.ema_params["Dense_1"]["kernel"], state.params["Dense_1"]["kernel"])


def test_accelerator_recipe_runs_shrunk_on_cpu(idx_dir, tmp_path):
  """configs/accelerator_best.py as it is (WRN, bf16, SGD, RE, EMA, TTA), only made small."""
  from fashion_jax import config_lib
  from tests.conftest import ROOT
  config = config_lib.load_file(os.path.join(ROOT, "configs", "accelerator_best.py"))
  assert config.model == "wrn" and config.random_erasing > 0 and config.compute_dtype == "bfloat16"
  config.update({"idx_dir": idx_dir, "model_kwargs": {"depth": 10, "width": 1},
                 "batch_size": 16, "num_train_steps": 8, "warmup_steps": 2, "validation_size": 32,
                 "eval_batch_size": 50, "eval_every_steps": 4, "log_every_steps": 4,
                 "checkpoint_every_steps": 4, "tensorboard_samples": 0})
  workdir = str(tmp_path / "wrn")
  result = train.train_and_evaluate(config, workdir)
  assert np.isfinite(result["eval_loss"]) and "val_accuracy" in result
  state = final_state(config, workdir)
  assert int(state.step) == 8 and state.ema_params is not None
  _assert_running_stats_moved(config, state)


def test_validation_split_is_fixed_and_disjoint(tiny_config):
  from fashion_jax.data import input_pipeline
  split = input_pipeline.load(tiny_config, "train")
  a_train, a_val = input_pipeline.hold_out(split, 40)
  b_train, b_val = input_pipeline.hold_out(split, 40)
  np.testing.assert_array_equal(a_val.images, b_val.images)
  np.testing.assert_array_equal(a_train.images, b_train.images)
  assert len(a_train) + len(a_val) == len(split) and len(a_val) == 40
  rows = lambda s: {bytes(image) + bytes([label]) for image, label in zip(s.images, s.labels)}
  assert len(rows(split)) == len(split)  # The synthetic images are distinct...
  assert not rows(a_train) & rows(a_val)  # ...so no example is in both parts,
  assert rows(a_train) | rows(a_val) == rows(split)  # and none is lost.
  with pytest.raises(UserError, match="validation_size"):
    input_pipeline.hold_out(split, len(split))


def test_flips_on_mnist_are_warned_about(caplog):
  """configs/cpu_best.py with --config.dataset=mnist mirrored digits without a word."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_file(os.path.join(ROOT, "configs", "cpu_best.py"))
  config_lib.validate(config)
  assert "mirror" not in caplog.text  # Garments: no warning.
  config.dataset = "mnist"
  config_lib.validate(config)
  assert ("--config.augment_flip=False --config.eval_flip_tta=False to turn the flips off"
          in caplog.text)


def test_settings_that_do_nothing_or_harm_are_warned_about(caplog):
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  config.eval_flip_tta = True  # Without flips in training: 89.4 -> 77.9 % measured.
  config_lib.validate(config)
  assert "eval_flip_tta=True without config.augment_flip" in caplog.text
  config = config_lib.load_file(os.path.join(ROOT, "configs", "cpu_best.py"))
  config.warmup_steps = 15
  config_lib.validate(config)
  assert "config.warmup_steps=15 does nothing with lr_schedule='onecycle'" in caplog.text
  config = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  config.weight_decay = 0.05  # Adam (the default) ignores it: silently, it was.
  config_lib.validate(config)
  assert "config.weight_decay=0.05 does nothing with optimizer='adam'; pass " in caplog.text
  caplog.clear()
  config.optimizer = "adamw"
  config_lib.validate(config)
  assert "weight_decay" not in caplog.text


@pytest.mark.parametrize("schedule, steps, epochs, warned", [
    ("cosine", -1, 2, True), ("cosine", 500, 5, True), ("constant", 300, 5, True),
    ("cosine", 501, 5, True), ("cosine", 502, 5, False), ("onecycle", 100, 5, False)])
def test_a_warmup_as_long_as_the_run_is_warned_about(caplog, schedule, steps, epochs, warned):
  """configs/accelerator_best.py shortened to 2 epochs (214 steps, warmup 500) trained silently
  at a learning rate that peaked only at its last step, with no cosine decay."""
  from fashion_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_file(os.path.join(ROOT, "configs", "accelerator_best.py"))
  config.lr_schedule, config.num_train_steps, config.num_epochs = schedule, steps, epochs
  total = config_lib.total_steps(config, 55000)
  assert total == (steps if steps > 0 else 214)
  assert ("config.warmup_steps=500 takes the whole run" in caplog.text) == warned
  if warned:
    assert f"({total} steps)" in caplog.text
  # (Where it warns, the schedule reaches the peak no sooner than the last step, 0-based.)
  from fashion_jax.model import steps as steps_lib  # pylint: disable=import-outside-toplevel
  lr = steps_lib.create_schedule(config, total)
  assert (lr(total - 2) < config.learning_rate) == warned or schedule == "onecycle"
  caplog.clear()  # No warm-up: nothing to warn about, however short the run (one step).
  config.warmup_steps, config.num_train_steps = 0, 1
  config_lib.total_steps(config, 55000)
  assert "warmup_steps" not in caplog.text


def test_warmup_steps_under_onecycle_do_not_block_a_resume():
  """onecycle ignores warmup_steps (its warm-up is its own), yet changing it refused a resume."""
  from fashion_jax.support import checkpoint_checks  # pylint: disable=import-outside-toplevel
  stored = {"lr_schedule": "onecycle", "warmup_steps": 0, "seed": 0}
  checkpoint_checks.check_fingerprint("10", stored, {**stored, "warmup_steps": 15})
  with pytest.raises(UserError, match="warmup_steps"):  # It matters to the other schedules.
    checkpoint_checks.check_fingerprint("10", {**stored, "lr_schedule": "cosine"},
                                        {**stored, "lr_schedule": "cosine", "warmup_steps": 15})
