"""fashion_jax.export: the SavedModel computes what JAX computes, for any batch size; the errors."""

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

try:
  import tensorflow as tf
except ImportError:  # Colab's TPU runtime has no TensorFlow; export then says what to install.
  tf = None

from fashion_jax import config_lib
from fashion_jax.data import input_pipeline
from fashion_jax.model import steps
from fashion_jax.serving import export
from fashion_jax.serving import export_folder
from fashion_jax.serving import inference
from fashion_jax.serving import savedmodel
from fashion_jax.support.errors import UserError
from tests.conftest import ROOT
from tests.conftest import assert_one_line_error
from tests.conftest import run_module

ATOL = 1e-5
needs_tf = pytest.mark.skipif(tf is None, reason="export needs TensorFlow, not installed here "
                                                 "(pip install 'fashion_jax[tf]')")


def _tiny_test_images(workdir):
  """The tiny run's own test images (uint8 [100, 28, 28, 1])."""
  return input_pipeline.load(inference.load_run_config(workdir), "test").images


def _version(text):
  return tuple(int(part) for part in text.split("."))


def _serve(loaded, images):
  return loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()


@needs_tf
def test_cli_export_matches_jax(trained_tiny_workdir, tmp_path):
  output = tmp_path / "saved"
  proc = run_module("fashion_jax.export", f"--workdir={trained_tiny_workdir}", f"--output={output}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "self-check vs JAX: max |diff|" in proc.stdout
  # TensorFlow's INFO chatter (eight lines: inputs "renamed to unknown", its staging folder's
  # "Assets written to") is not shown; the command's own lines are.
  assert "renamed to unknown" not in proc.stderr and "Assets written to" not in proc.stderr

  classifier = inference.load(trained_tiny_workdir)
  loaded = tf.saved_model.load(str(output))
  images = _tiny_test_images(trained_tiny_workdir)[:, :, :, 0]  # [100, 28, 28]
  expected = classifier.probabilities(images)
  # Batch sizes the export never saw (its self-check used 3): the batch axis is symbolic.
  for batch in (7, 1, 100):
    got = _serve(loaded, images[:batch])
    assert got.shape == (batch, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[:batch], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got.argmax(1), expected[:batch].argmax(1))
  # The Python entry points and the [batch, 28, 28, 1] signature give the same numbers.
  np.testing.assert_allclose(loaded.probabilities(images[:7]).numpy(), expected[:7], atol=ATOL,
                             rtol=0)
  nhwc = loaded.signatures["serving_nhwc"](images=tf.constant(images[:9, :, :, None]))
  np.testing.assert_allclose(nhwc["probabilities"].numpy(), expected[:9], atol=ATOL, rtol=0)
  np.testing.assert_allclose(loaded.probabilities_nhwc(images[:5, :, :, None]).numpy(),
                             expected[:5], atol=ATOL, rtol=0)
  assert loaded.probabilities(np.zeros((0, 28, 28), np.uint8)).shape == (0, 10)

  # The serving signature: named uint8 input of any batch, named output.
  signature = loaded.signatures["serving_default"]
  (spec,) = signature.structured_input_signature[1].values()
  assert signature.structured_input_signature[1].keys() == {"images"}
  assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28]
  assert list(signature.structured_outputs) == ["probabilities"]
  with pytest.raises(Exception, match="uint8"):  # Floats are rejected, not silently misread.
    signature(images=tf.zeros((2, 28, 28), tf.float32))

  # Class names three ways, and the metadata and README beside the model.
  names = list(classifier.class_names)
  assert [n.decode() for n in loaded.class_names.numpy()] == names
  assert int(loaded.step.numpy()) == classifier.step
  assert (output / "assets" / "class_names.txt").read_text().splitlines() == names
  metadata = json.loads((output / export.METADATA_NAME).read_text())
  assert metadata["step"] == classifier.step and metadata["why"] == classifier.why
  assert metadata["model"] == "cnn" and metadata["class_names"] == names
  assert metadata["platforms"] == ["cpu", "cuda", "tpu"]
  assert metadata["self_check"]["max_abs_diff_vs_jax"] <= ATOL
  readme = (output / export.README_NAME).read_text()
  assert f"step {classifier.step}" in readme and "serving_default" in readme
  # Parameters are variables (in variables/), not constants folded into the graph.
  assert {v.name.split(":")[0] for v in loaded.model_variables} >= {
      "params/Conv_0/kernel", "params/Dense_1/bias"}
  assert (output / "saved_model.pb").stat().st_size < 200_000
  # Serialized for a StableHLO this TensorFlow reads: JAX's own pick is newer from jax 0.10 on
  # (0.12's could not be loaded by TensorFlow 2.21 at all). The artifact names its producer.
  produced = set(re.findall(rb"StableHLO_v(\d+\.\d+\.\d+)",
                            (output / "saved_model.pb").read_bytes()))
  assert produced == {metadata["versions"]["stablehlo"].encode()}, produced
  readable = savedmodel.tensorflow_stablehlo_version()
  assert readable is not None  # A TensorFlow that stopped saying would fall back to JAX's pick.
  assert _version(metadata["versions"]["stablehlo"]) <= _version(readable)
  assert metadata["versions"]["calling_convention"] <= (
      savedmodel.tensorflow_calling_convention_version())


