"""End-to-end: train, checkpoint, resume, re-evaluate, and the errors users see."""

import errno
import gc
import glob
import json
import logging
import os
import functools
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fashion_jax.model import steps
from fashion_jax.support import compile_ahead
from fashion_jax.support import parallel as parallel_lib
from fashion_jax.support.errors import UserError
from fashion_jax.training import loop
from fashion_jax.training import train
from fashion_jax.training import workdir as workdir_lib
from tests.conftest import ROOT, assert_one_line_error, run_module, run_module_noting_jax
from tests.conftest import tensorboard_events
from tests.multidevice_check import final_state


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tensorboard_values(workdir) -> dict[str, list]:
  """tag -> [value kinds] from the TFRecord event files (no TensorFlow needed)."""
  found = {}
  folder = os.path.join(workdir, "tensorboard")
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    for event in tensorboard_events(data):
      for value in event.summary.value:
        found.setdefault(value.tag, []).append(value.WhichOneof("value"))
  return found


def test_tensorboard_shows_a_resumed_runs_steps_once(tiny_config, tmp_path):
  """An attempt killed after logging past its last checkpoint: the resumed run logs those steps
  again, and TensorBoard showed both (metrics.jsonl drops them). Read the way TensorBoard does:
  file after file, a SessionLog START at step s dropping the earlier files' points from s on."""
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config, str(workdir))  # Checkpoints 10 and 20; points 5..20.
  shutil.rmtree(workdir / "checkpoints" / "20")  # As if killed before saving step 20.
  time.sleep(1.1)  # The event files' names hold the second they were made.
  train.train_and_evaluate(tiny_config, str(workdir))  # Resumes from 10: logs 15 and 20 again.
  folder = workdir / "tensorboard"
  points = {}
  for name in sorted(os.listdir(folder)):
    for event in tensorboard_events((folder / name).read_bytes()):
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        points = {tag: [s for s in steps if s < event.step] for tag, steps in points.items()}
      for value in event.summary.value:
        points.setdefault(value.tag, []).append(event.step)
  assert len(os.listdir(folder)) == 2
  assert points["train_loss"] == [5, 10, 15, 20], points


@pytest.mark.parametrize("full_for", ["x", "a"])  # config.json's write, metrics.jsonl's appends.
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_config, tmp_path, monkeypatch,
                                                               full_for):
  """The free-space check runs before a save only: a disk that filled up between saves met the
  metrics writer first, a traceback (exit 1) raised again on the way out."""
  import builtins  # pylint: disable=import-outside-toplevel
  import errno  # pylint: disable=import-outside-toplevel
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(workdir))
  lines = (workdir / "metrics.jsonl").read_text()

  def full(path, mode="r", *args, **kwargs):
    if full_for in mode:
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return builtins.open(path, mode, *args, **kwargs)

  monkeypatch.setattr(storage, "open", full, raising=False)
  tiny_config.num_train_steps = 20
  with pytest.raises(UserError, match=rf"no space left where {workdir}/\S+ is written \(No space "
                     r"left on device\); free some space .* resumes from the last checkpoint"):
    train.train_and_evaluate(tiny_config, str(workdir))
  monkeypatch.undo()
  assert (workdir / "metrics.jsonl").read_text() == lines
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  train.train_and_evaluate(tiny_config, str(workdir))  # Space again: it resumes.
  assert _lines(workdir)[-1]["step"] == 20


def test_train_writes_outputs_and_learns(tiny_config, tmp_path):
  tiny_config.num_train_steps = 60
  tiny_config.eval_every_steps = 30
  tiny_config.checkpoint_every_steps = 30
  tiny_config.tensorboard_samples = 16
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(tiny_config, workdir)
  assert result["eval_accuracy"] > 0.5  # Synthetic bars are easy; chance is 0.1.
  lines = _lines(workdir)
  train_lines = [l for l in lines if "train_loss" in l]
  eval_lines = [l for l in lines if "eval_loss" in l]
  assert [l["step"] for l in train_lines] == list(range(5, 61, 5))
  assert [l["step"] for l in eval_lines] == [30, 60]
  for line in train_lines:
    assert {"step", "epoch", "train_loss", "train_accuracy", "learning_rate",
            "wall_time_s"} <= set(line)
  # Windows of 15 steps (divides the 30-step intervals, fits the 16-step epoch); the first one
  # also compiled, so its lines carry no rate, and every later one's do.
  assert [l["step"] for l in train_lines if "train_images_per_sec" in l] == list(range(20, 61, 5))
  assert train_lines[-1]["learning_rate"] == pytest.approx(tiny_config.learning_rate)
  for line in eval_lines:
    assert {"step", "epoch", "eval_loss", "eval_accuracy", "wall_time_s"} <= set(line)
  assert train_lines[-1]["train_loss"] < train_lines[0]["train_loss"]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["batch_size"] == 16 and config["_derived"]["total_steps"] == 60
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30", "60"]
  tensorboard = _tensorboard_values(workdir)
  for tag in ("train_loss", "train_accuracy", "train_images_per_sec", "learning_rate", "eval_loss",
              "eval_accuracy"):
    assert "simple_value" in tensorboard[tag], tag
  # One grid of sample test images with their predictions per evaluation.
  assert tensorboard["eval/sample_predictions"] == ["image", "image"]


@pytest.mark.parametrize("ahead", [True, False])
def test_evaluations_compile_ahead_unless_told_not_to(tiny_config, tmp_path, monkeypatch, ahead,
                                                      caplog):
  """By default each evaluation (test and validation) is compiled in the background, and its
  first call runs that program; the benchmark's loop timing turns this off."""
  made = []

  class Recorded(compile_ahead.CompiledAhead):
    def __init__(self, *args):
      super().__init__(*args)
      made.append(self)
      self.calls = 0

    def __call__(self, *args):
      self.calls += 1
      return super().__call__(*args)
  monkeypatch.setattr(compile_ahead, "CompiledAhead", Recorded)
  tiny_config.num_train_steps, tiny_config.validation_size = 20, 32
  with caplog.at_level(logging.INFO, logger="absl"):
    result = train.train_and_evaluate(tiny_config, str(tmp_path / "run"),
                                      compile_ahead=ahead)
  assert result["eval_accuracy"] > 0 and "val_accuracy" in result
  # The console's eval line shows the held-out split's numbers too, the ones to tune on.
  line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval  step 20/")]
  assert len(line) == 1 and line[0].endswith(
      f"| val loss {result['val_loss']:.4f} accuracy {100 * result['val_accuracy']:.2f}%"), line
  if not ahead:
    assert not made
    return
  assert len(made) == 2  # Test and validation.
  for program in made:
    assert program.calls >= 1 and program.ready  # Still ready: its arguments fit it.


def test_prediction_grid_shows_each_image_and_marks_mistakes_in_red():
  from fashion_jax.support import metric_writers
  shades = (40, 120, 200)
  images = np.stack([np.full((28, 28, 1), v, np.uint8) for v in shades])
  probabilities = np.eye(10)[[0, 1, 5]] * 0.8 + 0.02  # The third is a mistake.
  grid = metric_writers.prediction_grid(images, np.array([0, 1, 2]), probabilities,
                                        [f"class {i}" for i in range(10)])
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
  cells = np.split(grid, 3, axis=1)  # One row of three cells.
  for cell, shade, wrong in zip(cells, shades, (False, False, True)):
    # The image, 4x upscaled, in its own cell only.
    assert np.all(cell == shade, axis=2).sum() >= 112 * 112
    caption = cell[:cell.shape[0] - 112]
    red = (caption[..., 0] > 150) & (caption[..., 1] < 80) & (caption[..., 2] < 80)
    dark = caption.max(axis=2) < 100
    assert red.any() == wrong and (dark.any() or red.any())  # A caption, red where wrong.


def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
  """Stopping after 10 steps and re-running gives the same state as one 20-step run. The resume
  computes no initial state (it held one beside the restored state: 2x the memory at its peak)."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_config, straight)
  first = tiny_config.copy_and_resolve_references()
  first.num_train_steps = 10
  computed, real_create = [], steps.create_train_state

  def create_train_state(*args, abstract=False, **kwargs):
    computed.append(not abstract)
    return real_create(*args, **kwargs, **({"abstract": True} if abstract else {}))

  monkeypatch.setattr(steps, "create_train_state", create_train_state)
  train.train_and_evaluate(first, resumed)
  assert _lines(resumed)[-1]["step"] == 10 and computed.count(True) == 1
  computed.clear()
  train.train_and_evaluate(tiny_config, resumed)
  assert computed == [False]
  logged = [l["step"] for l in _lines(resumed) if "train_loss" in l]
  assert logged == [5, 10, 15, 20]  # Continued, not restarted.
  a, b = final_state(tiny_config, straight), final_state(tiny_config, resumed)
  assert int(a.step) == int(b.step) == 20
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
  evals = lambda w: [l["eval_accuracy"] for l in _lines(w) if "eval_loss" in l]
  assert evals(straight)[-1] == evals(resumed)[-1]


def test_finished_run_only_reevaluates(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config, workdir)
  mtime = os.path.getmtime(os.path.join(workdir, "checkpoints", "20"))
  again = train.train_and_evaluate(tiny_config, workdir)
  assert again["eval_accuracy"] == first["eval_accuracy"]
  assert os.path.getmtime(os.path.join(workdir, "checkpoints", "20")) == mtime
  lines = _lines(workdir)
  assert [l["step"] for l in lines if "train_loss" in l] == [5, 10, 15, 20]
  assert lines[-1]["step"] == 20 and "eval_accuracy" in lines[-1]


def test_a_shorter_config_than_the_run_says_so(tiny_config, tmp_path, caplog):
  """num_train_steps lowered below the latest checkpoint (a constant schedule allows a change):
  the re-run evaluated step 20 as "step 20/15", exit 0, without a word."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, workdir)
  tiny_config.num_train_steps = 15
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config, workdir)
  assert ("the latest checkpoint (step 20) is past the 15 steps this config asks for: evaluating "
          "it as it is; to train 15 steps, use a new --workdir") in caplog.text


