r"""Classifies image files with a trained run: the top-k classes of each image.

  python -m fashion_jax.predict --workdir=DIR PATH... [--top_k=3] [--json] \
      [--save_preprocessed=DIR] [--step=N]

PATHs are image files or folders (searched recursively for image extensions --
see `preprocess.IMAGE_EXTENSIONS` -- in sorted order, hidden files skipped).
Files named explicitly are tried whatever their extension. Any size and most
modes of PNG, JPEG, WebP, BMP, GIF (first frame), TIFF, PNM, AVIF (Pillow >= 11.2);
no other format is opened (an EPS would run Ghostscript: `image_files.FORMATS`).
Each is converted the way Fashion-MNIST was made (`fashion_jax/serving/preprocess.py`):
a garment photo on a light background, or a bright garment on black like the data set itself.

Output (stdout): a table, one row per file with its top-k "class (prob%)", or
with --json one JSON object per line:
  {"path": ..., "top_k": [{"class": "Sneaker", "label": 7, "probability": 0.93}, ...]}
  {"path": ..., "error": "not an image file (...)"}
(plus "preprocessed": PNG path with --save_preprocessed). Which checkpoint was
used goes to stderr.

The model is the run's best checkpoint by validation accuracy, else its latest
(`fashion_jax.serving.inference`); --step picks another. --save_preprocessed=DIR
writes the 28x28 image the model saw for each input, as DIR/<file name>.png.

Errors: a file that cannot be read or holds no image, or a folder that cannot be
listed, gets one stderr line `fashion_jax: error: PATH: reason` and the others are
still classified.
Exit status: 0 all classified; 1 some file failed; 2 usage errors -- a bad
--workdir or --step, no inputs, a PATH that does not exist (reported per path
like the unreadable ones, the rest still classified, as `ls` does).

Startup: JAX is imported only once the inputs are known to exist, so usage
mistakes are reported at once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import io
import json
import os
import sys
from typing import Callable, Iterable, TextIO

from absl import flags

from fashion_jax import cli
from fashion_jax.serving import preprocess
from fashion_jax.support import errors
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

FLAGS = flags.FLAGS

EXIT_OK, EXIT_FILE_FAILED, EXIT_USAGE = 0, 1, 2
MAX_BATCH = 256


def define_flags() -> None:
  """Registers the CLI flags; called only when run as a program (as in fashion_jax.evaluate)."""
  flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
  flags.DEFINE_integer("top_k", 3, "How many classes to show per image, most probable first.",
                       lower_bound=1)
  flags.DEFINE_bool("json", False, "One JSON object per line instead of a table.")
  flags.DEFINE_string("save_preprocessed", None,
                      "Folder to write each input's 28x28 preprocessed image to, as PNG.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation, else latest).")


def shown(path: str) -> str:
  """A path as text that prints and parses anywhere: a name's bytes that are no UTF-8 (os.walk
  keeps them as lone surrogates) as \\xff escapes; they had ended the table in a traceback."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclasses.dataclass
class Prediction:
  """One input's outcome: `top_k` [(class name, label, probability)...] or an `error`."""
  path: str
  top_k: list[tuple[str, int, float]] | None = None
  error: str | None = None
  preprocessed: str | None = None

  def to_json(self) -> str:
    record: dict = {"path": shown(self.path)}
    if self.error is not None:
      record["error"] = self.error
    else:
      record["top_k"] = [{"class": name, "label": label, "probability": round(prob, 6)}
                         for name, label, prob in self.top_k]
    if self.preprocessed is not None:
      record["preprocessed"] = shown(self.preprocessed)
    return json.dumps(record)


@dataclasses.dataclass
class Inputs:
  """What the PATHs expand to: files in order (folders walked), and the PATHs that gave none."""
  entries: list[str]  # Files to classify and PATHs that do not exist, in command-line order.
  missing: set[str]  # PATHs that do not exist: a usage error, but the rest still run.
  empty_folders: list[str]
  unreadable: dict[str, str] = dataclasses.field(default_factory=dict)  # Folder -> why, in entries.