def _small_random_classifier(config=None, step: int = 1):
  """`config`'s model (the default CNN) with random values of the right shapes (eval_shape:
  nothing to compile, no training): parameters, and BatchNorm's running statistics where the
  model has them, so a model that dropped them would differ."""
  config = config or config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  model = steps.create_model(config, training=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
  rng = np.random.default_rng(0)
  variables = {"params": jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                                      shapes["params"])}
  if "batch_stats" in shapes:
    variables["batch_stats"] = jax.tree.map(
        lambda x: rng.uniform(0.5, 2.0, x.shape).astype(np.float32), shapes["batch_stats"])
  return inference.Classifier(config=config, model=model, variables=variables, step=step,
                              why="test", checkpoint_dir="", batch_size=8)


@needs_tf
def test_a_tensorflow_too_old_for_jaxs_own_stablehlo_is_one_line(tmp_path, monkeypatch):
  """Without the StableHLO cap, where this TensorFlow cannot read what JAX writes (jax 0.12 with
  TensorFlow 2.21 or 2.20), the export stops with one line naming both versions and what to
  install, and writes nothing (it was a TensorFlow traceback, exit 1)."""
  monkeypatch.setattr(savedmodel, "tensorflow_stablehlo_version", lambda: None)  # No cap.
  output = tmp_path / "saved"
  try:
    metadata = export.export(_small_random_classifier(), str(output), platforms=["cpu"])
  except UserError as e:
    message = str(e)
    assert f"TensorFlow {tf.__version__} cannot run the model JAX {jax.__version__} wrote" in (
        message) and "pip install -U tensorflow" in message and "\n" not in message, message
    assert not output.exists() and os.listdir(tmp_path) == []  # Nor its staging folder.
  else:
    pytest.skip(f"this TensorFlow ({tf.__version__}) reads JAX {jax.__version__}'s own pick "
                f"(StableHLO {metadata['versions']['stablehlo']}): nothing to refuse here")


@needs_tf
@pytest.mark.parametrize("capped", [True, False], ids=["capped", "not capped"])
def test_a_tensorflow_that_runs_an_older_calling_convention(tmp_path, monkeypatch, capped):
  """TensorFlow 2.18 runs jax.export's calling convention up to 9; jax 0.10 and later write 10
  by default (jax2tf refused with a NotImplementedError traceback). Here this TensorFlow is made
  to say 9: export writes 9 and the SavedModel runs; without the cap, one line, exit 2."""
  from tensorflow.compiler.tf2xla.python import xla as tfxla  # pylint: disable=g-import-not-at-top
  if jax.config.jax_export_calling_convention_version <= 9:
    pytest.skip(f"JAX {jax.__version__} writes calling convention 9 already: nothing to lower")
  monkeypatch.setattr(tfxla, "call_module_maximum_supported_version", lambda: 9)
  if not capped:
    monkeypatch.setattr(savedmodel, "tensorflow_calling_convention_version", lambda: None)
  output = tmp_path / "saved"
  classifier = _small_random_classifier()
  default = jax.config.jax_export_calling_convention_version
  if capped:
    metadata = export.export(classifier, str(output), platforms=["cpu"])
    assert metadata["versions"]["calling_convention"] == 9
    assert metadata["self_check"]["max_abs_diff_vs_jax"] <= ATOL  # Loaded and run: it works.
  else:
    with pytest.raises(UserError, match=r"\(it needs calling convention \d+, this TensorFlow "
                       r"runs up to 9\); install a TensorFlow released after this JAX"):
      export.export(classifier, str(output), platforms=["cpu"])
    assert not output.exists()
  assert jax.config.jax_export_calling_convention_version == default  # Put back either way.


