"""fashion_jax.evaluate: hand-checked metrics, the report files, training's accuracy, the errors."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from fashion_jax.data import idx
from fashion_jax.serving import evaluate
from fashion_jax.serving import inference
from fashion_jax.support import paths
from fashion_jax.support.errors import UserError
from tests.conftest import make_images
from tests.conftest import assert_one_line_error
from tests.conftest import run_module
from tests.conftest import run_module_noting_jax
from tests.conftest import write_idx_folder

JSON_KEYS = {"model", "workdir", "checkpoint", "data", "counts", "accuracy", "loss", "class_names",
             "per_class", "macro_avg", "confusion_matrix", "confusion_matrix_axes",
             "top_confusions", "most_confident_mistakes", "training_eval",
             "matches_training_eval", "files", "seconds", "eval_batch_size",
             "fashion_jax_version"}


def _metrics_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _logged_eval_accuracy(workdir, step):
  found = [r["eval_accuracy"] for r in _metrics_lines(workdir)
           if r["step"] == step and "eval_accuracy" in r]
  assert found, f"training logged no eval at step {step}"
  return found[-1]


def _check_png(path, min_side=300):
  with Image.open(path) as image:
    image.verify()  # A complete, uncorrupted PNG.
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert min(image.size) >= min_side, image.size
    assert max(image.size) <= 4000, image.size
    return image.size


def _check_consistent(result):
  """Everything in the JSON agrees with its own confusion matrix."""
  confusion = np.array(result["confusion_matrix"])
  k = len(result["class_names"])
  assert confusion.shape == (k, k)
  assert confusion.sum() == result["counts"]["examples"] == result["data"]["count"]
  assert np.trace(confusion) == result["counts"]["correct"]
  assert result["counts"]["errors"] == confusion.sum() - np.trace(confusion)
  assert result["accuracy"] == np.trace(confusion) / confusion.sum()
  for c in result["per_class"]:
    i = c["index"]
    assert c["name"] == result["class_names"][i]
    assert c["support"] == confusion[i].sum()
    assert c["predicted"] == confusion[:, i].sum()
    if c["predicted"]:
      assert c["precision"] == pytest.approx(confusion[i, i] / confusion[:, i].sum())
    if c["support"]:
      assert c["recall"] == pytest.approx(confusion[i, i] / confusion[i].sum())
    p, r = c["precision"], c["recall"]
    assert c["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
  assert result["macro_avg"]["support"] == confusion.sum()


def test_metrics_on_a_hand_checked_case():
  # Class 3 never occurs and is never predicted: all zeros, and left out of the macro average.
  labels = np.array([0, 0, 0, 1, 1, 2])
  predictions = np.array([0, 0, 1, 1, 2, 2])
  confusion = evaluate.confusion_matrix(labels, predictions, 4)
  np.testing.assert_array_equal(confusion, [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
  m = evaluate.metrics_from_confusion(confusion)
  assert m["accuracy"] == 4 / 6 and m["correct"] == 4 and m["count"] == 6
  np.testing.assert_allclose(m["precision"], [1.0, 0.5, 0.5, 0.0])
  np.testing.assert_allclose(m["recall"], [2 / 3, 0.5, 1.0, 0.0])
  np.testing.assert_allclose(m["f1"], [0.8, 0.5, 2 / 3, 0.0])
  np.testing.assert_array_equal(m["support"], [3, 2, 1, 0])
  np.testing.assert_array_equal(m["predicted"], [2, 2, 2, 0])
  assert m["macro_avg"]["classes"] == 3
  assert m["macro_avg"]["precision"] == pytest.approx(2 / 3)
  assert m["macro_avg"]["recall"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
  assert m["macro_avg"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert evaluate.top_confusions(confusion, ["a", "b", "c", "d"]) == [
      {"true": "a", "predicted": "b", "count": 1, "fraction_of_true": 1 / 3},
      {"true": "b", "predicted": "c", "count": 1, "fraction_of_true": 0.5}]
  # log(1 + 3) - 0 and log(1 + 3) - log(3).
  losses = evaluate.cross_entropy(np.array([[0.0, np.log(3.0)]] * 2), np.array([0, 1]))
  np.testing.assert_allclose(losses, [np.log(4.0), np.log(4.0 / 3.0)])
  with pytest.raises(ValueError, match="labels must lie in"):
    evaluate.confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)


def test_evaluate_writes_report_in_workdir(trained_tiny_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_tiny_workdir, workdir)  # The default output_dir is inside the workdir.
  result = evaluate.evaluate(workdir)

  output_dir = os.path.join(workdir, "evaluation")
  with open(os.path.join(output_dir, "evaluation.json")) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  assert JSON_KEYS <= set(written)
  _check_consistent(written)
  assert written["data"] == {"type": "idx", "idx_dir": os.path.join(os.path.dirname(
      trained_tiny_workdir), "idx"), "from": "config.json", "split": "test", "count": 100}
  assert written["checkpoint"]["why"].startswith("best validation accuracy")
  step = written["checkpoint"]["step"]
  assert written["accuracy"] == _logged_eval_accuracy(workdir, step)
  assert written["matches_training_eval"] is True
  assert written["loss"] == pytest.approx(written["training_eval"]["eval_loss"], rel=1e-4)
  assert written["class_names"][0] == "T-shirt/top" and len(written["per_class"]) == 10
  for name in ("confusion_matrix", "mistakes"):
    assert written["files"][name].startswith(output_dir)
    _check_png(written["files"][name], min_side=150)

  text = evaluate.format_report(written)
  assert "precision" in text and "Ankle boot" in text and "macro avg" in text
  assert f"accuracy {100 * written['accuracy']:.2f}%" in text
  assert f"test set: 100 images from IDX {written['data']['idx_dir']} (via config.json)" in text
  from_env = {**written, "data": {"description": "IDX folder /d ($FASHION_JAX_IDX_DIR)",
                                  "from": "$FASHION_JAX_IDX_DIR", "count": 100}}
  assert "from IDX folder /d ($FASHION_JAX_IDX_DIR)\n" in evaluate.format_report(from_env)


def _shuffled_label_folder(folder, n=60, seed=3):
  """IDX test files whose labels disagree with the images: a model trained on them errs."""
  os.makedirs(folder)
  rng = np.random.default_rng(seed)
  shown = rng.integers(0, 10, size=n).astype(np.uint8)
  labels = ((shown + 1 + rng.integers(0, 9, size=n)) % 10).astype(np.uint8)  # Never `shown`.
  images_name, labels_name = idx.FILES["test"]
  idx.write_idx(os.path.join(folder, images_name), make_images(shown, seed))
  idx.write_idx(os.path.join(folder, labels_name), labels)
  return folder


def test_cli_with_overrides_draws_mistakes(trained_tiny_workdir, tmp_path):
  data = _shuffled_label_folder(str(tmp_path / "shuffled"))
  output_dir = tmp_path / "report"
  proc = run_module("fashion_jax.evaluate", f"--workdir={trained_tiny_workdir}",
                    f"--output_dir={output_dir}", "--step=10", f"--idx_dir={data}",
                    "--num_mistakes=8")
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name in ("T-shirt/top", "Ankle boot", "macro avg", "accuracy", "checkpoint step 10"):
    assert name in proc.stdout, proc.stdout
  result = json.loads((output_dir / "evaluation.json").read_text())
  _check_consistent(result)
  assert result["checkpoint"] == {**result["checkpoint"], "step": 10,
                                  "why": "requested with --step"}
  assert result["data"]["from"] == "--idx_dir" and result["data"]["count"] == 60
  assert result["counts"]["errors"] > 8  # The model reads the bars; the labels say otherwise.
  mistakes = result["most_confident_mistakes"]
  assert len(mistakes) == 8
  assert all(m["true"] != m["predicted"] for m in mistakes)
  confidences = [m["confidence"] for m in mistakes]
  assert confidences == sorted(confidences, reverse=True)
  # A different test set than training evaluated on: reported, not hidden.
  assert result["matches_training_eval"] is False
  width, height = _check_png(output_dir / "mistakes.png")
  assert width > 800 and height > 300  # Two rows of five tiles, not the empty placeholder.
  _check_png(output_dir / "confusion_matrix.png", min_side=500)
  assert not os.path.exists(os.path.join(trained_tiny_workdir, "evaluation"))
  assert sorted(os.listdir(output_dir)) == ["confusion_matrix.png", "evaluation.json",
                                            "mistakes.png"]  # Nothing left of the drawing.


@pytest.mark.parametrize("where", ["drawing", "writing evaluation.json"])
def test_an_interrupted_evaluation_leaves_the_previous_report_whole(trained_tiny_workdir,
                                                                     tmp_path, monkeypatch, where):
  """The figures were written one by one into --output_dir: Ctrl-C while drawing the second
  left a new confusion matrix beside the previous evaluation.json and mistakes.png; and then,
  the new figures moved in, the JSON written last: Ctrl-C (or a full disk) there left them
  beside the previous run's evaluation.json (found by a review)."""
  from fashion_jax.serving import report  # pylint: disable=import-outside-toplevel
  output_dir = tmp_path / "report"
  evaluate.evaluate(trained_tiny_workdir, str(output_dir), step=20)
  before = {name: (output_dir / name).read_bytes() for name in os.listdir(output_dir)}
  assert sorted(before) == sorted([evaluate.CONFUSION_NAME, evaluate.MISTAKES_NAME,
                                   evaluate.JSON_NAME])

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  if where == "drawing":
    monkeypatch.setattr(report, "plot_mistakes", interrupted)
  else:
    monkeypatch.setattr(evaluate.storage, "write_text", interrupted)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(trained_tiny_workdir, str(output_dir), step=10)
  assert {name: (output_dir / name).read_bytes() for name in os.listdir(output_dir)} == before