def find_images(paths: Iterable[str]) -> Inputs:
  """Files as given; folders walked recursively (sorted, image extensions, no hidden entries); a
  pattern no file is named after (`'photos/*.jpg'`, quoted, or from a program that passes no
  shell) as the shell would expand it, its files with an image extension (it was "no such
  file")."""
  entries, missing, empty, unreadable = [], set(), [], {}
  for path in paths:
    matches = ([] if os.path.lexists(path) or not glob.has_magic(path) else
               sorted(glob.glob(path, recursive=True)))
    if matches:
      files = [m for m in matches if os.path.isfile(m) and preprocess.is_image_filename(m)]
      folders = find_images([m for m in matches if os.path.isdir(m)])
      entries.extend(files + folders.entries)
      empty.extend(folders.empty_folders)
      unreadable.update(folders.unreadable)
      if not files and not folders.entries:
        empty.append(path)
    elif os.path.isdir(path):
      found, failed = [], {}

      def cannot_list(e: OSError) -> None:  # (os.walk skipped such a folder without a word.)
        failed[e.filename] = (f"cannot read this folder ({e.strerror or e}); its images are not "
                              "classified")
        found.append(e.filename)
      for root, dirs, names in os.walk(path, onerror=cannot_list):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(names)
                     if not name.startswith(".") and preprocess.is_image_filename(name))
      entries.extend(found)
      unreadable.update(failed)
      if not found:
        empty.append(path)
    else:
      entries.append(path)
      if not os.path.exists(path):
        missing.add(path)
  return Inputs(entries, missing, empty, unreadable)


def preprocessed_names(files: list[str], inputs_there: Iterable[str] = ()) -> list[str]:
  """A unique PNG file name per input: its base name + ".png", numbered on collisions, and never
  one of `inputs_there`: names of inputs in the --save_preprocessed folder (`shirt` and
  `shirt.png` there: shirt's picture had replaced shirt.png before it was read). The base name is
  cut where the name would pass a file system's 255 bytes (an input's own 254-byte name had
  ended the whole run at its picture: "File name too long")."""
  taken, names = set(inputs_there), []
  for path in files:
    base = os.path.basename(os.path.normpath(path)) or "image"
    name, n = _fitted(base, ".png"), 1
    while name in taken:
      n += 1
      name = _fitted(base, f"-{n}.png")
    taken.add(name)
    names.append(name)
  return names


def _fitted(base: str, suffix: str) -> str:
  while len(os.fsencode(base + suffix)) > 255:  # NAME_MAX on ext4, XFS, Btrfs, APFS.
    base = base[:-1]
  return base + suffix


def _pattern_would_match(pattern: str, target: str, names: list[str]) -> bool:
  """Whether `pattern`, as find_images expands it (glob, `**` recursive, a name starting with "."
  only where the pattern's part does), matches the real path `target`, a folder above it below
  the pattern's literal root, or one of the files `names` in it, were they there: it was checked
  against existing folders only, so photos/seen was accepted for 'photos/*' on the first run."""
  parts = pattern.replace(os.altsep or os.sep, os.sep).split(os.sep)
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  root = (os.sep.join(parts[:first]) or os.sep) if first else os.curdir
  relative = os.path.relpath(target, os.path.realpath(root))
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    return False
  folders = [] if relative == os.curdir else relative.split(os.sep)

  def match(rest: list[str], path: list[str]) -> bool:
    if not rest:
      return not path
    if rest[0] == "**":  # Zero or more folders, no hidden ones.
      return match(rest[1:], path) or bool(
          path and not path[0].startswith(".") and match(rest, path[1:]))
    return bool(path and (rest[0].startswith(".") or not path[0].startswith(".")) and
                fnmatch.fnmatch(path[0], rest[0]) and match(rest[1:], path[1:]))

  rest = [part for part in parts[first:] if part]
  files = [] if parts[-1] == "" else names  # ('photos/*/' matches folders only.)
  return any(match(rest, folders[:n]) for n in range(len(folders) + 1)) or any(
      match(rest, folders + [name]) for name in files)