@needs_tf
def test_a_module_tensorflow_cannot_read_is_named_in_one_line(monkeypatch):
  """verify's translation of XlaCallModule's refusal, on every stack (the real one above only
  happens where JAX is newer than TensorFlow)."""
  error = ("Graph execution error:\n\nCannot deserialize computation: UNKNOWN: <unknown>:0: "
           "error: loc(\"shape_assertion\"): unregistered operation 'vhlo.custom_call_v2'\n"
           "<unknown>:0: note: in bytecode version 6 produced by: StableHLO_v1.18.0\n"
           "<unknown>:0: error: failed to deserialize portable artifact using StableHLO_v1.13.7")

  def refuse(**_):
    raise tf.errors.InvalidArgumentError(None, None, error)

  class Loaded:
    signatures = {"serving_default": refuse}

  monkeypatch.setattr(tf.saved_model, "load", lambda path: Loaded())
  with pytest.raises(UserError, match=r"\(it is StableHLO 1\.18\.0, this TensorFlow reads up to "
                     r"1\.13\.7\); install a TensorFlow released after this JAX"):
    savedmodel.verify("unused", classifier=None)
  other = tf.errors.InvalidArgumentError(None, None, "some other refusal")
  monkeypatch.setattr(Loaded, "signatures", {"serving_default": lambda **_: (_ for _ in ()).throw(
      other)})
  with pytest.raises(tf.errors.InvalidArgumentError, match="some other refusal"):
    savedmodel.verify("unused", classifier=None)  # Not every refusal is a version mismatch.


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/pid_max"), reason="no /proc (not Linux)")
def test_a_killed_exports_old_folder_is_swept_once_the_next_export_is_in(tmp_path, monkeypatch):
  """Killed between its two renames (or while removing the previous export), an export left
  the previous one set aside beside --output for good. The next export to it removes them once
  it is in place: this user's, their process gone, set aside over a minute ago; not a live
  process's, one just set aside (another export's, for microseconds), nor other names: a
  user's own `model.old-2025` backup of an export was removed (the set-aside name had been
  `OUTPUT.old-PID`)."""
  out = tmp_path / "model"
  with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:  # Process numbers free here.
    dead = [p for p in range(int(f.read()), 300, -1) if not os.path.exists(f"/proc/{p}")][:5]
  aside = ".model.fj-old-"
  # No longer than the staging folder's name, `.NAME.export-` + 8 (a longer one failed a 236-byte
  # --output's rename after the whole export was built; Linux's largest PID here).
  assert len(os.path.basename(export_folder._aside("m" * 238, 4_194_304))) <= 255  # pylint: disable=protected-access
  names = {"dead": f"{aside}{dead[0]}", "live": f"{aside}{os.getppid()}",
           "other": f"{aside}x", "digit": f"{aside}\u00b2", "file": f"{aside}{dead[1]}",
           "near": f".modelx.fj-old-{dead[2]}", "no export": f"{aside}{dead[3]}",
           "past pid_max": f"{aside}2024010100", "a user's backup": f"model.old-{dead[4]}"}
  for key, name in names.items():
    if key == "file":
      (tmp_path / name).write_text("not a folder")
    else:
      (tmp_path / name).mkdir()
      (tmp_path / name / "saved_model.pb").write_text("old")
      if key != "no export":
        (tmp_path / name / export_folder.METADATA_NAME).write_text("{}")
  staging = tmp_path / ".model.export-1"
  staging.mkdir()
  (staging / "saved_model.pb").write_text("new")
  export_folder.move_into_place(str(staging), str(out))  # Just set aside: all kept.
  assert sorted(os.listdir(tmp_path)) == sorted(["model", *names.values()])
  real = export_folder.time.time
  monkeypatch.setattr(export_folder.time, "time", lambda: real() + 120)
  staging.mkdir()
  (staging / "saved_model.pb").write_text("newer")
  export_folder.move_into_place(str(staging), str(out))
  assert (out / "saved_model.pb").read_text() == "newer"
  assert sorted(os.listdir(tmp_path)) == sorted(["model", *(n for k, n in names.items()
                                                           if k != "dead")])


