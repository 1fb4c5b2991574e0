"""Loading a trained run for inference: which checkpoint, older config files, bad workdirs."""

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fashion_jax import config_lib
from fashion_jax.data import idx
from fashion_jax.serving import inference
from fashion_jax.support.errors import UserError
from tests.conftest import ROOT
from tests.conftest import assert_one_line_error
from tests.conftest import run_module


def _test_images(workdir):
  folder = os.path.join(os.path.dirname(workdir), "idx")
  images = idx.read_idx(os.path.join(folder, idx.FILES["test"][0] + ".gz"))
  labels = idx.read_idx(os.path.join(folder, idx.FILES["test"][1] + ".gz"))
  return images, labels


def test_loads_best_checkpoint_by_validation_accuracy(trained_tiny_workdir):
  classifier = inference.load(trained_tiny_workdir)
  with open(os.path.join(trained_tiny_workdir, "metrics.jsonl")) as f:
    val = {r["step"]: r["val_accuracy"] for r in map(json.loads, f) if "val_accuracy" in r}
  best = max(val.values())
  assert classifier.step == max(s for s, a in val.items() if a == best)
  assert "validation" in classifier.why
  images, labels = _test_images(trained_tiny_workdir)
  probabilities = classifier.probabilities(images)
  assert probabilities.shape == (len(images), 10)
  np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
  assert (probabilities.argmax(1) == labels).mean() > 0.5  # Synthetic bars; chance is 0.1.
  # Batching (with padding) does not change results.
  np.testing.assert_allclose(classifier.probabilities(images[:7]), probabilities[:7], atol=1e-6)


def test_choose_step_without_validation_takes_the_latest(tmp_path):
  assert inference.choose_step(str(tmp_path), [10, 30, 20])[0] == 30
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, accuracy in ((10, 0.8), (20, 0.9), (30, 0.85)):
      f.write(json.dumps({"step": step, "eval_accuracy": 0.99, "val_accuracy": accuracy}) + "\n")
  assert inference.choose_step(str(tmp_path), [10, 20, 30])[0] == 20
  assert inference.choose_step(str(tmp_path), [10, 30])[0] == 30  # 20 no longer kept.
  with pytest.raises(UserError, match="no checkpoint"):
    inference.choose_step(str(tmp_path), [])


# Keys that configs of earlier versions lack (added after runs were already being saved).
_ADDED_SINCE_THE_FIRST_RUNS = (
    "model_kwargs", "compute_dtype", "lr_schedule", "warmup_steps", "weight_decay", "momentum",
    "label_smoothing", "ema_decay", "augment_translate", "augment_flip", "random_erasing",
    "eval_flip_tta", "validation_size", "on_nonfinite", "deterministic", "progress_bar",
    "tensorboard_samples", "backend", "data_placement", "steps_per_dispatch")