def test_checkpoint_of_another_model_shape_is_refused(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  from fashion_jax.support import checkpointing
  real = checkpointing.describe_state
  def wider(name, state, fingerprint=None):
    description = real(name, state, fingerprint)
    description["param_shapes"]["['Dense_0']['kernel']"] = [1600, 256]
    return description
  monkeypatch.setattr(checkpointing, "describe_state", wider)
  with pytest.raises(UserError, match="parameter shapes that do not match.*Dense_0"):
    train.train_and_evaluate(tiny_config, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))  # Nothing deleted.


def test_checkpoint_of_another_model_name_is_refused(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  from fashion_jax.support import checkpointing
  real = checkpointing.describe_state
  monkeypatch.setattr(checkpointing, "describe_state",
                      lambda name, state, fp=None: {**real(name, state, fp), "model": "other"})
  with pytest.raises(UserError, match="is of model 'cnn' but the config asks for 'other'"):
    train.train_and_evaluate(tiny_config, workdir)


def test_invalid_config_values(tiny_config, tmp_path):
  tiny_config.learning_rate = -1.0
  tiny_config.parallelism = "magic"
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert "config.learning_rate=-1.0" in str(e.value) and "config.parallelism='magic'" in str(e.value)
  assert not os.path.exists(tmp_path / "run")  # Checked before anything is created.


@pytest.mark.parametrize("key, value, want", [
    ("seed", -1, "[0, 2**32)"),
    ("seed", 2**32, "[0, 2**32)"),  # Without x64 jax.random.key(2**32) is key(0).
    ("seed", 10**20, "[0, 2**32)"),
    ("learning_rate", float("inf"), "a positive finite number"),
    ("learning_rate", float("nan"), "a positive finite number"),
    ("weight_decay", float("inf"), "a finite number, zero or more"),
    ("weight_decay", -0.1, "a finite number, zero or more"),
    ("momentum", float("nan"), "in [0, 1)"),
    ("momentum", float("inf"), "in [0, 1)"),
    ("momentum", 1.0, "in [0, 1)"),
    ("momentum", -0.5, "in [0, 1)"),
    ("label_smoothing", float("inf"), "in [0, 1)"),
    ("ema_decay", float("nan"), "in [0, 1)"),
    ("random_erasing", float("nan"), "a probability in [0, 1]"),
    ("augment_translate", 10**11, "0 to 28 pixels"),  # An OverflowError in jax.random.randint.
    ("warmup_steps", -1, "zero or more steps"),
    ("tensorboard_samples", 4000, "0 (off) to 256 images"),  # A 263 MB grid at every eval.
])
def test_out_of_range_hyperparameters_are_refused(tiny_config, key, value, want):
  from fashion_jax import config_lib
  tiny_config[key] = value
  with pytest.raises(UserError) as e:
    config_lib.validate(tiny_config)
  assert str(e.value).startswith(f"config.{key}={value!r} is invalid: "), str(e.value)
  assert want in str(e.value) and ";" not in str(e.value), str(e.value)  # Only this key.


def test_edge_hyperparameters_are_accepted(tiny_config):
  from fashion_jax import config_lib
  for key, value in [("seed", 0), ("seed", 2**32 - 1), ("momentum", 0.0), ("momentum", 0.99),
                     ("weight_decay", 0.0), ("learning_rate", 1e-12), ("augment_translate", 28),
                     ("random_erasing", 1.0)]:
    tiny_config[key] = value
  config_lib.validate(tiny_config)


def test_config_mistakes_are_said_before_jax_starts(idx_dir, tmp_path):
  """A value out of range (or a workdir's scheme) was refused only after JAX's import (2-3 s);
  now before it, nothing created, each mistake named (a model's name too). `model_kwargs` builds the model: checked once
  JAX is there, as before."""
  for flag, imported, says in [
      ("--config.seed=-1", False, "config.seed=-1 is invalid"),
      ("--config.conv_impl=fast", False, "config.conv_impl='fast' is invalid: use one of auto"),
      ("--config.pool_impl=max", False, "config.pool_impl='max' is invalid: use one of auto"),
      ("--config.data_placement=gpu", False, "config.data_placement='gpu' is invalid"),
      ("--config.model=cnnn", False, "config.model='cnnn' is invalid: use one of cnn, cnn_bn"),
      # Both named in one line, as before (the model's name was checked after JAX).
      (("--config.seed=-1", "--config.model=cnnn"), False, "config.model='cnnn' is invalid: use "
       "one of cnn, cnn_bn, linear, resnet, wrn; config.seed=-1 is invalid"),
      ('--config.model_kwargs={"depht": 3}', True, "do not fit model 'cnn'"),
      # A workdir's form too (it was said after JAX's import); the last --workdir wins.
      ("--workdir=s3://bucket/run", False, "--workdir='s3://bucket/run': s3:// folders are not"),
      ("--workdir=", False, "--workdir is empty")]:
    proc, jax_imported = run_module_noting_jax(
        "fashion_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
        f"--config.idx_dir={idx_dir}", *((flag,) if isinstance(flag, str) else flag))
    assert proc.returncode == 2 and jax_imported == imported, (flag, proc.stderr[-2000:])
    assert says in proc.stderr and "Traceback" not in proc.stderr, (flag, proc.stderr[-2000:])
    assert not os.path.exists(tmp_path / "w"), flag


def test_the_configs_copies_of_the_codes_choices_match():
  """config_lib lists the choices of models.py, ops.py and loop.py (which import JAX) to check a
  config before JAX loads: a choice added there and not here would be refused."""
  from fashion_jax import config_lib
  from fashion_jax.kernels import ops
  from fashion_jax.model import models
  from fashion_jax.training import loop
  assert config_lib.MODELS == models.model_names()
  assert config_lib.CONV_IMPLS == ops.CONV_IMPLS and config_lib.POOL_IMPLS == ops.POOL_IMPLS
  assert config_lib.DATA_PLACEMENTS == loop.PLACEMENTS


def test_cli_errors_are_one_line_and_nonzero(idx_dir, tmp_path):
  common = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}"]
  cases = {
      "--config.modle=cnn": "unknown config key 'modle' (did you mean 'model'?); the keys are",
      "--config.batch_size=abc": "--config.batch_size=abc is invalid: config.batch_size takes a "
                                 "whole number",  # (Was absl's "invalid literal for int()".)
      "--config.num_epochs=0.5": "for part of an epoch, set --config.num_train_steps instead",
      "--config.learning_rate=x: y": "--config.learning_rate=x: y is invalid: "
                                     "config.learning_rate takes a number",
      "--config.eval_flip_tta=maybe": "config.eval_flip_tta takes true or false",
      "--config.idx_dir=/no/such/folder": "IDX folder '/no/such/folder' does not exist",
      # model_kwargs is set whole (a dict literal, parsed by ml_collections); the model checks
      # its keys. One key alone works only where the config file lists it.
      '--config.model_kwargs={"depht": 3}': "config.model_kwargs={'depht': 3} do not fit model 'cnn'",
      "--config.model_kwargs.depth=3": "config.model_kwargs has no key 'depth' in this config "
                                       "file; set the whole dict instead",
      "--config.batch_size=-32": "config.batch_size=-32 is invalid",
      # np.random.default_rng refused the first, jax.random.key overflowed on the second.
      "--config.seed=-1": "config.seed=-1 is invalid: a whole number in [0, 2**32)",
      "--config.seed=99999999999999999999": "config.seed=99999999999999999999 is invalid",
      # Passed validation, then "diverged" at step 1.
      "--config.learning_rate=inf": "config.learning_rate=inf is invalid: a positive finite",
      # NumPy could not shape it (a traceback after the data loaded).
      "--config.eval_batch_size=99999999999999999999": "at most 1,048,576",
  }
  for flag, message in cases.items():
    assert_one_line_error(run_module("fashion_jax.main", *common, flag), message)
  assert not os.path.exists(tmp_path / "w")  # The missing IDX folder's run left no empty workdir.
  workdir = f"--workdir={tmp_path / 'w2'}"
  (tmp_path / "alone").mkdir()  # A config that reads a sibling (default.py) copied without it.
  sibling_less = tmp_path / "alone" / "tiny.py"
  sibling_less.write_text("from fashion_jax import config_lib\n\n\ndef get_config():\n"
                          "  return config_lib.load_sibling(__file__, 'default')\n")
  not_configs = {"config.json": '{"batch_size": 8, "nested": true}\n',  # A run's record.
                 "syntax.py": "def get_config(:\n", "noget.py": "x = 1\n",
                 "dict.py": "def get_config():\n  return {'batch_size': 8}\n",
                 "raises.py": "def get_config():\n  raise RuntimeError('boom')\n",
                 "clash.py": "from fashion_jax import default_config\n\n\ndef get_config():\n"
                             "  c = default_config.get_config()\n  c.batch_size = 16.0\n  return c\n",
                 "partial.py": "import ml_collections\n\n\ndef get_config():\n"
                               "  c = ml_collections.ConfigDict()\n  c.batch_size = 8\n  return c\n",
                 "typo.py": "from fashion_jax import default_config\n\n\ndef get_config():\n"
                            "  c = default_config.get_config()\n  c.lerning_rate = 0.5\n  return c\n"}
  for name, text in not_configs.items():
    (tmp_path / name).write_text(text)
  for args, message in [
      # Not a config file: tracebacks (exit 1), or "unknown config key 'config_config'".
      ([f"--config={tmp_path / 'config.json'}"],
       "config.json did not load as a config (NameError: name 'true' is not defined); pass a "
       "Python file"),
      ([f"--config={tmp_path / 'syntax.py'}", "--config.batch_size=8"],
       "syntax.py did not load as a config (SyntaxError"),
      (["--config", str(tmp_path / "syntax.py")],  # Two words: the path named all the same.
       f"--config={tmp_path / 'syntax.py'} did not load as a config (SyntaxError"),
      ([f"--config={tmp_path / 'noget.py'}"],
       "noget.py did not load as a config (it defines no get_config())"),
      ([f"--config={tmp_path / 'noget.py'}", "--config.batch_size=8"], "(it defines no "
                                                                      "get_config())"),
      ([f"--config={tmp_path / 'dict.py'}"], "(TypeError: get_config() returned a dict, not an "
                                             "ml_collections.ConfigDict)"),
      # Its code failing: a traceback (exit 1), or one 1,000-character line holding one.
      ([f"--config={tmp_path / 'raises.py'}"], "raises.py did not load as a config (RuntimeError: "
                                               "boom); pass a Python file"),
      ([f"--config={tmp_path / 'clash.py'}"], "clash.py did not load as a config (TypeError: Could "
                                              "not override field 'batch_size'"),
      (["--config=configs/tiny.py:foo"], "(TypeError: get_config() takes 0 positional arguments"),
      # Keys: one lacking was an AttributeError traceback; a mistyped one trained at the default.
      ([f"--config={tmp_path / 'partial.py'}"], "the config lacks async_checkpointing, "),
      ([f"--config={tmp_path / 'typo.py'}"], "config.lerning_rate is no setting of fashion_jax "
                                             "(did you mean config.learning_rate?)"),
      (["--config=configs/nope.py"], "--config=configs/nope.py: cannot read the config file (No "
                                     "such file or directory; a relative path is read from "),
      # An override makes ml_collections read the file while parsing (a traceback before).
      (["--config=configs/nope.py", "--config.batch_size=8"], "cannot read the config file (No "
                                                              "such file or directory"),
      (["--config=configs"], "cannot read the config file (Is a directory"),
      ([f"--config={sibling_less}"], f"{sibling_less} builds on "
                                     f"{tmp_path / 'alone' / 'default.py'}, which cannot be read "
                                     "(No such file or directory); put default.py beside it"),
      ([f"--config.idx_dir={idx_dir}"], "--config is missing (needed by --config.idx_dir=...)"),
      # The models' settings' values, not only their names: a traceback after the data loaded,
      # and a run at chance level.
      (["--config=configs/tiny.py", "--config.model=wrn", '--config.model_kwargs={"depth": 15}'],
       "do not fit model 'wrn': depth=15: 6n+4"),
      (["--config=configs/tiny.py", "--config.model=cnn_bn",
        '--config.model_kwargs={"dropout_rate": 1.5}'], "dropout_rate=1.5: in [0, 0.5)"),
      # absl kept the last file silently, or with an override failed with its own words.
      (["--config=configs/tiny.py", "--config", "configs/default.py"],
       "--config is given 2 times (configs/tiny.py, configs/default.py); pass one config file"),
      (["--config=configs/tiny.py", "--config.batch_size=8", "--config=configs/tiny.py"],
       "--config is given 2 times")]:
    assert_one_line_error(run_module("fashion_jax.main", *args, workdir), message)
  assert not os.path.exists(tmp_path / "w2")  # Refused while parsing the flags.