@needs_tf
def test_batchnorm_and_flip_tta_export(tmp_path):
  """BatchNorm statistics and flip test-time augmentation survive the export (no training); and
  exporting in-process leaves absl's logging as it found it (TensorFlow's SavedModel writer left
  absl's logger at WARNING, silencing a notebook's or test's later INFO lines)."""
  absl_logger, root = logging.getLogger("absl"), logging.getLogger()
  levels = absl_logger.level, root.level
  absl_logger.setLevel(logging.NOTSET)  # As in a program that never set a verbosity.
  root.setLevel(logging.WARNING)
  try:
    _batchnorm_and_flip_tta_export(tmp_path)
    assert (absl_logger.level, root.level) == (logging.NOTSET, logging.WARNING)
  finally:
    absl_logger.setLevel(levels[0])
    root.setLevel(levels[1])


def _batchnorm_and_flip_tta_export(tmp_path):
  config = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  config.model = "cnn_bn"
  config.model_kwargs.width = 8
  config.eval_flip_tta = True
  classifier = _small_random_classifier(config, step=123)
  model, variables = classifier.model, classifier.variables
  assert "batch_stats" in variables
  rng = np.random.default_rng(1)
  metadata = export.export(classifier, str(tmp_path / "bn"), platforms=["cpu"])
  assert metadata["flip_tta"] is True and metadata["platforms"] == ["cpu"]

  loaded = tf.saved_model.load(str(tmp_path / "bn"))
  images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
  expected = classifier.probabilities(images)
  no_tta = np.asarray(jax.nn.softmax(model.apply(variables, images[..., None] / 255.0), -1))
  # The TTA changes the numbers by far more than the tolerance: an export without it would fail.
  assert np.abs(no_tta - expected).max() > 10 * ATOL
  np.testing.assert_allclose(_serve(loaded, images), expected, atol=ATOL, rtol=0)


@needs_tf
def test_a_bfloat16_run_exports(tmp_path):
  """configs/accelerator_best.py trains in bfloat16: its export had always failed the float32
  self-check (probabilities 2e-4 apart here, up to 5e-3 on a trained model), with a traceback."""
  config = config_lib.load_file(os.path.join(ROOT, "configs", "default.py"))
  config.compute_dtype = "bfloat16"
  classifier = _small_random_classifier(config)
  metadata = export.export(classifier, str(tmp_path / "bf16"), platforms=["cpu"])
  check = metadata["self_check"]
  assert check["atol"] == savedmodel.VERIFY_ATOL["bfloat16"]
  images = np.random.default_rng(2).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
  served = _serve(tf.saved_model.load(str(tmp_path / "bf16")), images)
  np.testing.assert_allclose(served, classifier.probabilities(images), atol=check["atol"], rtol=0)