def test_config_of_an_older_version_still_loads(trained_tiny_workdir, tmp_path):
  """A config.json without the keys added since, and with one removed since: the saved values
  over the current defaults."""
  workdir = str(tmp_path / "old")
  shutil.copytree(trained_tiny_workdir, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    values = json.load(f)
  for key in _ADDED_SINCE_THE_FIRST_RUNS:
    del values[key]
  values["a_setting_since_removed"] = 3
  with open(path, "w") as f:
    json.dump(values, f)
  config = inference.load_run_config(workdir)
  assert "a_setting_since_removed" not in config
  assert config.batch_size == values["batch_size"] == 16  # Saved values win...
  assert config.ema_decay == 0.0 and config.data_placement == "auto"  # ...defaults fill the rest.
  assert inference.load(workdir).step > 0


def test_the_default_config_file_is_the_package_default():
  from fashion_jax import default_config
  loaded = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  assert loaded.to_dict() == default_config.get_config().to_dict()


def test_a_runs_checkpoints_folder_as_workdir_names_the_run(trained_tiny_workdir):
  """--workdir=RUN/checkpoints/20 (a checkpoint's folder, as other tools take one) was "not a
  fashion_jax training run", nothing said of the run it is in or of --step."""
  checkpoints = os.path.join(trained_tiny_workdir, "checkpoints")
  with pytest.raises(UserError, match=re.escape(
      f"is not a fashion_jax training run; it is in the run {trained_tiny_workdir}: pass "
      f"--workdir={trained_tiny_workdir} --step=20 (a checkpoint is picked by its step)")):
    inference.load(os.path.join(checkpoints, "20"))
  with pytest.raises(UserError, match=re.escape(
      f"it is in the run {trained_tiny_workdir}: pass --workdir={trained_tiny_workdir}") + "$"):
    inference.load(checkpoints + os.sep)


@pytest.mark.parametrize("value", ["notadict", "[1, 2]", "{\"dropout_rate\": true}"])
def test_a_dict_setting_given_no_dict_is_one_line_naming_the_form(tmp_path, value):
  """--config.model_kwargs=VALUE that is no dict literal: ml_collections' words, "Failed to
  parse 'notadict' as a ConfigDict: ValueError('malformed node or string on line 1: <ast.Name
  object at 0x7f...>')", were the whole message."""
  proc = run_module("fashion_jax.main", "--config=configs/tiny.py",
                    f"--workdir={tmp_path / 'run'}", f"--config.model_kwargs={value}")
  assert_one_line_error(proc, f"--config.model_kwargs={value} is invalid: config.model_kwargs "
                        "takes a dict written as Python (True, False, None; names and text in "
                        "quotes), quoted for the shell: --config.model_kwargs='{\"NAME\": VALUE}'")
  assert " object at 0x" not in proc.stderr and not (tmp_path / "run").exists()


def test_bad_workdirs_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    inference.load(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="not a fashion_jax training run"):
    inference.load(str(tmp_path / "empty"))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(UserError, match="is a file, not a folder"):
    inference.load(str(tmp_path / "a_file"))
  with pytest.raises(UserError, match="--workdir is empty"):  # Not the current folder.
    inference.load("")


@pytest.mark.parametrize("content, says", [
    (b"[]", "holds [], not a settings object"),
    (b"null", "holds null, not a settings object"),
    (b"\xff\xfe{", "cannot read"),  # Not UTF-8.
    (None, "is a folder where fashion_jax keeps a file"),
    (b'{"eval_batch_size": "abc"}', "setting 'eval_batch_size' = 'abc' does not fit"),
    (b'{"model": "no_such_model"}', "config.model='no_such_model' is invalid"),
    # What training refuses now but an older version allowed: serving does not check it.
    (b'{"seed": 5000000000, "momentum": 1.0, "augment_translate": 30}', None)])
def test_a_damaged_config_json_is_a_user_error(trained_tiny_workdir, tmp_path, content, says):
  """predict, evaluate and export read it first: each of these was a traceback (exit 1)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_tiny_workdir, workdir)
  path = os.path.join(workdir, "config.json")
  os.remove(path)
  if content is None:
    os.makedirs(path)
  else:
    with open(path, "wb") as f:
      f.write(content)
  if says is None:
    values = json.loads(content)
    assert {k: inference.load_run_config(workdir)[k] for k in values} == values
    return
  with pytest.raises(UserError, match=re.escape(says)) as raised:
    inference.load_run_config(workdir)
  assert path in str(raised.value)  # Which file: evaluate, predict, export have no --config.


def test_a_config_json_that_no_longer_matches_the_checkpoints(trained_tiny_workdir, tmp_path):
  """predict/evaluate/export take no --config: the hint is the config.json, not a training flag
  (it had said "use a new --workdir, or --config.model=cnn")."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_tiny_workdir, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    values = json.load(f)
  values["model"] = "linear"
  with open(path, "w") as f:
    json.dump(values, f)
  with pytest.raises(UserError, match="is of model 'cnn' but the config asks for 'linear'") as raised:
    inference.load(workdir)
  assert "put back the config.json it was trained with" in str(raised.value)
  assert "--config" not in str(raised.value) and "--workdir" not in str(raised.value)


def test_a_checkpoint_deleted_while_it_is_read_is_chosen_again(trained_tiny_workdir, tmp_path,
                                                               monkeypatch):
  """predict/evaluate/export beside a run still training into the workdir: the run's keep
  policy can delete the chosen checkpoint between the listing and the read. It had failed with
  "is unreadable ... or re-train"; now the choice is made again among what is kept."""
  from fashion_jax.support import checkpointing  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_tiny_workdir, workdir)
  original, deleted = checkpointing.Checkpointer.restore_weights, []

  def deleting_first(self, step, description):
    if not deleted:  # The training run's keep policy, just before the read.
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
      deleted.append(step)
    return original(self, step, description)
  monkeypatch.setattr(checkpointing.Checkpointer, "restore_weights", deleting_first)
  classifier = inference.load(workdir)
  assert deleted and classifier.step != deleted[0]
  assert classifier.step in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                             if d.isdigit()]
  deleted.clear()  # With --step, nothing else may be chosen: say what happened.
  step = classifier.step
  with pytest.raises(UserError, match=rf"checkpoint .*/{step} was deleted while it was read \("
                                      r"is a run still training into this workdir\?\); run the "
                                      r"command again$"):  # None is left to name.
    inference.load(workdir, step=step)