def _refuse_saving_among_inputs(save_dir: str, paths: list[str], names: list[str]) -> None:
  """--save_preprocessed in (or under) a folder given as input, or where a quoted pattern would
  match it or its `names` (the files to write): the next run classified its own outputs too
  (a.png.png, a.png.png.png, ...), and a.png.png could overwrite an input."""
  if storage.is_url(save_dir):
    return
  target = os.path.realpath(save_dir)
  for path in paths:  # A quoted pattern ('photos/*') as find_images expands it: its folders.
    pattern = not os.path.lexists(path) and glob.has_magic(path)
    given = glob.glob(path, recursive=True) if pattern else [path]
    if any(os.path.isdir(g) and (target == os.path.realpath(g) or target.startswith(
        os.path.realpath(g).rstrip(os.sep) + os.sep)) for g in given) or (
            pattern and _pattern_would_match(path, target, names)):
      raise UserError(f"--save_preprocessed={save_dir} is among the inputs ({path}): the images "
                      "written there would be classified with them next time; pass a folder "
                      "outside the inputs")


def _load(path: str, dataset: str):
  """The 28x28 uint8 version of one file, made by `dataset`'s recipe (MNIST's for digits,
  Fashion-MNIST's otherwise); raises preprocess.ImageError."""
  if not os.path.isfile(path):
    raise preprocess.ImageError("not a regular file")
  recipe = preprocess.to_mnist if dataset == "mnist" else preprocess.to_fashion_mnist
  image = recipe(preprocess.load_image(path))
  if not image.any():
    raise preprocess.ImageError("blank: no pixel differs from the background colour by more "
                                f"than {100 * preprocess.TRIM_FUZZ:.0f}%, nothing to classify")
  return image


def _check_workdir(workdir: str, before_jax: Callable[[], None] | None) -> None:
  """The --workdir's first check where no model is loaded: a folder holding a config.json, asked
  without JAX; where it is not, inference.load_run_config says why (a UserError, exit 2), as a
  run that loads the model says it first."""
  resolved = storage.resolve(workdir, "--workdir")
  if storage.isdir(resolved) and storage.exists(storage.join(resolved, "config.json")):
    return
  if before_jax:
    before_jax()
  from fashion_jax.serving import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  inference.load_run_config(resolved)