def test_logged_images_per_second_have_no_outliers(tiny_config, tmp_path):
  """Each train line's images/s is an average since the last pause (compile, eval, checkpoint):
  timed per window, the two windows fetched together before an eval read as 2-30 million img/s
  on jax 0.7.2 (its CPU client returns a window's metrics only after the next one ran)."""
  tiny_config.num_train_steps, tiny_config.log_every_steps = 60, 5
  tiny_config.steps_per_dispatch = 5
  tiny_config.eval_every_steps = tiny_config.checkpoint_every_steps = 30
  # Not beside the evaluation's background compile, which slows these millisecond windows.
  train.train_and_evaluate(tiny_config, str(tmp_path / "run"), compile_ahead=False)
  rates = [l["train_images_per_sec"] for l in _lines(str(tmp_path / "run"))
           if "train_images_per_sec" in l]
  # The bug's outliers were 100-10,000x; a busy machine makes honest ones 2x apart.
  assert len(rates) >= 8 and max(rates) < 50 * float(np.median(rates)), rates


def test_cli_trains_and_resumes(idx_dir, tmp_path):
  workdir = str(tmp_path / "cli")
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", f"--config.idx_dir={idx_dir}"]
  proc = run_module("fashion_jax.main", *args, "--config.num_train_steps=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train step 5/10" in proc.stderr and "train:" not in proc.stderr  # Not a TTY: log lines.
  proc = run_module("fashion_jax.main", *args, "--config.progress_bar=on")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from checkpoint at step 10" in proc.stderr
  # The bar replaces the per-step log lines: resumed at 160 of 320 images, with a rate.
  assert "train step" not in proc.stderr
  assert "320/320" in proc.stderr and "img/s" in proc.stderr and "eval test" in proc.stderr
  assert [l["step"] for l in _lines(workdir) if "train_loss" in l] == [5, 10, 15, 20]


@pytest.mark.real_data
def test_real_fashion_mnist_learns(trained_real_workdir):
  """One epoch on the real data set (FASHION_JAX_IDX_DIR) gets well past chance."""
  lines = _lines(trained_real_workdir)
  evals = [l for l in lines if "eval_accuracy" in l]
  assert evals[-1]["step"] == 468 and evals[-1]["eval_accuracy"] > 0.85, evals
  losses = [l["train_loss"] for l in lines if "train_loss" in l]
  assert losses[-1] < losses[0] and losses[-1] < 0.5, losses  # Chance level is ln 10 = 2.3.


@pytest.mark.parametrize("damage", ["array data files cut to a third", "root file cut to 10 B",
                                    "a byte of the biggest data file flipped"])
def test_unreadable_latest_checkpoint_falls_back_and_is_kept(tiny_config, tmp_path, capfd,
                                                            monkeypatch, damage):
  """A truncated latest checkpoint: warning, resume from the previous one, nothing deleted; the
  reads Orbax abandons print nothing (they printed ~1,700 lines of tracebacks), and inference on
  it is a one-line error. With the OCDBT root file (state/d/) cut to 10 bytes the read fails
  already in the metadata's read (~300 lines of tracebacks: that read was not kept quiet). A
  flipped byte in the array data was restored as it was (Orbax checksums only its index): the
  run resumed from it, and retention then deleted the good checkpoint."""
  # As in a plain process (pytest's own hook turns unraisable exceptions into warnings).
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(checkpointing, "_stragglers_dropped", False)
  straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
  train.train_and_evaluate(tiny_config, straight)
  train.train_and_evaluate(tiny_config, damaged)
  data_files = []
  for root, _, files in os.walk(os.path.join(damaged, "checkpoints", "20", "state")):
    data_files += [os.path.join(root, f) for f in files if "/d/" in os.path.join(root, f)]
  if damage.startswith("a byte"):
    target = max(data_files, key=os.path.getsize)
    size = None
    with open(target, "r+b") as f:
      f.seek(os.path.getsize(target) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0xFF]))
  elif damage.startswith("array"):  # Every one: which file holds the weights (served) and which
    # the optimizer's state (not served) varies between runs; the biggest alone was at times the
    # optimizer's, served fine, and the check of serving below failed (CI).
    size = {f: os.path.getsize(f) // 3 for f in data_files if "/ocdbt.process_" in f}
    assert size, data_files
  else:
    size = {f: 10 for f in glob.glob(os.path.join(damaged, "checkpoints", "20", "state", "d", "*"))}
    assert len(size) == 1
  for target, cut in (size or {}).items():
    with open(target, "r+b") as f:
      f.truncate(cut)
  shutil.copytree(damaged, tmp_path / "copy")  # Still damaged, for inference below.
  if size is None:  # The flipped byte may be the optimizer's (not served): a weight's digest.
    meta = tmp_path / "copy" / "checkpoints" / "20" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["digest"]["params/Dense_0/kernel"] = "0" * 16
    meta.write_text(json.dumps(saved))
  capfd.readouterr()
  result = train.train_and_evaluate(tiny_config, damaged)  # Resumes from 10, retrains 10 steps.
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
  from fashion_jax.serving import inference  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match=r"checkpoints/20 is unreadable .*pass --step with another "
                     r"checkpoint \(10\), or re-train") as e:
    inference.load(str(tmp_path / "copy"), step=20)
  assert "bound method" not in str(e.value) and "TensorStore details" not in str(e.value)
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
  moved = os.listdir(os.path.join(damaged, "checkpoints_unreadable"))
  assert len(moved) == 1 and moved[0].startswith("20.")
  assert sorted(os.listdir(os.path.join(damaged, "checkpoints"))) == ["10", "20"]
  a, b = final_state(tiny_config, straight), final_state(tiny_config, damaged)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert result["eval_accuracy"] == _lines(straight)[-1]["eval_accuracy"]