def test_unreadable_run_files_are_one_line(trained_tiny_workdir, tmp_path):
  """An unreadable checkpoints folder or metrics.jsonl: a traceback (exit 1) in predict,
  evaluate and export. As root, run without the capabilities that ignore permissions."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  prefix = []
  if os.geteuid() == 0:
    if shutil.which("setpriv") is None:
      pytest.skip("running as root without setpriv: permissions cannot be made to apply")
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
  for entry in ("checkpoints", "metrics.jsonl"):
    os.chmod(workdir / entry, 0)
    try:
      proc = subprocess.run(
          [*prefix, sys.executable, "-c", "import sys; from fashion_jax.serving import inference"
           "\ntry: inference.load(sys.argv[1])\nexcept Exception as e: print(type(e).__name__, e)",
           str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=120,
          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    finally:
      os.chmod(workdir / entry, 0o755)
    assert proc.stdout.startswith(f"UserError cannot read {workdir}/{entry} (Permission denied); "
                                  "make it readable by you"), proc.stdout + proc.stderr[-2000:]


def test_metrics_lines_that_are_no_records_are_skipped(trained_tiny_workdir, tmp_path):
  """A damaged or hand-edited metrics.jsonl (stray bytes, JSON that is no record, a value that is
  no accuracy) neither stops choosing the checkpoint nor a resume, which drops those lines."""
  from fashion_jax.support import metric_writers  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_tiny_workdir, workdir)
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "rb") as f:
    good = f.read()
  junk = [b"\xff\xfe\x00garbage", b"[1, 2]", b"7", b'{"step": "x"}', b'{"step": true}',
          b'{"step": 10, "val_accuracy": null}', b'{"step": 20, "val_accuracy": "high"}']
  with open(path, "wb") as f:
    f.write(good + b"\n".join(junk) + b"\n")
  records = metric_writers.read_lines(workdir)
  assert len(records) == good.count(b"\n") + 2  # The two with a whole-number step.
  expected = inference._eval_accuracies(trained_tiny_workdir, "val_accuracy")  # pylint: disable=protected-access
  assert inference._eval_accuracies(workdir, "val_accuracy") == expected and expected  # pylint: disable=protected-access
  assert inference.load(workdir).step > 0
  last = max(r["step"] for r in records)
  assert metric_writers.MetricWriter(workdir).truncate_after(last) == 5  # Those not records.
  with open(path, "rb") as f:
    assert f.read() == good + b'{"step": 10, "val_accuracy": null}\n{"step": 20, "val_accuracy": "high"}\n'


def test_serving_builds_nothing_native_for_a_native_trained_run(trained_tiny_workdir, tmp_path):
  """A run trained with conv_impl=native: predict, evaluate and export use XLA's ops only
  (no native build: nothing appears in the kernel cache; lowering works for any platform)."""
  from PIL import Image
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["conv_impl"] = "native"
  (workdir / "config.json").write_text(json.dumps(config))
  cache = tmp_path / "cache"
  cache.mkdir(mode=0o700)
  env = {"FASHION_JAX_CACHE_DIR": str(cache)}
  images, _ = _test_images(trained_tiny_workdir)
  Image.fromarray(images[0]).save(tmp_path / "item.png")
  commands = [("fashion_jax.predict", str(tmp_path / "item.png")),
              ("fashion_jax.evaluate", f"--output_dir={tmp_path / 'evaluation'}")]
  if importlib.util.find_spec("tensorflow") is not None:  # Export needs the `tf` extra.
    commands.append(("fashion_jax.export", f"--output={tmp_path / 'saved'}",
                     "--platforms=cpu,cuda,tpu"))
  for module, *args in commands:
    proc = run_module(module, f"--workdir={workdir}", *args, env=env)
    assert proc.returncode == 0, (module, proc.stderr[-3000:])
  assert list(cache.rglob("*")) == [], "serving built native kernels"


def test_logits_are_training_evaluations_own_in_bfloat16():
  """The logits round as in training's evaluation (steps.eval_sums, a scan over the batches):
  evaluate's accuracy of a bfloat16 run was 50.25% where training had logged 50.27% (jitted
  batch by batch, XLA compiled the model unlike in the scan's body). Labels = the classifier's
  own predictions, so training's eval counts every image correct only if each argmax agrees."""
  import jax  # pylint: disable=import-outside-toplevel
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from fashion_jax.model import steps  # pylint: disable=import-outside-toplevel
  config = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  config.compute_dtype = "bfloat16"
  model = steps.create_model(config, training=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                        shapes["params"])
  classifier = inference.Classifier(config=config, model=model, variables={"params": params},
                                    step=1, why="test", checkpoint_dir="", batch_size=100)
  images = rng.integers(0, 256, size=(1000, 28, 28, 1), dtype=np.uint8)
  logits = classifier.logits(images, scan=True)  # As evaluate computes them.
  split = input_pipeline.Split(images, logits.argmax(1).astype(np.int32))
  batches = input_pipeline.stack(list(input_pipeline.eval_batches(split, 100)))
  state = steps.TrainState(step=np.int32(1), params=params, opt_state=(), rng=np.zeros(2))
  sums = jax.jit(functools.partial(steps.eval_sums, model=model))(state, batches)
  assert int(sums["count"]) == 1000
  assert int(sums["correct"]) == 1000