@needs_tf
def test_output_is_never_clobbered(trained_tiny_workdir, tmp_path):
  classifier = inference.load(trained_tiny_workdir)
  output = tmp_path / "out"
  output.mkdir()
  (output / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty; pass --overwrite"):
    export.export(classifier, str(output))
  with pytest.raises(UserError, match="holds no fashion_jax export.*refusing"):
    export.export(classifier, str(output), overwrite=True)
  assert (output / "notes.txt").read_text() == "mine"
  with pytest.raises(UserError, match="--platforms=gpu is invalid"):
    export.export(classifier, str(tmp_path / "other"), platforms=["gpu"])

  # A previous export is replaced with --overwrite, and only then; files someone put beside
  # it (here and in a subfolder) are never deleted with it: refused until they are moved out.
  previous = tmp_path / "previous"
  export.export(classifier, str(previous), platforms=["cpu"])
  (previous / "notes.txt").write_text("mine")
  (previous / "variables" / "backup").write_text("mine too")
  with pytest.raises(UserError, match="not empty"):
    export.export(classifier, str(previous), platforms=["cpu"])
  with pytest.raises(UserError, match=r"files the export did not write \(notes.txt, "
                                      r"variables/backup\); refusing"):
    export.export(classifier, str(previous), platforms=["cpu"], overwrite=True)
  assert (previous / "notes.txt").read_text() == "mine"
  # An export written before the metadata listed its files: judged by its top-level names.
  metadata_path = previous / export.METADATA_NAME
  metadata = json.loads(metadata_path.read_text())
  del metadata["files"]
  metadata_path.write_text(json.dumps(metadata))
  with pytest.raises(UserError, match=r"did not write \(notes.txt\)"):
    export.export(classifier, str(previous), platforms=["cpu"], overwrite=True)
  (previous / "notes.txt").unlink()
  (previous / "variables" / "backup").unlink()
  export.export(classifier, str(previous), platforms=["cpu"], overwrite=True)
  assert json.loads(metadata_path.read_text())["files"] == [
      "README.md", "assets/class_names.txt", export.METADATA_NAME, "fingerprint.pb",
      "saved_model.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"]
  assert sorted(os.listdir(tmp_path)) == ["out", "previous"]  # No staging folders left behind.
  images = _tiny_test_images(trained_tiny_workdir)[:4, :, :, 0]
  np.testing.assert_allclose(_serve(tf.saved_model.load(str(previous)), images),
                             classifier.probabilities(images), atol=ATOL, rtol=0)


def _exported_step(folder):
  return json.loads((folder / export.METADATA_NAME).read_text())["step"]


@needs_tf
@pytest.mark.parametrize("where", ["a link", "a mount point"])
def test_output_through_a_link_or_on_a_mount_point(trained_tiny_workdir, tmp_path, monkeypatch,
                                                   where):
  """A link to the export folder (models/current -> v3, as model servers read): --overwrite had
  replaced the link by a folder, left v3 as it was and a stray link beside it; an empty linked
  folder failed after the export with a traceback. A mount point (a container's volume) cannot
  be renamed: it failed with "Device or resource busy". Both now take the export in place."""
  classifier = inference.load(trained_tiny_workdir)
  target = tmp_path / "v3"
  target.mkdir()
  if where == "a link":
    (tmp_path / "current").symlink_to("v3")
    output = tmp_path / "current"
  else:
    output = target
    (target / "lost+found").mkdir()  # An ext4 volume's root: not the export's, left alone.
    real_ismount = os.path.ismount
    monkeypatch.setattr(export.os.path, "ismount",
                        lambda p: os.path.realpath(p) == str(target) or real_ismount(p))
    real_rename = os.rename
    def rename(src, dst):  # What the kernel says when a mount point is renamed or replaced.
      if str(target) in (os.path.realpath(src), os.path.realpath(dst)):
        raise OSError(16, "Device or resource busy")
      return real_rename(src, dst)
    monkeypatch.setattr(export.os, "rename", rename)
  export.export(classifier, str(output), platforms=["cpu"])  # Into the empty folder.
  assert _exported_step(target) == classifier.step
  again = dataclasses.replace(classifier, step=classifier.step + 1000)
  export.export(again, str(output), platforms=["cpu"], overwrite=True)  # Replacing it.
  assert _exported_step(target) == classifier.step + 1000
  assert sorted(os.listdir(tmp_path)) == (["current", "v3"] if where == "a link" else ["v3"])
  assert (tmp_path / "current").is_symlink() if where == "a link" else True
  assert not [n for n in os.listdir(target) if n.startswith(".")]  # No staging left inside.
  assert (where == "a link") != (target / "lost+found").is_dir()
  images = _tiny_test_images(trained_tiny_workdir)[:4, :, :, 0]
  np.testing.assert_allclose(_serve(tf.saved_model.load(str(output)), images),
                             classifier.probabilities(images), atol=ATOL, rtol=0)


def test_an_output_another_user_could_write_is_refused(tmp_path, monkeypatch):
  """--output=/tmp/fj_savedmodel, where another user had made a link of that name to a folder of
  theirs (or that folder itself), or an --output in a folder every user may write: the export
  was staged there and loaded back from there to be checked (a SavedModel's graph runs with the
  exporter's rights), then left where the other user could change it before it was served.
  A folder of theirs above the --output in a sticky one is refused too (b1b22ad had passed it:
  whoever made /tmp/models first can rename /tmp/models/v1 away and put theirs), as is a `..`
  after their link (abspath dropped it textually, and the link was never looked at, where the
  kernel goes to the link's target's parent). /tmp itself (sticky) stays fine, relative paths
  too; FASHION_JAX_TRUST_WORKDIR=1 takes the user's word (a teammate's folder)."""
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  for folder, mode in (("sticky", 0o1777), ("open", 0o777), ("team", 0o755)):
    (tmp_path / folder).mkdir()
    os.chmod(tmp_path / folder, mode)
  sticky = tmp_path / "sticky"
  theirs, open_theirs, project = sticky / "theirs", sticky / "open_theirs", sticky / "projX"
  for folder in (theirs / "out", open_theirs, project / "models", tmp_path / "team" / "v1"):
    folder.mkdir(parents=True)
  os.chmod(open_theirs, 0o1777)  # Another user's, where everyone may put a folder.
  for folder in (project, project / "models"):  # A teammate's group folder (setgid, umask 002).
    os.chmod(folder, 0o2775)
  (sticky / "fj_savedmodel").symlink_to(theirs / "out")
  (sticky / "theirs_new").symlink_to(theirs / "new")  # A link to nothing yet.
  (sticky / "evil").symlink_to(tmp_path / "team" / "v1")  # evil/../out: team/out, not sticky/out.
  others = [theirs, theirs / "out", sticky / "fj_savedmodel", sticky / "theirs_new",
            sticky / "evil", open_theirs, project, project / "models"]
  if os.getuid() == 0:  # Another user's: as root the test can make them so.
    for path in others:
      os.lchown(path, 65534, 65534)
  else:  # Else seen as another user's.
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
      info = real_lstat(path, *args, **kwargs)
      if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) in map(str, others):
        info = os.stat_result((*info[:4], 65534, *info[5:]))
      return info
    monkeypatch.setattr(os, "lstat", lstat)
  refused = [(sticky / "fj_savedmodel", f"{sticky / 'fj_savedmodel'} is a link another user "
              f"(uid 65534) made in {sticky}"),
             (sticky / "fj_savedmodel" / "model", "is a link another user"),
             (sticky / "theirs_new", "is a link another user"),
             (f"{sticky}/evil/../out", f"{sticky / 'evil'} is a link another user (uid 65534)"),
             (f"{sticky}/evil/../../sticky/mine", f"{sticky / 'evil'} is a link another user"),
             (theirs, f"{theirs} belongs to another user (uid 65534) in {sticky}"),
             (theirs / "out" / "model", f"{theirs} belongs to another user (uid 65534)"),
             (theirs / "new", f"{theirs} belongs to another user (uid 65534)"),
             (open_theirs / "model", f"{open_theirs} belongs to another user (uid 65534) in "
              f"{sticky}, a folder every user may write"),
             (project / "models" / "v3", f"{project} belongs to another user (uid 65534) in "
              f"{sticky}, a folder every user may write"),
             (project / "models", f"{project} belongs to another user"),
             (tmp_path / "open" / "model", f"the folder {tmp_path / 'open'} is writable by "
              "every user"),
             (tmp_path / "open", f"the folder {tmp_path / 'open'} is writable")]
  for output, says in refused:
    with pytest.raises(UserError, match=f"^--output '{re.escape(str(output))}' is not written: "
                       f".*{re.escape(says)}.*pass an --output in a folder of your own, or set "
                       "FASHION_JAX_TRUST_WORKDIR=1 if you trust the folder's owner .*emptyDir") \
        as caught:
      export_folder.check_output(str(output), overwrite=False)
    assert "\n" not in str(caught.value)
  monkeypatch.chdir(sticky)  # Relative: as the kernel finds them from the current folder.
  for output, says in (("evil/../out", f"{sticky / 'evil'} is a link another user"),
                       ("./fj_savedmodel", "is a link another user"),
                       ("projX/models/v3", f"{project} belongs to another user")):
    with pytest.raises(UserError, match=f"^--output '{re.escape(output)}' is not written: "
                       f".*{re.escape(says)}"):
      export_folder.check_output(output, overwrite=False)
  for output, resolved in (("mine", sticky / "mine"), ("../team/model", tmp_path / "team" /
                                                        "model"), ("./new/../mine", sticky / "mine")):
    assert export_folder.check_output(output, overwrite=False) == str(resolved)
  for output in (sticky / "mine", tmp_path / "team" / "model", f"{tmp_path}/team/v1/../out"):
    assert export_folder.check_output(str(output), overwrite=False) == os.path.abspath(output)
  monkeypatch.setenv("FASHION_JAX_TRUST_WORKDIR", "1")  # A teammate's folder the user trusts.
  for output, _ in refused[:5] + refused[6:]:  # (Not theirs: a folder not empty.)
    assert export_folder.check_output(str(output), overwrite=False) == os.path.realpath(
        os.path.abspath(output))