def test_a_killed_evaluations_hidden_folder_is_removed_once_stale(trained_tiny_workdir, tmp_path):
  """An evaluate killed while drawing its figures (SIGKILL, a crash) left its hidden staging
  folder in --output_dir, and nothing ever removed it. The next evaluation there removes one
  unchanged for an hour (export's rule); a newer one may be another evaluation's, drawing now."""
  import time  # pylint: disable=import-outside-toplevel
  output_dir = tmp_path / "report"
  stale, fresh = (output_dir / f"{evaluate.STAGING_PREFIX}{n}" for n in ("killed", "drawing"))
  for folder in (stale, fresh):
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "confusion_matrix.png").write_bytes(b"half")
  old = time.time() - 2 * 3600
  os.utime(stale, (old, old))
  evaluate.evaluate(trained_tiny_workdir, str(output_dir), step=20)
  assert sorted(os.listdir(output_dir)) == sorted(
      [fresh.name, evaluate.CONFUSION_NAME, evaluate.MISTAKES_NAME, evaluate.JSON_NAME])
  assert (fresh / "sub" / "confusion_matrix.png").read_bytes() == b"half"


def test_no_mistakes_drawn_is_not_no_mistakes(trained_tiny_workdir, tmp_path, monkeypatch):
  """--num_mistakes=0: mistakes.png said 'no misclassified test images' under its title's
  '0 of 4,913 errors'."""
  from fashion_jax.serving import report  # pylint: disable=import-outside-toplevel
  figures, new_figure = [], report._new_figure  # pylint: disable=protected-access
  monkeypatch.setattr(report, "_new_figure", lambda *a: figures.append(new_figure(*a)) or
                      figures[-1])
  labels = np.zeros(3, np.int64)
  report.plot_mistakes(np.zeros((0, 28, 28)), labels[:0], labels[:0], labels[:0], labels[:0],
                       ["a"], title="t", path=str(tmp_path / "perfect.png"))
  folder = write_idx_folder(str(tmp_path / "idx"))
  labels_file = os.path.join(folder, idx.FILES["test"][1] + ".gz")
  idx.write_idx(labels_file, (idx.read_idx(labels_file) + 1) % 10)  # Every image mislabelled.
  result = evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), idx_dir=folder,
                             num_mistakes=0)
  assert result["counts"]["errors"] > 0
  texts = [[t.get_text() for t in figure.texts] for figure in (figures[0], figures[-1])]
  assert "no misclassified test images" in texts[0]  # A perfect model's.
  assert "none drawn (--num_mistakes=0)" in texts[1]
  assert "no misclassified test images" not in texts[1]