@pytest.mark.parametrize("opened", ["config.json", "a checkpoint's file", "the folder above"])
def test_what_another_user_could_have_written_is_not_served(trained_tiny_workdir, tmp_path,
                                                            monkeypatch, opened):
  """Only the run's folder and checkpoints/ were judged: a config.json or a checkpoint's file
  every user may write, or a run in a folder every user may write (no sticky bit: anyone can
  rename the run away and put theirs there), was served. A sticky folder (/tmp) is fine."""
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  above = tmp_path / "shared"
  workdir = above / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  step = inference.load(str(workdir)).step
  path = {"config.json": workdir / "config.json",
          "a checkpoint's file": workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA",
          "the folder above": above}[opened]
  os.chmod(above, 0o1777)  # Sticky, as /tmp: served.
  assert inference.load(str(workdir)).step == step
  os.chmod(path, 0o777 if path == above else 0o666)
  with pytest.raises(UserError, match=f"{re.escape(str(path))} is writable by every user"):
    inference.load(str(workdir))
  monkeypatch.setenv("FASHION_JAX_TRUST_WORKDIR", "1")
  assert inference.load(str(workdir)).step == step


def test_another_users_run_in_a_sticky_folder_is_not_served(trained_tiny_workdir, tmp_path,
                                                            monkeypatch):
  """A run another user made in /tmp was served (whoever made /tmp/fj first decided what it
  answered), as the IDX folder of such a user was read; a teammate's run elsewhere still is."""
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  for folder, mode in (("sticky", 0o1777), ("team", 0o755)):
    os.makedirs(tmp_path / folder, mode=mode)
    os.chmod(tmp_path / folder, mode)
    shutil.copytree(trained_tiny_workdir, tmp_path / folder / "run")
  if os.getuid() == 0:  # Another user's: theirs as root can make it, else ours seen by another.
    for folder in ("sticky", "team"):
      for path in [tmp_path / folder / "run", *(tmp_path / folder / "run").rglob("*")]:
        os.lchown(path, 65534, 65534)
  else:  # (Not os.getuid faked: /tmp/pytest-of-USER, on the way to both runs, would be
    real_lstat = os.lstat  # another user's in /tmp then, and the team's run refused too.)
    sticky_run = str(tmp_path / "sticky" / "run")

    def lstat(path, *args, **kwargs):
      info = real_lstat(path, *args, **kwargs)
      if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) == sticky_run:
        info = os.stat_result((*info[:4], 65534, *info[5:]))
      return info
    monkeypatch.setattr(os, "lstat", lstat)
  with pytest.raises(UserError, match=re.escape(
      f"{tmp_path / 'sticky' / 'run'} belongs to another user (uid ")):
    inference.load(str(tmp_path / "sticky" / "run"))
  assert inference.load(str(tmp_path / "team" / "run")).step > 0
  monkeypatch.setenv("FASHION_JAX_TRUST_WORKDIR", "1")
  assert inference.load(str(tmp_path / "sticky" / "run")).step > 0