def _without_root_powers() -> list[str]:
  """A command prefix under which file permissions apply, also to root (CI runs as root)."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("running as root without setpriv: permissions cannot be made to apply")
  return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _sizes(workdir) -> dict:
  return {os.path.relpath(os.path.join(root, name), workdir): os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(workdir) for name in names if name != ".fashion_jax.lock"}


def _rerun_tiny(prefix, workdir, trained_tiny_workdir) -> subprocess.CompletedProcess:
  """The command that trained `trained_tiny_workdir`, run again on the copy `workdir`."""
  return subprocess.run(
      [*prefix, sys.executable, "-m", "fashion_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.idx_dir={os.path.dirname(trained_tiny_workdir)}/idx",
       "--config.validation_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("blocked", ["state", "state/d"])
def test_a_checkpoint_it_may_not_read_is_an_error_that_moves_nothing(trained_tiny_workdir,
                                                                     tmp_path, blocked):
  """A `state` folder it may not read: Orbax reports it as a pytree structure error, taken for
  damage; every checkpoint was moved aside and the run started over at step 0, exit 0."""
  prefix = _without_root_powers()
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  before = _sizes(workdir)
  folder = workdir / "checkpoints" / "20" / blocked
  os.chmod(folder, 0)
  try:
    proc = _rerun_tiny(prefix, workdir, trained_tiny_workdir)
  finally:
    os.chmod(folder, 0o755)
  assert_one_line_error(proc, f"checkpoint {workdir}/checkpoints/20 could not be read on process 0 "
                        "(", "check the storage")
  assert "permission" in proc.stderr.lower()
  assert _sizes(workdir) == before and not (workdir / "checkpoints_unreadable").exists()


def test_a_damaged_checkpoint_that_cannot_be_moved_aside_is_one_line(trained_tiny_workdir,
                                                                      tmp_path):
  """Its folder read-only: shutil.move copied it, failed to delete it (two copies), traceback."""
  prefix = _without_root_powers()
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  (workdir / "checkpoints" / "20" / "meta" / "metadata").write_bytes(b"{")
  os.chmod(workdir / "checkpoints" / "20", 0o555)
  try:
    proc = _rerun_tiny(prefix, workdir, trained_tiny_workdir)
  finally:
    os.chmod(workdir / "checkpoints" / "20", 0o755)
  assert_one_line_error(proc, f"checkpoint {workdir}/checkpoints/20 is damaged, but it could not be "
                        "moved aside", "(Permission denied); move or delete it")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
  assert not os.listdir(workdir / "checkpoints_unreadable")  # Its parent: made, left empty.


def test_a_save_cut_short_leaves_no_temporary_folder_behind(trained_tiny_workdir, tmp_path):
  """A kill mid-save leaves `<step>.orbax-checkpoint-tmp...`: a save of that step replaced it, but
  one at another step (checkpoint_every changed, a shorter run) stayed forever. Training removes
  it; serving, which may read while a run saves, does not."""
  from fashion_jax.serving import inference  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  cut_short = workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints" / "20", cut_short)
  inference.load(str(workdir))
  assert cut_short.exists()
  assert _rerun_tiny([], workdir, trained_tiny_workdir).returncode == 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]


def test_no_readable_checkpoint_left_is_refused_not_a_fresh_start(trained_tiny_workdir, tmp_path):
  """Every checkpoint damaged (an Orbax that no longer reads its old files, a copy that lost a
  file of each): all were moved aside and the run started over at step 0, emptying its
  metrics, exit 0 -- and so again on every re-run."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  for step in ("10", "20"):
    os.remove(workdir / "checkpoints" / step / "meta" / "metadata")
  metrics = (workdir / "metrics.jsonl").read_bytes()
  for _ in range(2):  # The second run finds only the moved ones.
    proc = _rerun_tiny([], workdir, trained_tiny_workdir)
    assert_one_line_error(proc, f"no readable checkpoint in {workdir}/checkpoints; the unreadable "
                          f"ones are in {workdir}/checkpoints_unreadable: delete that folder")
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
  assert len(os.listdir(workdir / "checkpoints_unreadable")) == 2
  shutil.rmtree(workdir / "checkpoints_unreadable")  # As the message says: starts over.
  assert _rerun_tiny([], workdir, trained_tiny_workdir).returncode == 0


@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_a_checkpoints_unreadable_saved_metrics_are_one_line(trained_tiny_workdir, tmp_path, damage):
  """Orbax reads each step's metrics as it opens the folder: one damaged file was a traceback in
  training and in predict, evaluate and export."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  metrics = workdir / "checkpoints" / "20" / "metrics" / "metrics"
  assert metrics.is_file()  # Saved: the tiny run has a validation split.
  prefix = []
  if damage == "truncated":
    metrics.write_text(metrics.read_text()[:5])
  else:
    prefix = _without_root_powers()
    metrics.chmod(0)
  for command in (["fashion_jax.main", "--config=configs/tiny.py", "--config.validation_size=32",
                   f"--config.idx_dir={os.path.dirname(trained_tiny_workdir)}/idx"],
                  ["fashion_jax.evaluate"]):
    proc = subprocess.run([*prefix, sys.executable, "-m", *command, f"--workdir={workdir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert_one_line_error(proc, f"{metrics}, the saved evaluation of checkpoint 20, cannot be read "
                          "(", "restore the file, or delete its metrics folder")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]


def test_a_working_restore_keeps_what_libraries_print(monkeypatch, capsys):
  """Only a failed restore's output is dropped (its abandoned reads' tracebacks); a working one's
  (a library's warning) is written out after it."""
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(checkpointing, "ABANDONED_READS_SETTLE_S", 0.0)
  hook = sys.excepthook
  with checkpointing._quiet_abandoned_reads():  # pylint: disable=protected-access
    print("a library's warning", file=sys.stderr)
  assert "a library's warning" in capsys.readouterr().err
  with pytest.raises(ValueError, match="unreadable"):
    with checkpointing._quiet_abandoned_reads():  # pylint: disable=protected-access
      print("Exception ignored in: <coroutine>", file=sys.stderr)
      raise ValueError("unreadable")
  assert "Exception ignored" not in capsys.readouterr().err
  assert sys.excepthook is hook
  monkeypatch.setattr(checkpointing, "ABANDONED_READS_SETTLE_S", 5.0)
  with pytest.raises(UserError, match="another model"):  # Refused before reading: no wait.
    with checkpointing._quiet_abandoned_reads():  # pylint: disable=protected-access
      print("said before refusing", file=sys.stderr)
      raise UserError("checkpoint of another model")
  assert "said before refusing" in capsys.readouterr().err


def test_a_stop_said_during_a_restore_is_seen_at_once(monkeypatch, capsys):
  """The signal handler's line went into the restore's capture of stderr: seen only after the
  restore (minutes from a bucket), or never where it failed (and a second signal's exit line)."""
  from fashion_jax.support import checkpointing, runtime  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(checkpointing, "ABANDONED_READS_SETTLE_S", 0.0)
  with pytest.raises(ValueError, match="unreadable"):
    with checkpointing._quiet_abandoned_reads():  # pylint: disable=protected-access
      runtime.say_at_once("fashion_jax: SIGTERM: stopping at the next window boundary")
      assert "SIGTERM: stopping" in capsys.readouterr().err  # Now, not after the restore.
      raise ValueError("unreadable")


def test_abandoned_reads_reporting_after_the_settle_are_dropped(monkeypatch, capsys):
  """An abandoned read that reports after the settle (seen on a slow machine: a traceback in the
  middle of the training log) is dropped; every other unraisable exception still shows."""
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(checkpointing, "_stragglers_dropped", False)
  monkeypatch.setattr(checkpointing, "ABANDONED_READS_SETTLE_S", 0.0)

  class Unraisable:  # Makes a real UnraisableHookArgs, the type the hook is called with.
    def __del__(self):
      raise ValueError("a template")

  Unraisable()
  gc.collect()
  template = type(seen.pop())

  def report(exc, obj=None):
    sys.unraisablehook(template((type(exc), exc, None, None, obj)))

  report(RuntimeError("Event loop is closed"))  # Before any failed restore: shown.
  with pytest.raises(ValueError):
    with checkpointing._quiet_abandoned_reads():  # pylint: disable=protected-access
      raise ValueError("unreadable")
  report(RuntimeError("Event loop is closed"))  # After it: an abandoned read's, dropped.
  report(Exception("Encountered error while reading array index: ()"))
  report(RuntimeError("Event loop is closed"), obj=report)  # Raised in other code: shown.
  report(KeyError("something else"))
  assert [str(u.exc_value) for u in seen] == [
      "Event loop is closed", "Event loop is closed", "'something else'"], seen
  assert "Event loop" not in capsys.readouterr().err


def test_checkpoint_with_another_optimizer_state_is_refused(tiny_config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  import optax
  monkeypatch.setattr(steps, "create_optimizer",
                      lambda config, total_steps=1: optax.sgd(0.1, momentum=0.9))
  with pytest.raises(UserError, match="does not fit the configured train state.*optimizer"):
    train.train_and_evaluate(tiny_config, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))


def test_nonfinite_loss_stops_with_the_step_named(tiny_config, tmp_path):
  tiny_config.learning_rate = 1e30  # Overflows within a few steps.
  with pytest.raises(UserError, match=r"non-finite loss or gradients at step \d+ .*last good "
                                      r"checkpoint.*on_nonfinite=skip") as e:
    train.train_and_evaluate(tiny_config, str(tmp_path / "stop"))
  # Before the first checkpoint (step 10) there is none to name: not "at step None".
  assert "no last good checkpoint yet" in str(e.value) and "None" not in str(e.value)
  # A lower rate in this workdir is refused (its checkpoints are of this rate): not advised.
  assert "lower --config.learning_rate in a new --workdir" in str(e.value)


def test_nonfinite_loss_stops_before_the_next_checkpoint_whatever_the_log_interval(tiny_config,
                                                                                 tmp_path):
  """on_nonfinite=stop looked at the steps only at each log line: with a long log interval
  (here: never) the run trained on to its end, checkpointing steps 10 and 15 after the diverged
  one and calling them good. It stops at the window that diverged, before any later checkpoint."""
  tiny_config.update(learning_rate=1e30, log_every_steps=10**6, checkpoint_every_steps=5,
                     eval_every_steps=5, steps_per_dispatch=5)
  workdir = tmp_path / "stop"
  with pytest.raises(UserError, match=r"non-finite loss or gradients at step (\d+) ") as e:
    train.train_and_evaluate(tiny_config, str(workdir))
  bad = int(re.search(r"at step (\d+) ", str(e.value)).group(1))
  folder = workdir / "checkpoints"
  saved = [int(name) for name in os.listdir(folder)] if folder.exists() else []
  assert bad <= 5 and all(step < bad for step in saved), (bad, saved, str(e.value))


def test_a_run_ending_before_its_first_evaluation_leaves_no_compile_running(tiny_config, tmp_path,
                                                                            monkeypatch):
  """The evaluation compiles ahead in a thread; a run that raised before its first evaluation
  (here: diverged) returned with that compile still running (in a notebook, beside the next
  cell). Slowed so that it still runs when the run ends."""
  import threading
  real_compile = compile_ahead.CompiledAhead._compile

  def slow_compile(self, *abstract):
    time.sleep(1.0)
    real_compile(self, *abstract)

  monkeypatch.setattr(compile_ahead.CompiledAhead, "_compile", slow_compile)
  tiny_config.update(learning_rate=1e30, eval_every_steps=10, steps_per_dispatch=5)
  with pytest.raises(UserError, match="non-finite loss or gradients"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not [t for t in threading.enumerate() if t.name == "fashion_jax-compile-ahead"]


def test_nonfinite_steps_can_be_skipped(tiny_config, tmp_path):
  tiny_config.learning_rate = 1e30
  tiny_config.on_nonfinite = "skip"
  workdir = str(tmp_path / "skip")
  train.train_and_evaluate(tiny_config, workdir)
  assert sum(l.get("train_skipped_steps", 0) for l in _lines(workdir)) > 0
  # An interval with every step skipped trained nothing: it read loss 0.0 and accuracy 0 %.
  whole = [l for l in _lines(workdir) if l.get("train_skipped_steps") == tiny_config.log_every_steps]
  assert whole and all(l["train_loss"] is None and l["train_accuracy"] is None for l in whole)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # Strict JSON: no NaN (jq, JSON.parse).
    assert "NaN" not in f.read()
  state = final_state(tiny_config, workdir)
  assert int(state.step) == 20  # Skipped steps still count: the data order is unchanged.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("placement, steps_per_dispatch", [
    ("host", 1),  # The classic loop: one host batch per dispatch.
    ("host", -1),  # Host batches, stacked per window.
    pytest.param("device", 1, marks=pytest.mark.slow),  # Device data, one step per window.
])
def test_placements_and_windows_compute_the_same(tiny_config, tmp_path, placement,
                                                 steps_per_dispatch):
  """Same examples at every step and the same math, whatever the placement and window length:
  bitwise on CPU (one compiled step body; the gather yields the very batch the host sends)."""
  reference, other = str(tmp_path / "device_auto"), str(tmp_path / "other")
  tiny_config.data_placement, tiny_config.steps_per_dispatch = "device", -1
  train.train_and_evaluate(tiny_config, reference)
  tiny_config.data_placement, tiny_config.steps_per_dispatch = placement, steps_per_dispatch
  train.train_and_evaluate(tiny_config, other)
  a, b = final_state(tiny_config, reference), final_state(tiny_config, other)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a.params,
               b.params)
  strip = lambda w: [{k: v for k, v in l.items() if "time" not in k and "per_sec" not in k}
                     for l in _lines(w)]
  assert strip(reference) == strip(other)