@pytest.mark.skipif(os.getuid() != 0, reason="makes folders of other users and becomes one")
def test_a_teammates_group_folder_on_a_sticky_scratch_is_refused_unless_trusted(monkeypatch):
  """The common HPC layout: /scratch (1777) holding projX, a teammate's folder (uid 1001) their
  group may write (2775). b1b22ad let a member of the group (uid 1002) export to
  projX/models/v3; but whoever made projX first (not necessarily a teammate: /tmp/models made by
  anyone, shared with a group or an ACL) can rename v3 away and put their own SavedModel there
  before it is loaded back or served. Refused, as the workdir checks refuse it, naming
  FASHION_JAX_TRUST_WORKDIR=1, which takes it. Run as that user, for real."""
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  top = tempfile.mkdtemp(dir="/tmp")  # (Not pytest's tmp_path: only root may enter it.)
  try:
    os.chmod(top, 0o755)
    scratch, project = os.path.join(top, "scratch"), os.path.join(top, "scratch", "projX")
    os.makedirs(os.path.join(project, "models"))
    os.chmod(scratch, 0o1777)
    for folder in (project, os.path.join(project, "models")):
      os.chown(folder, 1001, 1500)
      os.chmod(folder, 0o2775)
    output = os.path.join(project, "models", "v3")
    for trust in ("0", "1"):
      said = subprocess.run(  # Imported as root (its Python is in /root), then that user.
          [sys.executable, "-c", "import os, sys\n"
           "from fashion_jax.serving import export_folder\n"
           "from fashion_jax.support.errors import UserError\n"
           "os.setgroups([1500]); os.setgid(1500); os.setuid(1002)\n"
           "try:\n  print(export_folder.check_output(sys.argv[1], False))\n"
           "except UserError as e:\n  sys.exit(str(e))", output],
          cwd=ROOT, capture_output=True, text=True, check=False,
          env={**os.environ, "FASHION_JAX_TRUST_WORKDIR": trust})
      if trust == "1":
        assert (said.returncode, said.stdout) == (0, output + "\n"), said.stderr[-2000:]
      else:
        assert said.returncode == 1 and said.stderr == (
            f"--output {output!r} is not written: {project} belongs to another user (uid 1001) "
            f"in {scratch}, a folder every user may write, so another user could change the "
            "export there before it is loaded back to be checked (a SavedModel's graph runs "
            "with your rights) or served; pass an --output in a folder of your own, or set "
            "FASHION_JAX_TRUST_WORKDIR=1 if you trust the folder's owner (a teammate's group "
            "folder on a shared /scratch, a container's bind mount) or it is a mount that shows "
            "every folder as 0777 or as another user's (WSL's /mnt/c, CIFS, a Kubernetes "
            "emptyDir)\n"), said.stderr[-2000:]
  finally:
    shutil.rmtree(top)