def predict(workdir: str, paths: list[str], top_k: int = 3, step: int | None = None,
            save_dir: str | None = None, err: TextIO | None = None,
            before_jax: Callable[[], None] | None = None) -> tuple[list[Prediction], int]:
  """Classifies the images in `paths`; returns (one Prediction per input, exit status).

  Per-file problems are reported on `err` (default stderr) as they occur and
  recorded in that input's Prediction; problems with the run or the
  arguments raise UserError. `before_jax`: called once the inputs are known, before JAX is
  imported (the command's console and compilation cache).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  err = sys.stderr if err is None else err
  errors.require("PIL", "Pillow", "serve", "python -m fashion_jax.predict (reading images)")
  if not paths:
    raise UserError("no inputs: pass image files or folders after the flags, e.g. "
                    "python -m fashion_jax.predict --workdir=DIR photo.jpg photos/")
  if top_k > 10:
    raise UserError(f"--top_k={top_k} is more than the 10 classes there are; pass 1 to 10")
  inputs = find_images(paths)
  predictions = [Prediction(path) for path in inputs.entries]
  for prediction in predictions:
    if prediction.path in inputs.missing or prediction.path in inputs.unreadable:
      prediction.error = inputs.unreadable.get(prediction.path, "no such file or directory")
      print(f"fashion_jax: error: {shown(prediction.path)}: {prediction.error}", file=err)
  for path in inputs.empty_folders:
    print(f"fashion_jax: warning: {path}: no image files there (extensions: "
          f"{' '.join(sorted(preprocess.IMAGE_EXTENSIONS))})", file=err)
  todo = [p for p in predictions if p.error is None]
  if not todo and not inputs.unreadable:
    raise UserError("no image files to classify" + (
        f"; not found: {', '.join(sorted(inputs.missing))}" if inputs.missing else ""))
  if not todo:  # Only folders it cannot list (and missing PATHs): each said, exit 1 (or 2), as a
    _check_workdir(workdir, before_jax)  # file it cannot read; not "no image". A bad --workdir
    return predictions, _status(predictions, inputs, err)  # is still exit 2, said.
  if before_jax:
    before_jax()
  from fashion_jax.serving import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  batch_size = min(MAX_BATCH, 1 << (len(todo) - 1).bit_length())  # Small inputs, small batches.
  classifier = inference.load(workdir, step=step, batch_size=batch_size)
  target = None if not save_dir or storage.is_url(save_dir) else os.path.realpath(save_dir)
  names = preprocessed_names([p.path for p in todo], {  # An input there, as named or as linked.
      os.path.basename(found) for p in todo for found in (
          os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p.path))),
                       os.path.basename(p.path)), os.path.realpath(p.path))
      if os.path.dirname(found) == target})
  if save_dir:  # A local folder or gs://bucket/path, created and proved writable: once the run
    _refuse_saving_among_inputs(save_dir, paths, names)
    save_dir = storage.ensure_writable_dir(save_dir, "--save_preprocessed")  # is known good.
  print(f"fashion_jax: checkpoint {classifier.checkpoint_dir} (step {classifier.step}, "
        f"{classifier.why})", file=err)

  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, classified = [], []
  for prediction, name in zip(todo, names, strict=True):
    try:
      image = _load(prediction.path, classifier.config.dataset)
    except Exception as e:  # pylint: disable=broad-except  (one odd file must not stop a batch)
      prediction.error = (str(e) if isinstance(e, preprocess.ImageError)
                          else f"cannot convert ({type(e).__name__}: {e})")
      print(f"fashion_jax: error: {shown(prediction.path)}: {prediction.error}", file=err)
      continue
    if save_dir:
      target = storage.join(save_dir, name)
      try:
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        storage.write_bytes(target, png.getvalue(),
                            "free some space or pass another --save_preprocessed")
      except OSError as e:
        raise UserError(f"cannot write {target} ({e}); pass another --save_preprocessed") from e
      prediction.preprocessed = target
    images.append(image)
    classified.append(prediction)

  if images:
    probabilities = classifier.probabilities(np.stack(images))
    for prediction, probs in zip(classified, probabilities, strict=True):
      order = np.argsort(-probs, kind="stable")[:top_k]
      prediction.top_k = [(classifier.class_names[j], int(j), float(probs[j])) for j in order]

  return predictions, _status(predictions, inputs, err)


def _status(predictions: list[Prediction], inputs: Inputs, err: TextIO) -> int:
  """The exit status, after a line counting the inputs that could not be classified."""
  failed = sum(p.error is not None for p in predictions)
  if failed:
    print(f"fashion_jax: {failed} of {len(predictions)} inputs could not be classified", file=err)
  return EXIT_USAGE if inputs.missing else EXIT_FILE_FAILED if failed else EXIT_OK


def format_table(predictions: list[Prediction]) -> str:
  """One row per input: the path, then its top-k "class (prob%)" or the error."""
  width = max([len("file")] + [len(shown(p.path)) for p in predictions])
  k = max([len(p.top_k) for p in predictions if p.top_k] or [1])
  lines = [f"{'file':<{width}}  top-{k}"]
  for p in predictions:
    if p.error is not None:
      cells = f"error: {p.error}"
    else:
      cells = "  ".join(f"{name} ({100 * prob:.1f}%)" for name, _, prob in p.top_k)
    lines.append(f"{shown(p.path):<{width}}  {cells}")
  return "\n".join(lines)


def _start_jax() -> None:
  """The console quieted and the compilation cache on (GPU/TPU only: the model's compile, once);
  both import JAX, 2-3 s: after the inputs are checked, as the module docstring says (they came
  first, and a mistyped path waited for JAX)."""
  from fashion_jax.support import compile_cache  # pylint: disable=g-import-not-at-top
  cli.quiet_console()
  compile_cache.enable()


def main(argv):
  try:
    predictions, status = predict(FLAGS.workdir, argv[1:], top_k=FLAGS.top_k, step=FLAGS.step,
                                  save_dir=FLAGS.save_preprocessed, before_jax=_start_jax)
  except UserError as e:
    cli.fail(str(e), EXIT_USAGE)
  if FLAGS.json:
    for prediction in predictions:
      print(prediction.to_json())
  else:
    print(format_table(predictions))
  sys.exit(status)