def _compiled_windows(config, workdir) -> list[str]:
  """Trains `config` into `workdir`; the train windows JAX compiled meanwhile (its log)."""
  messages = []

  class Collect(logging.Handler):
    def emit(self, record):
      messages.append(record.getMessage())

  handler = Collect()
  logging.getLogger("jax").addHandler(handler)
  jax.config.update("jax_log_compiles", True)
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jax").removeHandler(handler)
  return [m[:60] for m in messages if re.match(r"Compiling (jit\()?_device_window\b", m)]


def test_one_compiled_window_length_plus_the_remainder(tiny_config, tmp_path):
  """45 steps in windows of 10 (checkpoints and evals every 20): four windows of 10 and one of 5,
  two compilations in all, none per window (a table upload or a Python value in the step that
  changed the traced signature would compile again)."""
  tiny_config.update(num_train_steps=45, checkpoint_every_steps=20, eval_every_steps=20)
  compiled = _compiled_windows(tiny_config, str(tmp_path / "run"))
  assert len(compiled) == 2, compiled
  assert [l["step"] for l in _lines(str(tmp_path / "run")) if "train_loss" in l][-1] == 45


def test_the_shorter_windows_compile_in_the_background_and_compute_the_same(tiny_config,
                                                                           tmp_path, monkeypatch):
  """45 steps in windows of 10: the 5-step window at the end had compiled when it came, the loop
  stopped meanwhile. Now it compiles once, in the background from the first window's dispatch
  on; it runs that program, and the run is bitwise the run that compiles it on use."""
  assert loop.lengths_ahead(0, 10, 45, 20, 20) == [5] and loop.lengths_ahead(40, 10, 45, 20) == []
  assert loop.lengths_ahead(30, 10, 74, 37, 30) == [2, 1, 10]  # Resumed: first a short one (4).
  assert loop.lengths_ahead(0, 10, 95, 37, 20) == [4, 2, 1, 5]  # In the order first needed.
  assert loop.lengths_ahead(0, 10, 100, 20, 20) == []  # One length: nothing more to compile.
  assert loop.lengths_ahead(0, 1, 2**31 - 1, 7, 1875) == []  # Scans a bounded number of windows.
  tiny_config.update(num_train_steps=45, checkpoint_every_steps=20, eval_every_steps=20)
  events, windows_ahead = [], []

  class Recorded(compile_ahead.CompiledAhead):
    def __init__(self, fn, *args, **kwargs):
      super().__init__(fn, *args, **kwargs)
      if isinstance(fn.__wrapped__, functools.partial) and "length" in fn.__wrapped__.keywords:
        windows_ahead.append(self)
        events.append(("ahead", fn.__wrapped__.keywords["length"]))

  real_call = loop.Windows.__call__
  monkeypatch.setattr(compile_ahead, "CompiledAhead", Recorded)
  monkeypatch.setattr(loop.Windows, "__call__",
                      lambda self, state, step, n: events.append(("window", n)) or
                      real_call(self, state, step, n))
  compiled = _compiled_windows(tiny_config, str(tmp_path / "ahead"))
  assert events == [("window", 10), ("ahead", 5), *[("window", 10)] * 3, ("window", 5)], events
  assert len(compiled) == 2, compiled  # The 10-step window and the 5-step one, each once.
  assert len(windows_ahead) == 1 and windows_ahead[0].ready  # Its program is the one that ran.
  train.train_and_evaluate(tiny_config, str(tmp_path / "on_use"), compile_ahead=False)
  a, b = (final_state(tiny_config, str(tmp_path / w)) for w in ("ahead", "on_use"))
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  strip = lambda w: [{k: v for k, v in l.items() if "time" not in k and "per_sec" not in k}
                     for l in _lines(str(tmp_path / w))]
  assert strip("ahead") == strip("on_use")


def test_a_prime_interval_runs_full_windows_and_a_shorter_one_to_each_boundary(tiny_config,
                                                                               tmp_path):
  """Checkpoints and evals every 37 steps (prime, as 937 steps an epoch at batch 64): the
  windows had been the largest divisor of 37 up to the cap, 1 step, 15 % slower on this CPU.
  Now 10, 10, 10, 7 up to each boundary: two compiled lengths, the boundaries kept."""
  tiny_config.update(num_train_steps=74, checkpoint_every_steps=37, eval_every_steps=37,
                     steps_per_dispatch=10, log_every_steps=37)
  assert loop.window_length(tiny_config, 100, 37, 37, "cpu") == 10
  assert loop.window_length(tiny_config, 100, 40, 20, "cpu") == 10  # Divides: as before.
  assert loop.window_length(tiny_config, 100, 36, 36, "cpu") == 9  # Over half the cap: kept.
  assert loop.window_length(tiny_config, 100, 7, 7, "cpu") == 7  # A short interval: itself.
  assert loop.window_length(tiny_config, 100, 37, 20, "cpu") == 10  # No common factor (was 1).
  assert [loop.next_window(s, 10, 74, 37, 37) for s in (0, 30, 37, 67, 70)] == [10, 7, 10, 7, 4]
  # Intervals that are not multiples of one another: the stretches between boundaries differ,
  # so the shorter windows are powers of two (few lengths), the end exact.
  assert [loop.next_window(s, 10, 95, 37, 20) for s in (30, 34, 36, 37, 90)] == [4, 2, 1, 2, 5]
  compiled = _compiled_windows(tiny_config, str(tmp_path / "run"))
  assert len(compiled) == 2, compiled
  lines = _lines(str(tmp_path / "run"))
  assert [l["step"] for l in lines if "eval_accuracy" in l] == [37, 74]
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["37", "74"]


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tiny_config, tmp_path,
                                                                   monkeypatch):
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  from fashion_jax.support import checkpointing
  import collections
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
  tiny_config.num_train_steps = 20
  with pytest.raises(UserError, match=r"not enough free disk.*last checkpoint \(step 10\)"):
    train.train_and_evaluate(tiny_config, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))
  with pytest.raises(UserError, match=r"not enough free disk.*re-run \(no checkpoint saved "
                     r"yet\)$"):  # Not "the last checkpoint (step None), which is intact".
    train.train_and_evaluate(tiny_config, str(tmp_path / "new"))