def test_a_failed_swap_inside_the_folder_puts_the_old_export_back(tmp_path, monkeypatch):
  folder, staging = tmp_path / "out", tmp_path / "out" / ".fashion_jax-export-1"
  staging.mkdir(parents=True)
  for name, text in (("a", "old a"), ("b", "old b")):
    (folder / name).write_text(text)
  for name in ("a", "b", "c"):
    (staging / name).write_text("new " + name)
  real_rename, calls = os.rename, []
  def failing_third_move_in(src, dst):
    if os.path.dirname(src) == str(staging):
      calls.append(src)
      if len(calls) == 3:
        raise OSError(28, "No space left on device")
    return real_rename(src, dst)
  monkeypatch.setattr(export.os, "rename", failing_third_move_in)
  with pytest.raises(OSError):
    export_folder._swap_contents(str(staging), str(folder))  # pylint: disable=protected-access
  assert {n: (folder / n).read_text() for n in ("a", "b")} == {"a": "old a", "b": "old b"}
  assert sorted(os.listdir(folder)) == sorted(["a", "b", staging.name])
  assert sorted(os.listdir(staging)) == ["a", "b", "c"]


def test_a_swap_inside_the_folder_sweeps_what_a_killed_one_set_aside(tmp_path):
  """On a mount point the old export is set aside inside --output: a swap killed half-way left
  `.fashion_jax-old-*` there for good (only the staging prefix was swept). Swept once the next
  export is in, when over STALE_S old; a recent one (an export running beside) is kept."""
  folder, staging = tmp_path / "out", tmp_path / "out" / ".fashion_jax-export-1"
  staging.mkdir(parents=True)
  (folder / "a").write_text("old a")
  (staging / "a").write_text("new a")
  stale, recent = folder / ".fashion_jax-old-killed", folder / ".fashion_jax-old-running"
  for leftover in (stale, recent):
    leftover.mkdir()
    (leftover / "b").write_text("old b")
  old = time.time() - export_folder.STALE_S - 1
  os.utime(stale, (old, old))
  export_folder._swap_contents(str(staging), str(folder))  # pylint: disable=protected-access
  assert sorted(os.listdir(folder)) == sorted(["a", recent.name]) and (folder / "a").read_text() == "new a"


