"""Tests for `python -m fashion_jax.predict`: output formats, errors, exit codes, real photos.

The CLI tests run the module as a subprocess against the tiny trained run,
each covering several flags at once to keep the number of JAX start-ups
small, and check its answers against the same model applied in-process to the
same 28x28 images (which files already in Fashion-MNIST form must reach the
model unchanged). The real-data tests
synthesize product photos from real test images (tests/photos.py), run the
CLI once over them and check the issue's "done when": a model trained with
the default recipe gets most of them right.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fashion_jax.data import idx
from fashion_jax.serving import inference
from fashion_jax.serving import predict
from fashion_jax.support.errors import UserError
from tests import photos
from tests.conftest import REAL_DATA_ENV
from tests.conftest import run_module
from tests.conftest import run_module_noting_jax


def json_lines(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("fashion_jax: error:")]


@pytest.fixture(scope="module")
def tiny_inputs(trained_tiny_workdir, tmp_path_factory):
  """(folder of PNGs made from the tiny run's test images, their paths sorted).

  folder/a/ and folder/b/ hold files with the same names (3 each), plus files a
  folder walk must skip: a text file and a hidden PNG.
  """
  images, _ = idx.load_split(os.path.join(os.path.dirname(trained_tiny_workdir), "idx"), "test")
  folder = tmp_path_factory.mktemp("tiny_inputs")
  paths = []
  for sub, offset in (("a", 0), ("b", 3)):
    os.makedirs(folder / sub)
    for i in range(3):
      paths.append(str(folder / sub / f"img{i}.png"))
      Image.fromarray(images[offset + i, ..., 0]).save(paths[-1])
  (folder / "a" / "notes.txt").write_text("not an image")
  Image.fromarray(images[6, ..., 0]).save(folder / "a" / ".hidden.png")
  return folder, sorted(paths)


@pytest.fixture(scope="module")
def tiny_reference(trained_tiny_workdir, tiny_inputs):
  """{path: the in-process model's probabilities for that file's 28x28 image}."""
  _, paths = tiny_inputs
  images = np.stack([np.asarray(Image.open(p)) for p in paths])
  probabilities = inference.load(trained_tiny_workdir).probabilities(images)
  return dict(zip(paths, probabilities, strict=True))


def test_table_output_for_files_and_folders(trained_tiny_workdir, tiny_inputs, tiny_reference):
  folder, files = tiny_inputs
  single = str(folder / "b" / "img2.png")
  proc = run_module("fashion_jax.predict", f"--workdir={trained_tiny_workdir}", single,
                    str(folder))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["file", "top-3"]
  rows = lines[1:]
  # The file as given, then the folder walked in sorted order, skipping text and hidden files.
  paths = [single] + files
  assert [row.split()[0] for row in rows] == paths
  for path, row in zip(paths, rows, strict=True):
    cells = row[len(path):].split("  ")
    cells = [c.strip() for c in cells if c.strip()]
    assert len(cells) == 3 and all(c.endswith("%)") for c in cells), row
    probs = [float(c.rsplit("(", 1)[1].rstrip("%)")) for c in cells]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 100 + 0.05 * 3  # Rounding.
    # The model's own answer for the image (the file is the image, already in Fashion-MNIST form).
    reference = tiny_reference[path]
    assert cells[0] == (f"{inference.CLASS_NAMES[reference.argmax()]} "
                        f"({100 * reference.max():.1f}%)"), row
  assert "step" in proc.stderr and not error_lines(proc.stderr)


def test_json_top_k_save_preprocessed_and_bad_files(trained_tiny_workdir, tiny_inputs,
                                                    tiny_reference, tmp_path):
  folder, files = tiny_inputs
  corrupt = tmp_path / "corrupt.jpg"
  good_bytes = (folder / "a" / "img0.png").read_bytes()
  corrupt.write_bytes(b"\xff\xd8\xff\xe0" + good_bytes[4:200])  # A JPEG header, then junk.
  text = tmp_path / "notes.png"  # Named like an image, but text.
  text.write_text("hello\n")
  blank = tmp_path / "blank.png"  # An image of nothing: no object to classify.
  Image.new("RGB", (120, 90), (255, 255, 255)).save(blank)
  saved = tmp_path / "seen"
  proc = run_module("fashion_jax.predict", f"--workdir={trained_tiny_workdir}", "--json",
                    "--top_k=2", f"--save_preprocessed={saved}", str(corrupt), str(folder),
                    str(text), str(blank))
  assert proc.returncode == 1, proc.stderr
  records = json_lines(proc.stdout)
  assert [r["path"] for r in records] == [str(corrupt)] + files + [str(text), str(blank)]
  # The bad files: an error each, on stdout (JSON) and as a stderr line naming the file.
  bad = [records[0]] + records[-2:]
  assert all(set(r) == {"path", "error"} for r in bad)
  assert "corrupt" in bad[0]["error"] and "not an image" in bad[1]["error"]
  assert bad[2]["error"].startswith("blank")
  errors = error_lines(proc.stderr)
  assert len(errors) == 3
  assert errors[0].startswith(f"fashion_jax: error: {corrupt}: corrupt")
  assert errors[1].startswith(f"fashion_jax: error: {text}: not an image")
  assert errors[2].startswith(f"fashion_jax: error: {blank}: blank")
  assert "3 of 9 inputs could not be classified" in proc.stderr
  # The good ones: top-2, consistent class/label, probabilities descending.
  names = set()
  for record in records[1:-2]:
    assert set(record) == {"path", "top_k", "preprocessed"}
    top = record["top_k"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    assert all(inference.CLASS_NAMES[t["label"]] == t["class"] for t in top)
    assert 0.0 <= top[0]["probability"] + top[1]["probability"] <= 1.0 + 1e-6
    reference = tiny_reference[record["path"]]
    assert [t["label"] for t in top] == list(np.argsort(-reference, kind="stable")[:2])
    np.testing.assert_allclose([t["probability"] for t in top], np.sort(reference)[::-1][:2],
                               atol=1e-5)
    # What the model saw: a 28x28 PNG, the input itself (already Fashion-MNIST form).
    seen = np.asarray(Image.open(record["preprocessed"]))
    np.testing.assert_array_equal(seen, np.asarray(Image.open(record["path"])))
    names.add(os.path.basename(record["preprocessed"]))
  # a/img0.png and b/img0.png get different names.
  assert len(names) == 6 and sorted(os.listdir(saved)) == sorted(names)


def test_a_digit_run_prepares_images_by_mnist_recipe(trained_tiny_workdir, tmp_path):
  """A `dataset=mnist` run: predict named digits but prepared photos by the garment recipe."""
  import shutil  # pylint: disable=import-outside-toplevel
  from tests.test_preprocess import _digit_seven  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "digits"
  shutil.copytree(trained_tiny_workdir, workdir)
  config = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps(dict(config, dataset="mnist")))
  Image.fromarray(_digit_seven()).save(tmp_path / "seven.png")
  predictions, status = predict.predict(str(workdir), [str(tmp_path / "seven.png")],
                                        save_dir=str(tmp_path / "seen"))
  assert status == 0 and predictions[0].top_k[0][0] in [str(d) for d in range(10)]
  seen = np.asarray(Image.open(predictions[0].preprocessed))
  rows = np.flatnonzero(seen.max(axis=1))
  assert rows[-1] - rows[0] + 1 == 20  # MNIST's 20 px box (the garment recipe fills 28).


def test_a_reader_that_leaves_is_no_traceback(trained_tiny_workdir, tiny_inputs):
  """`predict --json DIR | head -1`: a BrokenPipeError traceback (exit 1); now exit 141, as a
  shell reports a writer SIGPIPE ended, and nothing on stderr but the checkpoint line."""
  folder, _ = tiny_inputs
  proc = subprocess.Popen([sys.executable, "-m", "fashion_jax.predict",
                           f"--workdir={trained_tiny_workdir}", "--json", str(folder)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  proc.stdout.close()  # The reader is gone before the first line.
  stderr = proc.stderr.read()
  assert proc.wait(timeout=120) == 141, stderr
  assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
  # A broken pipe that is not stdout (a subprocess, a socket) is a crash, shown as one.
  code = ("from fashion_jax import cli\ndef main(argv):\n  raise BrokenPipeError(32, 'to a child')"
          "\ncli.run(main)")
  crash = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert crash.returncode == 1 and "BrokenPipeError: [Errno 32] to a child" in crash.stderr


def test_nonexistent_path_is_reported_and_the_rest_classified(trained_tiny_workdir, tiny_inputs,
                                                              tiny_reference, tmp_path):
  folder, _ = tiny_inputs
  good = str(folder / "a" / "img1.png")
  missing = str(tmp_path / "no_such_photo.jpg")
  proc = run_module("fashion_jax.predict", f"--workdir={trained_tiny_workdir}", "--json", missing,
                    good)
  assert proc.returncode == 2, proc.stderr  # A mistyped path is a usage error (like `ls`).
  assert error_lines(proc.stderr) == [f"fashion_jax: error: {missing}: no such file or directory"]
  records = json_lines(proc.stdout)
  assert records[0] == {"path": missing, "error": "no such file or directory"}
  assert records[1]["path"] == good
  assert records[1]["top_k"][0]["label"] == tiny_reference[good].argmax()
  assert len(records[1]["top_k"]) == 3


@pytest.mark.parametrize("case", ["missing_workdir", "not_a_run", "bad_step", "no_inputs",
                                  "only_missing", "top_k_too_big", "empty_folder"])
def test_usage_errors_exit_2_with_one_line(trained_tiny_workdir, tiny_inputs, tmp_path, case):
  folder, _ = tiny_inputs
  good = str(folder / "a" / "img0.png")
  args, expect = {
      "missing_workdir": ([f"--workdir={tmp_path / 'nope'}", good], "does not exist"),
      "not_a_run": ([f"--workdir={tmp_path}", good], "is not a fashion_jax training run"),
      "bad_step": ([f"--workdir={trained_tiny_workdir}", "--step=12345", good],
                   "no checkpoint at step 12345"),
      "no_inputs": ([f"--workdir={trained_tiny_workdir}"], "no inputs"),
      "only_missing": ([f"--workdir={trained_tiny_workdir}", str(tmp_path / "x.png")],
                       "no image files to classify"),
      "top_k_too_big": ([f"--workdir={trained_tiny_workdir}", "--top_k=11", good],
                        "--top_k=11"),
      "empty_folder": ([f"--workdir={trained_tiny_workdir}", str(tmp_path)],
                       "no image files to classify"),
  }[case]
  saved = tmp_path / "seen" / "deep"  # Made only for a run that loads (it was made first).
  proc = run_module("fashion_jax.predict", f"--save_preprocessed={saved}", *args)
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert proc.stdout == "" and not (tmp_path / "seen").exists()
  errors = error_lines(proc.stderr)
  assert errors and expect in errors[-1], proc.stderr
  # One line for the problem, nothing else (no traceback, no log lines); before it, a line
  # naming the missing path, or the warning about the empty folder.
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 + (case in ("only_missing", "empty_folder")), proc.stderr
  if case == "empty_folder":
    assert lines[0].startswith(f"fashion_jax: warning: {tmp_path}: no image files")


def test_usage_mistakes_are_said_before_jax_starts(trained_tiny_workdir, tiny_inputs, tmp_path):
  """--help (the module docstring) says JAX is imported only once the inputs are known to exist:
  main quieted JAX's console and turned its compilation cache on first, both importing JAX, so
  a mistyped path was named only 2-3 s later. A run that classifies starts it, as before."""
  good = str(tiny_inputs[0] / "a" / "img0.png")
  for args, status, imported in (([str(tmp_path / "typo.png")], 2, False), ([], 2, False),
                                 (["--top_k=11", good], 2, False), ([good], 0, True)):
    proc, jax_imported = run_module_noting_jax("fashion_jax.predict",
                                               f"--workdir={trained_tiny_workdir}", *args)
    assert proc.returncode == status and jax_imported == imported, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


def test_a_file_name_that_is_no_utf8_is_shown_escaped(trained_tiny_workdir, tiny_inputs, tmp_path):
  """os.walk keeps such bytes as lone surrogates: the table's print raised UnicodeEncodeError
  under a strict UTF-8 stdout after the whole batch, and --json wrote a lone surrogate."""
  folder, paths = tiny_inputs
  os.makedirs(tmp_path / "odd")
  shutil.copy(paths[0], os.path.join(os.fsencode(tmp_path / "odd"), b"bad\xffname.png"))
  for args in ([], ["--json"]):
    proc = run_module("fashion_jax.predict", f"--workdir={trained_tiny_workdir}", *args,
                      str(tmp_path / "odd"), env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)["path"] if args else proc.stdout.splitlines()[1].split()[0]
    assert shown.endswith("odd/bad\\xffname.png"), proc.stdout


def test_saving_preprocessed_images_among_the_inputs_is_refused(trained_tiny_workdir, tiny_inputs):
  """The next run classified its own outputs too: img0.png.png, then img0.png.png.png."""
  folder, _ = tiny_inputs
  proc = run_module("fashion_jax.predict", f"--workdir={trained_tiny_workdir}",
                    f"--save_preprocessed={folder / 'a' / 'out'}", str(folder))
  assert proc.returncode == 2 and proc.stdout == ""
  assert error_lines(proc.stderr) == [
      f"fashion_jax: error: --save_preprocessed={folder / 'a' / 'out'} is among the inputs "
      f"({folder}): the images written there would be classified with them next time; pass a "
      "folder outside the inputs"], proc.stderr
  assert not (folder / "a" / "out").exists()


def test_saving_preprocessed_images_in_a_quoted_patterns_folder_is_refused(trained_tiny_workdir,
                                                                          tiny_inputs, tmp_path):
  """A quoted pattern ('photos/*') whose folders hold --save_preprocessed: its second run walked
  photos/seen too, classifying (and saving again) the first run's pictures."""
  _, paths = tiny_inputs
  folder = tmp_path / "photos"
  (folder / "seen").mkdir(parents=True)
  shutil.copy(paths[0], folder / "a.png")
  with pytest.raises(UserError, match=re.escape(f"--save_preprocessed={folder / 'seen'} is among "
                                                f"the inputs ({folder / '*'})")):
    predict.predict(trained_tiny_workdir, [str(folder / "*")], save_dir=str(folder / "seen"))
  assert os.listdir(folder / "seen") == []
  # Its first run, photos/seen not there yet: accepted (only existing folders were matched).
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  shutil.copy(paths[0], fresh / "a.png")
  for pattern, save_dir in (("*", "seen"), ("*", "new/seen"), ("**/*.png", "new/seen"),
                            ("*.png", "")):  # The last two: would match the files written there.
    with pytest.raises(UserError, match=re.escape(
        f"--save_preprocessed={fresh / save_dir} is among the inputs ({fresh / pattern})")):
      predict.predict(trained_tiny_workdir, [str(fresh / pattern)], save_dir=str(fresh / save_dir))
  assert os.listdir(fresh) == ["a.png"]
  predictions, status = predict.predict(trained_tiny_workdir, [str(fresh / "*.png")],
                                        save_dir=str(fresh / ".seen"))  # Hidden: never matched.
  assert status == 0 and os.listdir(fresh / ".seen") == ["a.png.png"]


def test_a_run_folder_anyone_may_write_is_not_served(trained_tiny_workdir, tiny_inputs, tmp_path):
  """A checkpoint planted in a folder all may write (the README's /tmp/fj) decided the answers."""
  folder, paths = tiny_inputs
  workdir = tmp_path / "run"
  shutil.copytree(trained_tiny_workdir, workdir)
  os.chmod(workdir / "checkpoints", 0o777)
  proc = run_module("fashion_jax.predict", f"--workdir={workdir}", paths[0])
  assert proc.returncode == 2 and error_lines(proc.stderr) == [
      f"fashion_jax: error: {workdir / 'checkpoints'} is writable by every user: anyone could "
      f"have put the checkpoint or config.json there that this would serve; chmod o-w "
      f"{workdir / 'checkpoints'}, or set FASHION_JAX_TRUST_WORKDIR=1 if nobody else can reach "
      "it"], proc.stderr
  proc = run_module("fashion_jax.predict", f"--workdir={workdir}", paths[0],
                    env={"FASHION_JAX_TRUST_WORKDIR": "1"})
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_find_images_order_and_filters(tmp_path):
  for name in ("b/z.PNG", "b/a.jpg", "a.webp", "c/readme.md", ".git/x.png", "b/.y.png",
               "b/c/d.gif"):
    path = tmp_path / name
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(b"")
  inputs = predict.find_images([str(tmp_path / "c" / "readme.md"), str(tmp_path),
                                str(tmp_path / "gone.png"), str(tmp_path / "c")])
  root = str(tmp_path)
  assert inputs.entries == [
      f"{root}/c/readme.md",  # Named explicitly: tried whatever its extension.
      f"{root}/a.webp", f"{root}/b/a.jpg", f"{root}/b/z.PNG", f"{root}/b/c/d.gif",
      f"{root}/gone.png"]
  assert inputs.missing == {f"{root}/gone.png"}
  assert inputs.empty_folders == [f"{root}/c"]


def test_a_folder_that_cannot_be_read_is_an_error_not_skipped(trained_tiny_workdir, tiny_inputs,
                                                             tmp_path, monkeypatch):
  """os.walk passes over a folder it cannot list (no read permission, gone meanwhile) without a
  word: `predict photos/` classified the rest, left photos/summer's images out and exited 0;
  alone, such a folder was "no image files there". Each is now an error line, exit status 1."""
  images = tmp_path / "photos"
  for name in ("a.png", "summer/b.png", "winter/c.png"):
    os.makedirs((images / name).parent, exist_ok=True)
    shutil.copy(tiny_inputs[1][0], images / name)
  locked = {str(images / "summer"), str(tmp_path / "locked")}
  os.makedirs(tmp_path / "locked")
  real_scandir = os.scandir

  def scandir(path="."):  # What listing a folder without read permission raises (root may).
    if os.fspath(path) in locked:
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_scandir(path)
  monkeypatch.setattr(os, "scandir", scandir)
  err = io.StringIO()
  predictions, status = predict.predict(
      trained_tiny_workdir, [str(images), str(tmp_path / "locked")], err=err)
  assert [p.path for p in predictions] == [
      str(images / "a.png"), str(images / "summer"), str(images / "winter" / "c.png"),
      str(tmp_path / "locked")]
  assert [p.top_k is not None for p in predictions] == [True, False, True, False]
  assert status == predict.EXIT_FILE_FAILED
  for folder in (images / "summer", tmp_path / "locked"):
    assert (f"fashion_jax: error: {folder}: cannot read this folder (Permission denied); its "
            "images are not classified\n") in err.getvalue()
  assert "no image files there" not in err.getvalue()


def _unlistable(monkeypatch, locked):
  """`locked` cannot be listed (as a folder without read permission; tests run as root, which
  may), and no model is to be loaded."""
  real_scandir = os.scandir

  def scandir(path="."):
    if os.fspath(path) == str(locked):
      raise PermissionError(13, "Permission denied", os.fspath(path))
    return real_scandir(path)
  monkeypatch.setattr(os, "scandir", scandir)
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded a model for none"))


def test_a_folder_that_cannot_be_read_alone_is_exit_1_not_no_images(tmp_path, monkeypatch):
  """Such a folder alone printed its error line, then 'no image files to classify' (exit 2, a
  usage error) about a folder that may be full of images; as an unreadable file alone, it is
  now its error line and exit status 1 (2 with a PATH that does not exist too, as ever), and
  the model is not loaded for nothing to classify."""
  locked = tmp_path / "locked"
  (locked / "summer").mkdir(parents=True)
  _unlistable(monkeypatch, locked)
  missing = str(tmp_path / "typo.png")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  for paths, status in (([str(locked)], predict.EXIT_FILE_FAILED),
                        ([str(locked), missing], predict.EXIT_USAGE)):
    err = io.StringIO()
    predictions, got = predict.predict(str(tmp_path / "run"), paths, err=err)
    assert got == status
    assert [(p.path, p.top_k) for p in predictions] == [(path, None) for path in paths]
    assert err.getvalue().splitlines()[0] == (
        f"fashion_jax: error: {locked}: cannot read this folder (Permission denied); its images "
        "are not classified")
    assert err.getvalue().splitlines()[-1] == (
        f"fashion_jax: {len(paths)} of {len(paths)} inputs could not be classified")
    assert "no image files" not in err.getvalue()
  assert '"error": "cannot read this folder' in predictions[0].to_json()


def test_a_bad_workdir_with_only_folders_that_cannot_be_read_is_a_usage_error(tmp_path,
                                                                             monkeypatch):
  """Given only folders it cannot list, predict returned before the --workdir was looked at: a
  missing or wrong --workdir was exit 1 and never named, though a bad --workdir is exit 2 (the
  README), as it is beside a file it cannot read (the model is loaded for that). Its first check
  (a folder with a config.json) is made, and said as a run that loads says it; a good one still
  loads no model for nothing to classify (above)."""
  locked = tmp_path / "locked"
  locked.mkdir()
  _unlistable(monkeypatch, locked)
  (tmp_path / "notes.txt").write_text("not a run")
  for workdir, says in ((tmp_path / "nope", f"--workdir '{tmp_path / 'nope'}' does not exist; "
                         "pass the --workdir of a training run"),
                        (tmp_path / "notes.txt", f"--workdir '{tmp_path / 'notes.txt'}' is a file, "
                         "not a folder"),
                        (tmp_path, f"{tmp_path / 'config.json'} not found: '{tmp_path}' is not a "
                         "fashion_jax training run"),
                        ("", "--workdir is empty")):
    started = []
    with pytest.raises(UserError, match=f"^{re.escape(says)}"):
      predict.predict(str(workdir), [str(locked)], err=io.StringIO(),
                      before_jax=lambda: started.append(True))
    assert started == ([] if workdir == "" else [True])  # (JAX only to say what is wrong.)


def test_a_quoted_pattern_is_expanded_as_the_shell_would(tmp_path):
  """'photos/*.jpg' quoted (or from a program that passes no shell) was "no such file"."""
  for name in ("p/b.jpg", "p/a.png", "p/notes.txt", "p/sub/c.gif", "p/.hidden.jpg", "q/x.txt"):
    os.makedirs((tmp_path / name).parent, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  root = str(tmp_path)
  inputs = predict.find_images([f"{root}/p/*", f"{root}/p/**/*.gif", f"{root}/q/*",
                                f"{root}/none*.jpg"])
  assert inputs.entries == [f"{root}/p/a.png", f"{root}/p/b.jpg", f"{root}/p/sub/c.gif",
                            f"{root}/p/sub/c.gif", f"{root}/none*.jpg"]
  assert inputs.missing == {f"{root}/none*.jpg"}
  assert inputs.empty_folders == [f"{root}/q/*"]
  (tmp_path / "p" / "[x].png").write_bytes(b"")  # A name that looks like a pattern: itself.
  assert predict.find_images([f"{root}/p/[x].png"]).entries == [f"{root}/p/[x].png"]


def test_preprocessed_names_are_unique():
  names = predict.preprocessed_names(["a/shirt.jpg", "b/shirt.jpg", "shirt.jpg.png", "c/shirt.jpg",
                                      "shirt.png"])
  assert names == ["shirt.jpg.png", "shirt.jpg-2.png", "shirt.jpg.png.png", "shirt.jpg-3.png",
                   "shirt.png.png"]
  assert len(set(names)) == len(names)
  long = "a" * 248 + "é.jpg"  # 254 bytes: a legal input name, but not with ".png" after it.
  names = predict.preprocessed_names([f"x/{long}", f"y/{long}", "z/\udcff"])  # (A byte no UTF-8.)
  assert names == ["a" * 248 + "é..png", "a" * 248 + "-2.png", "\udcff.png"]
  assert all(len(os.fsencode(name)) <= 255 for name in names)


def test_saving_preprocessed_images_beside_the_inputs_replaces_none(trained_tiny_workdir,
                                                                    tiny_inputs, tmp_path):
  """--save_preprocessed into the inputs' own folder, given files (not the folder): an input
  `shirt` (no extension) was saved as shirt.png over the input shirt.png, before it was read
  (which then classified the 28x28 copy); its picture is numbered instead."""
  _, paths = tiny_inputs
  shutil.copy(paths[0], tmp_path / "shirt")
  shutil.copy(paths[1], tmp_path / "shirt.png")
  original = (tmp_path / "shirt.png").read_bytes()
  predictions, status = predict.predict(trained_tiny_workdir, [str(tmp_path / "shirt"),
                                                               str(tmp_path / "shirt.png")],
                                        save_dir=str(tmp_path))
  assert status == 0 and (tmp_path / "shirt.png").read_bytes() == original
  assert [os.path.basename(p.preprocessed) for p in predictions] == ["shirt-2.png",
                                                                     "shirt.png.png"]
  assert predict.preprocessed_names(["d/shirt", "d/shirt.png"], {"shirt.png"}) == [
      "shirt-2.png", "shirt.png.png"]


def test_saving_preprocessed_images_never_replaces_an_input_linked_there(trained_tiny_workdir,
                                                                        tiny_inputs, tmp_path):
  """An input given through a file symlink into the --save_preprocessed folder (a/shirt.png ->
  out/shirt.png): only the input's folder was resolved, so b/shirt's picture was saved as
  out/shirt.png, over the linked input, before it was read."""
  _, paths = tiny_inputs
  for folder in ("a", "b", "out"):
    (tmp_path / folder).mkdir()
  shutil.copy(paths[0], tmp_path / "b" / "shirt")
  shutil.copy(paths[1], tmp_path / "out" / "shirt.png")
  os.symlink(tmp_path / "out" / "shirt.png", tmp_path / "a" / "shirt.png")
  original = (tmp_path / "out" / "shirt.png").read_bytes()
  predictions, status = predict.predict(
      trained_tiny_workdir, [str(tmp_path / "b" / "shirt"), str(tmp_path / "a" / "shirt.png")],
      save_dir=str(tmp_path / "out"))
  assert status == 0 and (tmp_path / "out" / "shirt.png").read_bytes() == original
  assert [os.path.basename(p.preprocessed) for p in predictions] == ["shirt-2.png",
                                                                     "shirt.png.png"]


def test_format_table_aligns_and_shows_errors():
  table = predict.format_table([
      predict.Prediction("x.png", top_k=[("Sneaker", 7, 0.9312), ("Sandal", 5, 0.05)]),
      predict.Prediction("long/name.txt", error="not an image file"),
  ])
  assert table.splitlines() == [
      "file           top-2",
      "x.png          Sneaker (93.1%)  Sandal (5.0%)",
      "long/name.txt  error: not an image file",
  ]


# ------------------------------------------------------------------------------------------------
# Real data: product-style photos made from real test images.

PER_CLASS = 10


@pytest.fixture(scope="module")
def real_run(trained_real_workdir, tmp_path_factory):
  """Runs the CLI once over synthesized product photos and the original 28x28 images.

  Returns (records by path, photo paths, original paths, original images,
  labels, the in-process classifier's probabilities on the originals).
  """
  images, labels = idx.load_split(os.environ[REAL_DATA_ENV], "test")  # Set: the run exists.
  images = images[..., 0]
  chosen = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
  base = tmp_path_factory.mktemp("real_photos")
  rng = np.random.default_rng(0)
  photo_paths, original_paths = [], []
  os.makedirs(base / "photos")
  os.makedirs(base / "originals")
  for k, i in enumerate(chosen):
    rgba = k % 2 == 1  # Alternate: JPEG (RGB) and PNG (RGBA, transparent background).
    photo = photos.product_photo(images[i], rng, rgba=rgba)
    path = str(base / "photos" / f"{k:03d}_{labels[i]}.{'png' if rgba else 'jpg'}")
    photo.save(path, quality=90, compress_level=1)
    photo_paths.append(path)
    original = str(base / "originals" / f"{k:03d}_{labels[i]}.png")
    Image.fromarray(images[i]).save(original)
    original_paths.append(original)
  proc = run_module("fashion_jax.predict", f"--workdir={trained_real_workdir}", "--json",
                    f"--save_preprocessed={base / 'seen'}", str(base / "photos"),
                    str(base / "originals"))
  assert proc.returncode == 0, proc.stderr
  records = {r["path"]: r for r in json_lines(proc.stdout)}
  classifier = inference.load(trained_real_workdir)
  reference = classifier.probabilities(images[chosen])
  return records, photo_paths, original_paths, images[chosen], labels[chosen], reference


@pytest.mark.real_data
def test_product_photos_are_mostly_right(real_run):
  records, photo_paths, _, _, labels, reference = real_run
  predicted = np.array([records[p]["top_k"][0]["label"] for p in photo_paths])
  photo_accuracy = float((predicted == labels).mean())
  original_accuracy = float((reference.argmax(1) == labels).mean())
  jpeg, png = (float((predicted == labels)[s::2].mean()) for s in (0, 1))
  print(f"\nproduct photos: {100 * photo_accuracy:.1f}% right (JPEG RGB {100 * jpeg:.0f}%, "
        f"PNG RGBA {100 * png:.0f}%) vs {100 * original_accuracy:.1f}% on the original 28x28 "
        f"images ({len(labels)} images, {PER_CLASS} per class)")
  # Measured: 89% on the photos vs 93% on the originals (chance: 10%).
  assert photo_accuracy >= 0.75
  assert photo_accuracy >= original_accuracy - 0.10
  assert jpeg >= 0.65 and png >= 0.65


@pytest.mark.real_data
def test_product_photos_preprocess_close_to_originals(real_run):
  records, photo_paths, _, originals, _, _ = real_run
  differences = []
  for path, original in zip(photo_paths, originals, strict=True):
    seen = np.asarray(Image.open(records[path]["preprocessed"]))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    differences.append(np.abs(seen.astype(float) - original).mean())
    # Same geometry: the object's box matches the original's within a pixel on every side.
    rows, cols = np.flatnonzero(seen.max(1)), np.flatnonzero(seen.max(0))
    rows0, cols0 = np.flatnonzero(original.max(1)), np.flatnonzero(original.max(0))
    box = np.array([rows[0], rows[-1], cols[0], cols[-1]])
    box0 = np.array([rows0[0], rows0[-1], cols0[0], cols0[-1]])
    assert np.abs(box - box0).max() <= 1, (path, box, box0)
  differences = np.array(differences)
  print(f"\nmean |preprocessed photo - original|: {differences.mean():.1f} "
        f"(median {np.median(differences):.1f}, max {differences.max():.1f}) of 255")
  # Measured mean 17: the photos carry the data set's sharpening, and get it again.
  assert differences.mean() < 25 and np.median(differences) < 25


@pytest.mark.real_data
def test_real_28x28_images_round_trip_through_the_cli(real_run):
  records, _, original_paths, originals, _, reference = real_run
  for path, original, probs in zip(original_paths, originals, reference, strict=True):
    np.testing.assert_array_equal(np.asarray(Image.open(records[path]["preprocessed"])), original)
    assert records[path]["top_k"][0]["label"] == int(probs.argmax())
    np.testing.assert_allclose(records[path]["top_k"][0]["probability"], probs.max(), atol=1e-5)


def test_without_pillow_predict_names_the_extra(trained_tiny_workdir, tiny_inputs, monkeypatch):
  monkeypatch.setitem(sys.modules, "PIL", None)  # As if the `serve` extra were not installed.
  with pytest.raises(UserError, match=r"needs Pillow, which is not installed.*fashion_jax\[serve\]"):
    predict.predict(trained_tiny_workdir, [str(tiny_inputs)])