@pytest.fixture
def small_disk(tmp_path):
  """A 12 MB tmpfs (as root; the test skips, saying why, where mounting is not allowed)."""
  folder = tmp_path / "small"
  folder.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(folder)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()[:100]}): a full disk "
                "during an asynchronous save is tested where one can be mounted (CI runs as root)")
  try:
    yield folder
  finally:
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_disk_that_fills_during_an_asynchronous_save_is_one_line(tiny_config, small_disk,
                                                                    monkeypatch, capfd, caplog):
  """The free-space check before a save cannot see a quota or another process filling the disk
  meanwhile: the write failed in Orbax's thread, ~470 lines of its tracebacks and exit 1 (and,
  in about half the runs, ~20 "Event loop is closed" tracebacks of the abandoned writes and
  asyncio's "exception was never retrieved" records)."""
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  # As in a plain process (pytest's own hook turns unraisable exceptions into warnings).
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  monkeypatch.setattr(checkpointing, "_stragglers_dropped", False)
  import collections  # pylint: disable=import-outside-toplevel
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
  workdir = str(small_disk / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)  # One checkpoint: how much room it takes.
  size = sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(os.path.join(workdir, "checkpoints")) for f in files)
  with open(small_disk / "filler", "wb") as f:  # Room for about half a checkpoint more.
    free = os.statvfs(small_disk)  # (shutil.disk_usage is the stand-in above.)
    f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - size // 2))
  tiny_config.num_train_steps = 30
  capfd.readouterr()
  with pytest.raises(UserError, match=r"no space left to save a checkpoint in .*/run/checkpoints; "
                     r"free some space .* last complete checkpoint \(step 10\), which is intact"):
    train.train_and_evaluate(tiny_config, workdir)
  time.sleep(1)  # Stragglers of the abandoned writes.
  gc.collect()
  err = capfd.readouterr().err
  assert "Traceback" not in err and "No space left" not in err, err[-3000:]
  assert "No space left" not in caplog.text and "never retrieved" not in caplog.text
  os.remove(small_disk / "filler")  # Room again: the re-run resumes and finishes.
  train.train_and_evaluate(tiny_config, workdir)
  assert "30" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_out_of_space_is_told_apart_from_other_save_errors():
  """Cloud quotas and rate limits say RESOURCE_EXHAUSTED too: those stay what they are."""
  from fashion_jax.support import checkpoint_checks  # pylint: disable=import-outside-toplevel
  full = ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write 793667 bytes to file 8: '
                    "No space left on device [os_error_code='28']")
  assert checkpoint_checks.out_of_space(full)
  assert not checkpoint_checks.out_of_space(RuntimeError("save failed"))
  try:
    raise RuntimeError("save failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
  except RuntimeError as e:
    assert checkpoint_checks.out_of_space(e)
  assert not checkpoint_checks.out_of_space(ValueError("RESOURCE_EXHAUSTED: 429 rate limit"))


def test_a_refused_resume_leaves_the_run_intact(tiny_config, tmp_path):
  """Issue 15's reproduction: re-running with another model is refused, and config.json still
  describes the checkpoints (evaluate/predict keep working on the run)."""
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    before = f.read()
  files = _files(workdir)
  tiny_config.model = "cnn_bn"
  with pytest.raises(UserError, match="use a new --workdir"):
    train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == before
  assert _files(workdir) == files  # Nothing written: no TensorBoard event file either.


def _files(workdir: str) -> dict[str, bytes]:
  """Every file under workdir (path relative to it) and its contents."""
  found = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, workdir)] = f.read()
  return found


def test_rerunning_a_finished_run_evaluates_and_writes_nothing(tiny_config, tmp_path):
  """The final checkpoint is evaluated again, but metrics.jsonl and TensorBoard keep one point
  a step (the re-run's line had a wall time running backwards)."""
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  first = train.train_and_evaluate(tiny_config, workdir)
  files = _files(workdir)
  tiny_config.eval_batch_size //= 2  # Not what it trained with: config.json keeps the record.
  again = train.train_and_evaluate(tiny_config, workdir)
  assert again["eval_accuracy"] == pytest.approx(first["eval_accuracy"])
  assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5)
  assert _files(workdir) == files


@pytest.mark.parametrize("module, args", [
    ("fashion_jax.main", ["--config=configs/tiny.py"]),
    ("fashion_jax.predict", ["PHOTO"]),
])
def test_unsupported_cloud_workdirs_are_refused_before_anything_runs(tmp_path, module, args):
  """s3:// and other schemes (gs:// works: tests/test_cloud.py)."""
  (tmp_path / "photo.png").write_bytes(b"not read: the workdir is refused first")
  args = [str(tmp_path / "photo.png") if a == "PHOTO" else a for a in args]
  proc = run_module(module, "--workdir=s3://bucket/run", *args)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("fashion_jax: error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert "s3:// folders are not supported (gs://bucket/path is)" in errors[0]
  from tests.conftest import ROOT  # pylint: disable=g-import-not-at-top
  assert not os.path.exists(os.path.join(ROOT, "s3:"))  # Never a local folder named "s3:".


def test_resume_that_changes_data_order_schedule_or_model_is_refused(tiny_config, tmp_path):
  """batch_size, seed, validation_size, and (for a schedule that depends on it) the run length
  are in the checkpoint's fingerprint; keys that change nothing may change."""
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  saved_config = open(os.path.join(workdir, "config.json")).read()
  for key, value in (("batch_size", 32), ("seed", 1), ("validation_size", 16),
                     ("learning_rate", 0.01)):
    changed = tiny_config.copy_and_resolve_references()
    changed[key] = value
    changed.num_train_steps = 20
    with pytest.raises(UserError, match=rf"was trained with {key}=.*but the config gives "
                       rf"{key}=.*use a new --workdir, or pass --config\.{key}="):
      train.train_and_evaluate(changed, workdir)
    assert open(os.path.join(workdir, "config.json")).read() == saved_config  # Untouched.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]
  # A longer run with a constant schedule, other intervals and formulations: resumes.
  changed = tiny_config.copy_and_resolve_references()
  changed.num_train_steps, changed.log_every_steps, changed.conv_impl = 20, 2, "xla"
  train.train_and_evaluate(changed, workdir)
  assert json.load(open(os.path.join(workdir, "config.json")))["num_train_steps"] == 20


def test_resume_from_another_order_of_the_same_examples_is_refused(tiny_config, tmp_path):
  """tensorflow-datasets orders Fashion-MNIST unlike the IDX files: a run started from one and
  resumed from the other (offline, or on Colab's TPU runtime) resumed silently, with another
  data order and a validation set that had been trained on."""
  from fashion_jax.data import idx  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps, tiny_config.validation_size = 10, 16
  train.train_and_evaluate(tiny_config, workdir)
  folder = tiny_config.idx_dir
  images, labels = idx.load_split(folder, "train")
  order = np.random.default_rng(1).permutation(len(labels))  # Same examples, same counts.
  idx.write_idx(os.path.join(folder, idx.FILES["train"][0] + ".gz"), images[order, ..., 0])
  idx.write_idx(os.path.join(folder, idx.FILES["train"][1] + ".gz"), labels[order])
  tiny_config.num_train_steps = 20
  with pytest.raises(UserError, match=r"was trained with train_data=\"[0-9a-f]{16}\", but the "
                     r"config gives train_data=\"[0-9a-f]{16}\" \(train_data: a digest of the "
                     r"train split in its order.*use a new --workdir \(or the data and length"):
    train.train_and_evaluate(tiny_config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]


def test_a_checkpoint_from_before_the_data_digest_resumes():
  from fashion_jax.support import checkpoint_checks  # pylint: disable=import-outside-toplevel
  old = {"seed": 0, "train_examples": 256}
  checkpoint_checks.check_fingerprint("10", old, {**old, "train_data": "0123456789abcdef"})
  with pytest.raises(UserError, match="train_data"):
    checkpoint_checks.check_fingerprint("10", {**old, "train_data": "0" * 16},
                                     {**old, "train_data": "0123456789abcdef"})


def test_longer_run_with_a_cosine_schedule_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps, tiny_config.lr_schedule = 10, "cosine"
  train.train_and_evaluate(tiny_config, workdir)
  tiny_config.num_train_steps = 20
  with pytest.raises(UserError, match=r"trained with total_steps=10, but the config gives "
                     r"total_steps=20.*new --workdir"):
    train.train_and_evaluate(tiny_config, workdir)


def test_damage_is_told_from_passing_io_errors():
  from fashion_jax.support import checkpointing
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Error reading "params.x/0" in OCDBT database')
  assert checkpointing.is_damage(wrapped)
  assert checkpointing.is_damage(json.JSONDecodeError("Unterminated string", "{", 1))
  assert checkpointing.is_damage(FileNotFoundError("gone"))
  assert not checkpointing.is_damage(OSError(5, "Input/output error"))
  assert not checkpointing.is_damage(PermissionError(13, "Permission denied"))
  assert not checkpointing.is_damage(ValueError("UNAVAILABLE: Error reading: connection reset"))
  assert not checkpointing.is_damage(RuntimeError("something else"))


def test_passing_read_error_moves_nothing_and_a_retry_that_works_resumes(tiny_config, tmp_path,
                                                                         monkeypatch):
  from fashion_jax.support import checkpointing
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  tiny_config.num_train_steps = 20
  real = checkpointing.Checkpointer.restore
  calls = []

  def flaky(self, step, abstract, description):
    calls.append(step)
    if failures:
      raise failures.pop(0)
    return real(self, step, abstract, description)

  monkeypatch.setattr(checkpointing.Checkpointer, "restore", flaky)
  failures = [OSError(5, "Input/output error")]
  with pytest.raises(UserError, match=r"could not be read on process 0 \(OSError.*not recognised "
                     "damage, so it is left as it is"):
    train.train_and_evaluate(tiny_config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))
  # Damage that is gone on the second read (a slow file system): resumes, nothing moved.
  failures, calls[:] = [ValueError("DATA_LOSS: Error reading x")], []
  train.train_and_evaluate(tiny_config, workdir)
  assert calls == [10, 10]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_best_validation_checkpoint_is_kept_beyond_the_newest(tmp_path):
  """keep=1: the newest checkpoint, plus the one with the best validation accuracy."""
  from fashion_jax.support import checkpointing
  state = {"w": np.zeros(3, np.float32)}
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
  for step, accuracy in ((1, 0.5), (2, 0.9), (3, 0.6), (4, None), (5, 0.7)):
    metrics = None if accuracy is None else {"val_accuracy": accuracy, "eval_accuracy": 0.1}
    checkpointer.save(step, state, {"model": "m", "param_shapes": {}}, metrics)
  assert checkpointer.all_steps() == [2, 5]
  checkpointer.close()
  # A resumed run reopens the folder: the metrics come back from disk, so 2 stays the best (it
  # had been deleted at the first save after a restart, as a checkpoint without metrics).
  reopened = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=1, async_save=False)
  reopened.save(6, state, {"model": "m", "param_shapes": {}}, {"val_accuracy": 0.3})
  assert reopened.all_steps() == [2, 6]
  reopened.save(7, state, {"model": "m", "param_shapes": {}}, {"val_accuracy": 0.95})
  assert reopened.all_steps() == [7]  # Newest and best.
  reopened.close()