@needs_tf
def test_sigterm_leaves_no_staging_folder_and_the_output_whole(trained_tiny_workdir, tmp_path):
  """SIGTERM (`timeout`, a scheduler) while the export is staged: one line, exit 143, nothing
  left (Python's default left the hidden staging folder beside --output); while it is moved in:
  the move finishes first (stopped halfway, --output was empty). A staging folder a killed
  export left an hour ago is removed; a recent one (an export running beside) is not."""
  stale, recent = tmp_path / ".out.export-stale", tmp_path / ".out.export-recent"
  for folder in (stale, recent):
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"half")
  os.utime(stale, (0, 0))
  args = (f"--workdir={trained_tiny_workdir}", f"--output={tmp_path / 'out'}", "--platforms=cpu")
  (tmp_path / "tmp").mkdir()
  proc = run_module("fashion_jax.export", *args,
                    env={**os.environ, "FASHION_JAX_SIGNAL_AT": "export_saved",
                         "TMPDIR": str(tmp_path / "tmp")})
  assert proc.returncode == 143, proc.stderr[-2000:]
  # Nor its other temporary folder (TensorFlow's autograph leaves files of its own there).
  assert [n for n in os.listdir(tmp_path / "tmp") if not n.startswith("__autograph")] == []
  shutil.rmtree(tmp_path / "tmp")
  assert [l for l in proc.stderr.splitlines() if l.startswith("fashion_jax: error: ")] == [
      "fashion_jax: error: stopped by SIGTERM before the export was in place; --output is as it "
      "was: run the export again"]
  assert sorted(os.listdir(tmp_path)) == [recent.name]
  proc = run_module("fashion_jax.export", *args,
                    env={**os.environ, "FASHION_JAX_SIGNAL_AT": "export_moving"})
  assert proc.returncode == -15, proc.stderr[-2000:]  # Ended by the signal, once the move was done.
  assert sorted(os.listdir(tmp_path)) == [recent.name, "out"]
  metadata = json.loads((tmp_path / "out" / export.METADATA_NAME).read_text())
  assert export_folder.relative_files(str(tmp_path / "out")) == metadata["files"]


def test_cli_missing_workdir(tmp_path):
  proc = run_module("fashion_jax.export", f"--workdir={tmp_path / 'nope'}",
                    f"--output={tmp_path / 'out'}")
  assert_one_line_error(proc, "does not exist", "--workdir")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given, says", [
    ((), "--workdir and --output are required: pass --workdir=DIR --output=FOLDER"),
    (("--output=x",), "--workdir is required: pass --workdir=DIR")])
def test_cli_required_flags_not_given_are_named(given, says):
  """absl's words were the line: "flag --workdir=None: Flag --workdir must have a value other
  than None. flag --output=None: Flag --output must have a value other than None." """
  proc = run_module("fashion_jax.export", *given)
  assert_one_line_error(proc, says)
  assert "None" not in proc.stderr


def test_an_output_below_a_file_is_refused_before_the_conversion(trained_tiny_workdir, tmp_path):
  """--output=photo.png/model: after the model was converted, "cannot write to 'photo.png'
  (File exists)"."""
  (tmp_path / "photo.png").write_bytes(b"a file")
  with pytest.raises(UserError, match=re.escape(
      f"--output '{tmp_path / 'photo.png' / 'model'}' cannot be made: '{tmp_path / 'photo.png'}' "
      "is a file, not a folder; pass an --output in a folder")):
    export_folder.check_output(str(tmp_path / "photo.png" / "model"), overwrite=False)
  assert (tmp_path / "photo.png").read_bytes() == b"a file"


def test_cli_existing_output(trained_tiny_workdir, tmp_path):
  output = tmp_path / "out"
  output.mkdir()
  (output / "saved_model.pb").write_bytes(b"someone else's")
  proc = run_module("fashion_jax.export", f"--workdir={trained_tiny_workdir}", f"--output={output}")
  assert_one_line_error(proc, "is not empty", "--overwrite")
  assert (output / "saved_model.pb").read_bytes() == b"someone else's"


@pytest.mark.skipif(tf is not None, reason="TensorFlow is installed here")
def test_cli_without_tensorflow_is_one_line(trained_tiny_workdir, tmp_path):
  proc = run_module("fashion_jax.export", f"--workdir={trained_tiny_workdir}",
                    f"--output={tmp_path / 'out'}")
  assert_one_line_error(proc, "export needs TensorFlow", "pip install 'fashion_jax[tf]'")
  assert not (tmp_path / "out").exists()