@pytest.mark.real_data
def test_cli_on_real_run_matches_training_eval(trained_real_workdir, tmp_path):
  output_dir = tmp_path / "real_report"
  proc = run_module("fashion_jax.evaluate", f"--workdir={trained_real_workdir}",
                    f"--output_dir={output_dir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads((output_dir / "evaluation.json").read_text())
  _check_consistent(result)
  step = result["checkpoint"]["step"]
  assert result["accuracy"] == _logged_eval_accuracy(trained_real_workdir, step)
  assert result["accuracy"] > 0.85
  assert result["counts"]["examples"] == 10_000
  assert [c["support"] for c in result["per_class"]] == [1000] * 10
  assert result["counts"]["errors"] >= 25 and len(result["most_confident_mistakes"]) == 25
  assert "(same)" in proc.stdout and "Shirt" in proc.stdout
  _check_png(output_dir / "confusion_matrix.png", min_side=600)
  _check_png(output_dir / "mistakes.png", min_side=800)


def test_cli_missing_workdir(tmp_path):
  proc = run_module("fashion_jax.evaluate", f"--workdir={tmp_path / 'nope'}")
  assert_one_line_error(proc, "does not exist", "--workdir")


def test_flag_mistakes_are_said_before_jax_starts(tmp_path):
  """The command imported JAX first (its --help took 2.6 s); its flags are checked before, a
  missing run after (the probe sees JAX there)."""
  for flag, imported, says in [("--step=x", False, "--step=x is invalid"),
                               ("--num_mistakes=101", False, "--num_mistakes=101 is invalid"),
                               ("--num_mistakes=3", True, "does not exist")]:
    proc, jax_imported = run_module_noting_jax("fashion_jax.evaluate",
                                               f"--workdir={tmp_path / 'nope'}", flag)
    assert proc.returncode == 2 and jax_imported == imported, (flag, proc.stderr[-2000:])
    assert says in proc.stderr and "Traceback" not in proc.stderr, (flag, proc.stderr[-2000:])
  proc, jax_imported = run_module_noting_jax("fashion_jax.evaluate", "--help")
  assert proc.returncode == 0 and not jax_imported and "--num_mistakes" in proc.stdout


def test_cli_a_step_of_the_wrong_type_says_what_it_takes(tmp_path):
  """absl's words were the line: "flag --step=20.0: invalid literal for int() with base 10:
  '20.0'" (a --config.KEY's were put as what it takes, another flag's not)."""
  proc = run_module("fashion_jax.evaluate", f"--workdir={tmp_path}", "--step=20.0")
  assert_one_line_error(proc, "--step=20.0 is invalid: --step takes a whole number")
  assert "literal" not in proc.stderr


def test_cli_a_checkpoint_flag_is_answered_with_step(tmp_path):
  """--checkpoint=PATH (as other tools take one) was "Unknown command line flag 'checkpoint'",
  nothing said of --step, which picks one."""
  proc = run_module("fashion_jax.evaluate", f"--workdir={tmp_path}",
                    f"--checkpoint={tmp_path / 'checkpoints' / '20'}")
  assert_one_line_error(proc, "unknown flag --checkpoint: a checkpoint is picked by its step, "
                        "--step=N (the number of its folder in WORKDIR/checkpoints")


def _config_only(trained_workdir, folder):
  """A workdir holding only a run's config.json: training never got to a checkpoint."""
  folder.mkdir()
  shutil.copy(os.path.join(trained_workdir, "config.json"), folder)
  return folder


def test_cli_no_checkpoint(trained_tiny_workdir, tmp_path):
  workdir = _config_only(trained_tiny_workdir, tmp_path / "untrained")
  (workdir / "checkpoints").mkdir()
  proc = run_module("fashion_jax.evaluate", f"--workdir={workdir}")
  assert_one_line_error(proc, "no checkpoint", "train first")


def test_user_errors(trained_tiny_workdir, tmp_path):
  workdir = _config_only(trained_tiny_workdir, tmp_path / "no_checkpoints")
  with pytest.raises(UserError, match="no checkpoints folder"):
    evaluate.evaluate(str(workdir))
  with pytest.raises(UserError, match="no checkpoint at step 7.*available: 10, 20"):
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), step=7)
  with pytest.raises(UserError, match="not both"):
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), idx_dir="a", data_dir="b")
  with pytest.raises(UserError, match=r"--num_mistakes=101 is invalid; pass 0 to 100"):
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), num_mistakes=101)
  with pytest.raises(UserError, match="'/no/such/folder' .from --idx_dir. does not exist"):
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), idx_dir="/no/such/folder")
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(UserError, match="a_file' .from --idx_dir. is a file, not a folder"):
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), idx_dir=str(tmp_path / "a_file"))
  assert not (tmp_path / "out").exists()  # No data, no report: no empty folder left for one.

  # A run trained with a relative idx_dir, evaluated from elsewhere: say to pass --idx_dir.
  relative = tmp_path / "relative"
  shutil.copytree(trained_tiny_workdir, relative)
  config = json.loads((relative / "config.json").read_text())
  config["idx_dir"] = "some/relative/idx"
  (relative / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="relative to the current directory.*pass --idx_dir"):
    evaluate.evaluate(str(relative))