def test_writer_and_checkpointer_are_closed_when_the_loop_raises(tiny_config, tmp_path,
                                                                 monkeypatch):
  from fashion_jax.support import checkpointing, metric_writers
  closed = []
  for cls in (checkpointing.Checkpointer, metric_writers.MetricWriter):
    real_close = cls.close
    monkeypatch.setattr(cls, "close", lambda self, real_close=real_close, name=cls.__name__: (
        closed.append(name), real_close(self))[1])
  def broken(*args, **kwargs):
    raise RuntimeError("evaluation broke")
  monkeypatch.setattr(train, "_summarize", broken)
  with pytest.raises(RuntimeError, match="evaluation broke"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert sorted(closed) == ["Checkpointer", "MetricWriter"]


def test_training_without_pillow_skips_the_sample_grid(tiny_config, tmp_path, monkeypatch,
                                                       caplog):
  """The trainer needs no serving extra: without Pillow the TensorBoard sample grid is skipped
  with a log line (information, not a warning: the base install has no Pillow), and everything
  else is written."""
  monkeypatch.setitem(sys.modules, "PIL", None)
  tiny_config.num_train_steps, tiny_config.tensorboard_samples = 10, 4
  # absl's own logger, not only the root: another test in the same process may have left absl's
  # logger at WARNING (TensorFlow's SavedModel writer did, before export kept the levels).
  with caplog.at_level(logging.INFO, logger="absl"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert any("no TensorBoard sample predictions: they need Pillow" in r.getMessage()
             for r in caplog.records)
  assert "eval/sample_predictions" not in _tensorboard_values(str(tmp_path / "run"))
  assert [l["step"] for l in _lines(str(tmp_path / "run")) if "eval_loss" in l] == [10]


def test_a_workdir_with_files_fashion_jax_did_not_write_is_refused(tiny_config, tmp_path):
  """A folder holding someone's config.json or metrics.jsonl is refused before anything is
  written: training there had replaced the one and emptied the other without a word."""
  for name, text, says in (
      ("config.json", '{"my": "precious"}\n', "holds a config.json that fashion_jax did not"),
      ("metrics.jsonl", '{"mine": 1}\n{"step": 3}\n', "holds a metrics.jsonl with lines")):
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / name).write_text(text)
    with pytest.raises(UserError, match=says):
      train.train_and_evaluate(tiny_config, str(workdir))
    assert sorted(os.listdir(workdir)) == [name] and (workdir / name).read_text() == text
  # A run's own workdir, its last metrics line cut short by a kill, resumes.
  workdir = str(tmp_path / "run")
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 11, "train_lo')
  tiny_config.num_train_steps = 20
  train.train_and_evaluate(tiny_config, workdir)
  assert [line["step"] for line in _lines(workdir)][-1] == 20


def test_a_second_run_into_the_same_workdir_is_refused(tiny_config, tmp_path):
  """While a run holds the workdir's lock (here this test, as another process would), a run into
  the same folder is refused in one line, before it writes anything; once free, it trains."""
  import fcntl
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / workdir_lib.LOCK_NAME, "a+") as other:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("4242\n")
    other.flush()
    with pytest.raises(UserError, match=r"another run \(pid 4242\) is training into --workdir"):
      train.train_and_evaluate(tiny_config, str(workdir))
    assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_NAME]
  train.train_and_evaluate(tiny_config, str(workdir))
  assert (workdir / "checkpoints" / "20").is_dir()
  # A lock file that cannot be opened (here a folder): the run goes on unlocked, with a warning
  # (it was a traceback; with several processes, a hang in the agreement that follows).
  unlockable = tmp_path / "unlockable"
  (unlockable / workdir_lib.LOCK_NAME).mkdir(parents=True)
  train.train_and_evaluate(tiny_config, str(unlockable))
  assert (unlockable / "checkpoints" / "20").is_dir()


def test_a_full_disk_when_the_lock_is_written_is_one_line(tmp_path, monkeypatch):
  """The lock's pid write met a full disk, and closing the file wrote it again inside the
  handler: a chained traceback, exit 1 (every process of a job counted it a crash)."""
  real_fdopen = os.fdopen

  class Full:  # The lock file on a full disk: each flush (close's too) fails.
    def __init__(self, *args, **kwargs):
      self.file = real_fdopen(*args, **kwargs)

    def __getattr__(self, name):
      return getattr(self.file, name)

    def flush(self):
      raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
      self.file.close()
      self.flush()

  monkeypatch.setattr(os, "fdopen", Full)
  with pytest.raises(UserError, match=r"^no space left where .*\.fashion_jax\.lock is written "
                                      r"\(No space left on device\); free some space"):
    with workdir_lib.lock(str(tmp_path), is_lead=True):
      pass


def test_a_workdir_others_could_have_written_is_refused(tiny_config, tmp_path, monkeypatch):
  """A folder planted in /tmp (the README's /tmp/fj) with a checkpoint in it was resumed
  silently; a FIFO for metrics.jsonl blocked the run beyond the reach of a signal; a planted
  lock-file link made the lock truncate the file it points at."""
  planted = tmp_path / "planted"
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(planted))
  if os.geteuid() == 0:  # Another user's folder: only root can make one here.
    os.chown(planted, 65534, 65534)
    with pytest.raises(UserError, match=rf"{planted} belongs to another user \(uid 65534\): a "
                       r"run there would resume from checkpoints that user wrote"):
      train.train_and_evaluate(tiny_config, str(planted))
    os.chown(planted, 0, 0)
  for path in (planted, planted / "checkpoints"):
    mode = path.stat().st_mode
    path.chmod(0o777)
    with pytest.raises(UserError, match=rf"{path} is writable by every user: .*chmod o-w {path}"):
      train.train_and_evaluate(tiny_config, str(planted))
    path.chmod(mode)
  planted.chmod(0o777)  # A mount that shows every folder as 0777 (WSL's /mnt/c): the user's word.
  monkeypatch.setenv(workdir_lib.TRUST_ENV, "1")
  train.train_and_evaluate(tiny_config, str(planted))
  monkeypatch.delenv(workdir_lib.TRUST_ENV)
  planted.chmod(0o700)
  (planted / "metrics.jsonl").unlink()
  os.mkfifo(planted / "metrics.jsonl")
  with pytest.raises(UserError, match=r"metrics.jsonl is not a regular file \(a folder or special"):
    train.train_and_evaluate(tiny_config, str(planted))
  (planted / "metrics.jsonl").unlink()
  victim = tmp_path / "victim.txt"
  victim.write_text("precious\n")
  (planted / workdir_lib.LOCK_NAME).unlink()  # The last run's: lock files stay.
  os.symlink(victim, planted / workdir_lib.LOCK_NAME)
  tiny_config.num_train_steps = 20
  train.train_and_evaluate(tiny_config, str(planted))  # Unlocked, with a warning.
  assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("entry", ["checkpoints", "metrics.jsonl"])
def test_an_earlier_runs_unwritable_files_are_refused_before_training(tiny_config, tmp_path,
                                                                      monkeypatch, entry):
  """A run's folder copied read-only: one line before training (the first save had failed
  after a 5-minute wait, with tracebacks; metrics.jsonl with a traceback)."""
  import stat
  workdir = tmp_path / "run"
  tiny_config.num_train_steps = 10
  train.train_and_evaluate(tiny_config, str(workdir))
  path = workdir / entry
  path.chmod(0o555 if path.is_dir() else 0o444)
  if os.geteuid() == 0:  # Root may write anything; judge by the mode bits, as for a user.
    monkeypatch.setattr(workdir_lib.os, "access",
                        lambda p, mode: bool(os.stat(p).st_mode & stat.S_IWUSR))
  tiny_config.num_train_steps = 20
  try:
    with pytest.raises(UserError, match=f"{entry} is not writable; make it writable"):
      train.train_and_evaluate(tiny_config, str(workdir))
  finally:
    path.chmod(0o755 if path.is_dir() else 0o644)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]


def test_an_unfinished_log_interval_survives_json_and_is_bounded():
  """What a checkpoint keeps of its log interval: exact through JSON; dropped if the interval
  changed on resume or the step does not match; none past MAX_CARRIED_STEPS steps."""
  import json
  from fashion_jax.training import loop
  def steps_from(first, n):
    return {"count": np.full(n, 16, np.float32), "loss_sum": np.float32(0.1) * np.arange(
        first, first + n, dtype=np.float32), "first_nonfinite_step": np.full(n, 2**24, np.float32)}
  straight = loop.LogIntervals(4, 100, steps.combine_metrics)
  assert [s for s, _ in straight.add(0, steps_from(0, 6))] == [4]
  carry = json.loads(json.dumps(straight.pending(6)))
  for every, step, kept in ((4, 6, True), (5, 6, False), (4, 5, False)):
    resumed = loop.LogIntervals(every, 100, steps.combine_metrics)
    resumed.resume(carry, step)
    assert bool(resumed.pending(step)) == kept
  resumed = loop.LogIntervals(4, 100, steps.combine_metrics)
  resumed.resume(carry, 6)
  (a_step, a), = straight.add(6, steps_from(6, 2))
  (b_step, b), = resumed.add(6, steps_from(6, 2))
  assert a_step == b_step == 8 and a.keys() == b.keys()
  for key in a:
    assert a[key] == b[key] and a[key].dtype == b[key].dtype, key
  never = loop.LogIntervals(10**9, 10**9, steps.combine_metrics)
  assert never.add(0, steps_from(0, loop.MAX_CARRIED_STEPS)) == []
  assert never.pending(loop.MAX_CARRIED_STEPS)
  never.add(loop.MAX_CARRIED_STEPS, steps_from(0, 1))
  assert never.pending(loop.MAX_CARRIED_STEPS + 1) == {}



def test_a_log_line_does_not_wait_for_the_window_dispatched_after_it(tiny_config, tmp_path,
                                                                      monkeypatch):
  """The loop reads a window's metrics while the next one runs. Each log line's learning rate
  was a device call queued behind that next window: the line waited for it to finish, and the
  device then idled while the host prepared the window after it (every window with a line). The
  rates are computed ahead, a block of lines a call: none is asked of the device at a line, and
  each equals the schedule's at the line's last step. (Whether a window is still running after a
  line was timed before; a 70 ms window on a loaded CPU made that flaky.)"""
  from tests.conftest import write_idx_folder  # pylint: disable=import-outside-toplevel
  tiny_config.update(idx_dir=write_idx_folder(str(tmp_path / "idx"), n_train=1600),
                     num_train_steps=430, steps_per_dispatch=100, eval_every_steps=430,
                     checkpoint_every_steps=430, log_every_steps=50, lr_schedule="cosine")
  schedule = steps.create_schedule(tiny_config, 430)
  asked, make_rates = [], loop.LineRates.__init__

  def counted(self, *args, **kwargs):
    make_rates(self, *args, **kwargs)
    rates = self._rates  # pylint: disable=protected-access
    self._rates = lambda steps_: asked.append(len(steps_)) or rates(steps_)
    self._schedule = lambda step: asked.append(("alone", step)) or schedule(step)

  monkeypatch.setattr(loop.LineRates, "__init__", counted)
  train.train_and_evaluate(tiny_config, str(tmp_path / "w"), compile_ahead=False)
  assert asked == [], asked  # All in the block computed before the loop: no call at a line.
  lines = [l for l in _lines(str(tmp_path / "w")) if "learning_rate" in l]
  assert [l["step"] for l in lines] == [50, 100, 150, 200, 250, 300, 350, 400, 430]
  for line in lines:
    assert line["learning_rate"] == pytest.approx(float(schedule(line["step"] - 1)), rel=1e-5)
  rates = loop.LineRates(schedule, 1, 5000)  # Past a block (4096 lines): one call more.
  assert rates(4097) == pytest.approx(float(schedule(4096)), rel=1e-5)


def test_a_host_window_is_gathered_once_in_the_order_of_the_steps(tiny_config):
  """data_placement=host: a window's batches were gathered one by one, then stacked (np.stack):
  two copies of the window at the peak (94 MB for a 47 MB window: 1,000 steps of batch 60).
  Now one gather straight into the stacked array. Every window, from any step and across an
  epoch's end, holds exactly the batches the per-step iterator gives (the one train order)."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(rng.integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8),
                               rng.integers(0, 10, 4096).astype(np.int32))
  tiny_config.batch_size = 64  # 64 steps an epoch.
  parallel = parallel_lib.Parallel(tiny_config.parallelism)
  windows = loop.Windows(None, split, tiny_config, parallel, "host", 0)
  window_bytes = 60 * 64 * (28 * 28 + 4)
  windows.inputs(0, 60)  # (The epochs' orders, computed once, are not the window's copies.)
  tracemalloc.start()
  try:
    got = windows.inputs(60, 60)
    jax.block_until_ready(got)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 1.5 * window_bytes, (peak, window_bytes)
  for first, n in ((0, 64), (40, 60), (100, 64), (127, 1)):  # (40: into the second epoch.)
    expected = input_pipeline.train_batches(split, 64, tiny_config.seed, first)
    expected = [next(expected) for _ in range(n)]
    (got,) = windows.inputs(first, n)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.asarray(got[key]), np.stack([b[key] for b in expected]))


def test_the_progress_bar_keeps_its_count_when_its_clock_restarts(monkeypatch):
  """A resumed run's bar (160 of 320 images done) restarts its clock after each compile: it was
  redrawn at 0 first, "0.00/320 [00:00<-00:00, -19.7Mimg/s]", going back and negative."""
  import io  # pylint: disable=import-outside-toplevel
  from fashion_jax.training import progress  # pylint: disable=import-outside-toplevel
  shown = io.StringIO()
  monkeypatch.setattr(sys, "stderr", shown)
  with progress.Bar(True, 320, 160, desc="train") as bar:
    bar.restart_clock()
    bar.update(16)
    bar.restart_clock()
    assert bar.count == 176
  states = [s for s in shown.getvalue().replace("\n", "\r").split("\r") if "/320" in s]
  assert states, shown.getvalue()
  for state in states:
    assert float(re.search(r"([\d.]+)/320", state).group(1)) >= 160, states
    assert not re.search(r"-\d", state), states


def test_a_batch_larger_than_what_validation_size_leaves_names_both_settings(tiny_config,
                                                                             tmp_path):
  """256 train examples, 200 held out for validation: a batch of 64 fits the split but not the
  56 left. The error said to lower the batch size only, though validation_size made it too big."""
  tiny_config.batch_size, tiny_config.validation_size = 64, 200
  with pytest.raises(UserError) as raised:
    train.prepare(tiny_config, str(tmp_path / "run"))
  message = str(raised.value)
  assert "\n" not in message
  for fragment in ("batch_size=64", "56 training examples", "validation_size=200",
                   "lower batch_size to 56 or less, or lower validation_size"):
    assert fragment in message, message
  tiny_config.validation_size = 0  # Without a validation set: the batch size alone, as before.
  tiny_config.batch_size = 512
  with pytest.raises(UserError, match="larger than the 256 training examples; lower it$"):
    train.prepare(tiny_config, str(tmp_path / "run"))


def test_a_small_interval_with_no_common_factor_runs_each_stretch_as_one_window(tiny_config,
                                                                                tmp_path,
                                                                                monkeypatch):
  """Evals every 7 steps, checkpoints every 1875 (an epoch at batch 32): no common factor, so
  the windows were the cap (100), cut into powers of two up to each eval step: 4+2+1, three
  dispatches and three compiled lengths where one 7-step window does. Now 7, and powers of two
  only where a checkpoint falls inside a stretch; every boundary kept."""
  assert loop.window_length(tiny_config, 1875, 1875, 7, "cpu") == 7
  assert loop.window_length(tiny_config, 1875, 1875, 30, "cpu") == 30  # (Was 16+8+4+2.)
  assert loop.window_length(tiny_config, 1875, 1875, 1875, "cpu") == 75  # Common: as before.
  assert loop.window_length(tiny_config, 937, 937, 937, "cpu") == 100  # Prime: the cap.
  window, total = loop.window_length(tiny_config, 1875, 1875, 7, "cpu"), 2 * 1875
  step, runs = 0, []
  while step < total:
    n = loop.next_window(step, window, total, 7, 1875)
    assert all(step // e == (step + n - 1) // e for e in (7, 1875)), (step, n)  # No crossing.
    runs.append(n)
    step += n
  assert sum(runs) == total and set(runs[:-1]) <= {7, 4, 2, 1}, set(runs)  # And the end: 5.
  assert len(runs) <= total // 7 + 6, len(runs)  # (Was 3 per stretch: 1606.)
  tiny_config.update(num_train_steps=28, eval_every_steps=7, checkpoint_every_steps=30,
                     log_every_steps=7)
  made, calls = [], []

  class Recorded(loop.Windows):
    def __init__(self, *args):
      super().__init__(*args)
      made.append(self)

    def __call__(self, state, step, n):
      calls.append(n)
      return super().__call__(state, step, n)
  monkeypatch.setattr(loop, "Windows", Recorded)
  train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert calls == [7, 7, 7, 7] and made[0].compiled_lengths == [7], calls  # (Was [4, 2, 1] x4.)
  lines = _lines(str(tmp_path / "run"))
  assert [l["step"] for l in lines if "eval_accuracy" in l] == [7, 14, 21, 28]