def test_a_report_it_cannot_put_in_place_is_one_line(trained_tiny_workdir, tmp_path):
  """A folder where a figure goes (or another user's file in a shared /tmp) had been a traceback
  from the final rename."""
  out = tmp_path / "out"
  os.makedirs(out / evaluate.CONFUSION_NAME)
  with pytest.raises(UserError, match=r"^cannot write the report into .*out \(Is a directory: "
                     r".*confusion_matrix.png\); move that away or pass another --output_dir$"):
    evaluate.evaluate(trained_tiny_workdir, str(out))
  assert sorted(os.listdir(out)) == [evaluate.CONFUSION_NAME]  # Nothing half-written beside it.


def test_without_matplotlib_evaluate_names_the_extra(trained_tiny_workdir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # As without the `serve` extra.
  with pytest.raises(UserError, match=r"needs matplotlib.*fashion_jax\[serve\]"):
    evaluate.evaluate(trained_tiny_workdir, output_dir=str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")  # Checked before anything is written.


def test_offline_data_errors_name_this_commands_flag(trained_tiny_workdir, tmp_path, monkeypatch):
  """The data layer's offline hint names training's --config.idx_dir; evaluate has --idx_dir
  (a user followed the hint and got "Unknown command line flag")."""
  from fashion_jax.data import download, input_pipeline  # pylint: disable=import-outside-toplevel

  def offline(config, split, where=None):
    os.makedirs(config.data_dir, exist_ok=True)  # As tfds and the project's lock beside it do.
    with open(os.path.join(config.data_dir, ".fashion_jax-tfds-fashion_mnist.lock"), "w"):
      pass
    raise UserError(f"cannot download fashion_mnist: no network; {download.OFFLINE_HINT}")

  monkeypatch.setattr(input_pipeline, "load", offline)
  with pytest.raises(UserError) as e:
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"),
                      data_dir=str(tmp_path / "new" / "tfds"))
  assert "pass --idx_dir=FOLDER holding the IDX test files" in str(e.value)
  assert "--config." not in str(e.value)
  # $FASHION_JAX_IDX_DIR is not read when --data_dir is given: not suggested; and the folders the
  # failed attempt made are gone again (they were left behind, holding a lock file).
  assert "FASHION_JAX_IDX_DIR" not in str(e.value)
  assert sorted(os.listdir(tmp_path)) == []
  with pytest.raises(UserError) as e:  # A --data_dir that was there stays.
    evaluate.evaluate(trained_tiny_workdir, str(tmp_path / "out"), data_dir=str(tmp_path))
  assert os.listdir(tmp_path) == [".fashion_jax-tfds-fashion_mnist.lock"]


def test_a_run_trained_from_the_variable_is_evaluated_without_it(trained_tiny_workdir, tmp_path,
                                                                 monkeypatch, capsys):
  """A run whose data came from $FASHION_JAX_IDX_DIR, evaluated in a shell without it: the IDX
  folder training recorded in config.json is read (it tried tfds or the download instead, and
  offline failed), where it is safe to read; else the error as before."""
  from fashion_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  workdir, data = tmp_path / "run", tmp_path / "data"
  shutil.copytree(trained_tiny_workdir, workdir)
  shutil.copytree(os.path.join(os.path.dirname(trained_tiny_workdir), "idx"), data)
  config = json.loads((workdir / "config.json").read_text())
  config["idx_dir"] = ""  # As training records a run given the variable.
  config["_derived"]["data_source"] = f"IDX folder {data} ($FASHION_JAX_IDX_DIR)"
  (workdir / "config.json").write_text(json.dumps(config))
  monkeypatch.delenv(input_pipeline.IDX_ENV, raising=False)

  def no_other_source(config, real=input_pipeline.source):
    if config.idx_dir:  # (How input_pipeline.load reads a given folder.)
      return real(config)
    raise UserError("tfds or the download: no network here")
  monkeypatch.setattr(input_pipeline, "source", no_other_source)
  result = evaluate.evaluate(str(workdir), str(tmp_path / "out"))
  assert result["data"]["idx_dir"] == str(data) and result["data"]["count"] == 100
  assert result["data"]["from"] == "config.json's _derived.data_source"
  assert result["matches_training_eval"] is True
  assert capsys.readouterr().err == (
      f"fashion_jax: $FASHION_JAX_IDX_DIR is not set: reading the test set from {data}, the IDX "
      "folder training read (config.json records it)\n")
  assert f"from IDX {data} (via config.json's _derived.data_source)\n" in (
      evaluate.format_report(result))

  capsys.readouterr()
  # Another user could have written the data (a group's or everyone's folder, a file in it,
  # another user's folder): not read, and the line says why.
  a_file = sorted(data.iterdir())[0]
  import grp  # pylint: disable=import-outside-toplevel
  a_file, root = sorted(data.iterdir())[0], os.getuid() == 0
  planted = tmp_path / "theirs"  # A file another user can replace, linked from the data folder.
  planted.mkdir()
  shutil.copy(a_file, planted / a_file.name)
  try:
    group = grp.getgrgid(1234).gr_name
  except KeyError:
    group = "1234"

  def link_to_theirs():
    os.rename(a_file, str(a_file) + ".kept")
    a_file.symlink_to(planted / a_file.name)
    os.chown(planted, 1234, -1)

  def unlink_theirs():
    a_file.unlink()
    os.rename(str(a_file) + ".kept", a_file)

  for change, undo, named, why, needs_root in [
      (lambda: os.chmod(data, 0o777), lambda: os.chmod(data, 0o755), data,
       "is writable by every user", False),
      (lambda: os.chmod(a_file, 0o666), lambda: os.chmod(a_file, 0o644), a_file,
       "is writable by every user", False),
      (lambda: (os.chown(data, -1, 1234), os.chmod(data, 0o775)),
       lambda: (os.chown(data, -1, os.getgid()), os.chmod(data, 0o755)), data,
       f"is writable by the group {group}", True),
      (lambda: os.chown(data, 1234, -1), lambda: os.chown(data, os.getuid(), -1), data,
       "belongs to another user (uid 1234)", True),
      (link_to_theirs, unlink_theirs, planted, "belongs to another user (uid 1234)", True)]:
    if needs_root and not root:
      continue  # (Only root can give a folder away.)
    change()
    with pytest.raises(UserError, match="no network here"):
      evaluate.evaluate(str(workdir), str(tmp_path / "out"))
    undo()
    said = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fashion_jax: ")]
    assert said == [f"fashion_jax: not reading the IDX folder training read: {named} {why}"]
  if paths._own_group(os.getgid()):  # pylint: disable=protected-access
    os.chmod(data, 0o775)  # The user's own group (Debian's and Ubuntu's umask 002): read.
    os.chmod(a_file, 0o664)
    assert inference.recorded_idx_folder(str(workdir)) == (str(data), None)
    os.chmod(data, 0o755)
  # Links: read resolved (once: where they lead is what was checked); one another user owns, or
  # a hop through one (they could point it elsewhere between the check and the read), refused;
  # a link in the folder to nothing yet, refused (they could make its target).
  other = tmp_path / "mallory"
  other.mkdir()
  (other / "fm").symlink_to(data)
  (other / "hop").symlink_to(planted / a_file.name)
  config["_derived"]["data_source"] = f"IDX folder {other / 'fm'} ($FASHION_JAX_IDX_DIR)"
  (workdir / "config.json").write_text(json.dumps(config))
  assert inference.recorded_idx_folder(str(workdir)) == (str(data), None)
  if root:
    os.lchown(other / "fm", 1234, -1)
    assert inference.recorded_idx_folder(str(workdir)) == (
        None, f"{other / 'fm'} belongs to another user (uid 1234)")
    os.lchown(other / "fm", 0, -1)
    os.chown(other, 1234, -1)  # Their folder: they can replace the link itself.
    assert inference.recorded_idx_folder(str(workdir)) == (
        None, f"{other} belongs to another user (uid 1234)")
    os.chown(other, 0, -1)
    os.chown(planted, 0, -1)
  raw = data / a_file.name[:-len(".gz")]  # (Read before the .gz where both are there.)
  raw.symlink_to(tmp_path / "later")
  config["_derived"]["data_source"] = f"IDX folder {data} ($FASHION_JAX_IDX_DIR)"
  (workdir / "config.json").write_text(json.dumps(config))
  assert inference.recorded_idx_folder(str(workdir)) == (
      None, f"{raw} is a link to {tmp_path / 'later'}, which does not exist")
  raw.unlink()
  if root:  # A hop through another user's link, to a file of this user's.
    os.rename(a_file, str(a_file) + ".kept")
    a_file.symlink_to(other / "hop")
    os.lchown(other / "hop", 1234, -1)
    assert inference.recorded_idx_folder(str(workdir)) == (
        None, f"{other / 'hop'} belongs to another user (uid 1234)")
    a_file.unlink()
    os.rename(str(a_file) + ".kept", a_file)
    assert inference.recorded_idx_folder(str(workdir)) == (str(data), None)
  config["_derived"]["data_source"] = "IDX folder relative/idx ($FASHION_JAX_IDX_DIR)"
  (workdir / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="no network here"):
    evaluate.evaluate(str(workdir), str(tmp_path / "out"))
