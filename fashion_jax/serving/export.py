r"""Exports a trained run as a TensorFlow SavedModel: uint8 images in, class probabilities out.

  python -m fashion_jax.export --workdir=/tmp/fj --output=/tmp/fj_savedmodel [--step=N] \
      [--platforms=cpu,cuda,tpu] [--overwrite]

The SavedModel (directly in --output, so `tf.saved_model.load(OUTPUT)` works)
has these entry points, for any batch size (0 included):

  signatures["serving_default"](images=uint8 [batch, 28, 28])
      -> {"probabilities": float32 [batch, 10]}
  signatures["serving_nhwc"](images=uint8 [batch, 28, 28, 1])
      -> {"probabilities": float32 [batch, 10]}
  probabilities(uint8 [batch, 28, 28]), probabilities_nhwc(uint8 [batch, 28, 28, 1])
      -> float32 [batch, 10] (for Python callers)
  class_names (string [10], label order), step (int64): tf.Variables
  assets/class_names.txt: the class names, one per line

The default signature takes [batch, 28, 28] (the layout of the IDX files);
[batch, 28, 28, 1] (channels-last, as in tfds and Keras) gets its own signature rather
than a polymorphic last axis, so each signature's shape is exact and a
wrongly shaped input is rejected by TensorFlow before the model runs.
Pixels are raw 0..255, light garment on a dark background as in
Fashion-MNIST; scaling, EMA parameters, BatchNorm statistics and flip TTA
are inside the model exactly as `fashion_jax.serving.inference` applies them.

How: `jax.experimental.jax2tf.convert` with native serialization (the only
mode jax2tf has now): the JAX function is lowered once to StableHLO for
each of --platforms and wrapped in a single `XlaCallModule` TF op, so the
SavedModel runs the computation JAX runs (to float rounding: max |diff|
~1e-6 on the 10k test images), on CPU, GPU or TPU, without the Python model
code, serialized for the StableHLO version and calling convention the installed
TensorFlow runs (JAX's own picks can be newer). The batch axis is symbolic (`polymorphic_shapes`), so
one serialization serves every batch size. The parameters are passed in as
arguments and saved as tf.Variables (in variables/, not folded into the
graph as constants): the graph stays small and the weights can be read or
swapped with TensorFlow tools.

Beside the SavedModel: fashion_jax_export.json (model, step, why that
checkpoint, inputs/outputs, platforms, versions, the self-check) and a
README.md saying how to call it. Before the export is moved into place it
is loaded back and checked against the JAX model on a few images. A gs://
--output is built locally, then uploaded (storage.replace_folder).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

import fashion_jax
from fashion_jax import cli
from fashion_jax.serving import savedmodel
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

FLAGS = flags.FLAGS

METADATA_NAME = "fashion_jax_export.json"
README_NAME = "README.md"
CLASS_NAMES_FILE = "class_names.txt"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def define_flags() -> None:
  """Registers the CLI flags; called only when run as a program (see evaluate.define_flags)."""
  flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
  flags.DEFINE_string("output", None, "Folder to write the SavedModel to (new or empty).",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation, else latest).")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms to serialize the model for; a subset of "
                    f"{', '.join(KNOWN_PLATFORMS)}.")
  flags.DEFINE_bool("overwrite", False, "Replace a previous export in --output.")


# ----------------------------------------------------------------------------------------------
# The output folder.


def check_output(output: str, overwrite: bool) -> str:
  """The absolute --output, after refusing anything that would lose data.

  A non-empty folder is refused unless --overwrite; even then only a
  previous export (it has our metadata file) is replaced, never an arbitrary
  folder someone pointed --output at by mistake.
  """
  if not output:
    raise UserError("--output is empty; pass the folder to write the SavedModel to")
  path = storage.resolve(output, "--output")  # gs://bucket/path too: where Vertex AI reads models.
  if storage.is_url(path) and "/" not in path.split("://", 1)[1]:
    raise UserError(f"--output={path} is a whole bucket; pass a folder in it, e.g. "
                    f"--output={path}/fashion_jax_model")
  if not storage.is_url(path):
    # A link to the export folder (models/current -> v3): the export replaces v3's contents and
    # the link stays (it had replaced the link by a folder and left v3 as it was, or failed).
    path = os.path.realpath(path)
  if storage.exists(path) and not storage.isdir(path):
    raise UserError(f"--output {path!r} is a file; pass a folder (new or empty)")
  if storage.isdir(path) and _has_content(path):
    if not overwrite:
      raise UserError(f"--output {path!r} is not empty; pass --overwrite to replace the export "
                      "in it, or a new folder")
    if not storage.exists(storage.join(path, METADATA_NAME)):
      raise UserError(f"--output {path!r} is not empty and holds no fashion_jax export "
                      f"({METADATA_NAME} missing); refusing to replace it even with --overwrite; "
                      "pass a new or empty folder")
    foreign = _foreign_files(path)
    if foreign:
      raise UserError(f"--output {path!r} holds files the export did not write "
                      f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                      "refusing to replace it even with --overwrite; move them out, or pass a "
                      "new folder")
  return path


# Where the folder's parent cannot take a sibling (a mount point, a parent you cannot write to),
# the export is staged inside the folder itself, under these names.
_INSIDE = (".fashion_jax-export-", ".fashion_jax-old-")


def _kept(path: str) -> tuple[str, ...]:
  """Entries of a local folder that an export neither counts nor moves: what it stages there,
  and a file system's lost+found at a mount point (an ext4 volume's root)."""
  return _INSIDE + (("lost+found",) if os.path.ismount(path) else ())


def _has_content(path: str) -> bool:
  """storage.has_content, less `_kept` entries (local folders)."""
  if storage.is_url(path):
    return storage.has_content(path)
  kept = _kept(path)
  return any(not name.startswith(kept) for name in os.listdir(path))


# What an export writes at its top level: exports made before the metadata listed their files.
_EXPORT_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets",
                             METADATA_NAME, README_NAME})


def _relative_files(folder: str) -> list[str]:
  prefix = folder.rstrip("/") + "/"
  return sorted(f[len(prefix):] if f.startswith(prefix) else f
                for f in storage.files_under(folder))


def _foreign_files(path: str) -> list[str]:
  """The files under an export folder that the export did not write (its metadata's `files`)."""
  try:
    listed = json.loads(storage.read_text(storage.join(path, METADATA_NAME))).get("files")
  except (OSError, ValueError, AttributeError):
    listed = None
  kept = () if storage.is_url(path) else _kept(path)
  files = [f for f in _relative_files(path) if not f.startswith(kept)]
  if isinstance(listed, list):
    return [f for f in files if f not in set(listed)]
  return [f for f in files if f.split("/", 1)[0] not in _EXPORT_ENTRIES]


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """--platforms as jax2tf wants them: known names, no duplicates, at least one."""
  platforms = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise UserError(f"--platforms={','.join(platforms)} is invalid; pass a comma-separated subset "
                    f"of {', '.join(KNOWN_PLATFORMS)} (NVIDIA GPUs are cuda)")
  return platforms


def _move_into_place(staging: str, path: str) -> None:
  """Replaces `path` by `staging` (same parent), keeping the old export until the new one is in.

  A gs:// `path` is uploaded beside itself first, then swapped in (storage.replace_folder)."""
  if storage.is_url(path):
    try:
      storage.replace_folder(staging, path)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the upload: network, permissions)
      text = str(e).splitlines()[0] if str(e) else ""
      raise UserError(f"could not upload the export to {path} ({type(e).__name__}: {text}); it "
                      "is unchanged: check the bucket and your credentials, then re-run") from e
    return
  try:
    if os.path.dirname(staging) == path:
      _swap_contents(staging, path)
      return
    old, emptied = None, False
    if os.path.isdir(path):
      if os.listdir(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
      else:
        os.rmdir(path)
        emptied = True
    try:
      os.rename(staging, path)
    except OSError as e:
      try:  # Put back what was there: the previous export, or the empty folder.
        if old:
          os.rename(old, path)
        elif emptied:
          os.mkdir(path)
      except OSError as again:
        raise _not_put_back(path, e, again, old) from e
      raise
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    raise UserError(f"could not move the export into {path} ({e.strerror or e}); what was there "
                    "is unchanged: pass an --output you can write to") from e


def _not_put_back(path: str, e: OSError, again: OSError, old: str | None) -> UserError:
  """A move into `path` failed (`e`), and so did putting back what was there (`again`)."""
  return UserError(f"could not move the export into {path} ({e.strerror or e}), nor put back "
                   f"what was there ({again.strerror or again})" +
                   (f": the previous export is in {old}" if old else ""))


def _swap_contents(staging: str, path: str) -> None:
  """Replaces what `path` holds by what `staging` (inside it) holds: the old entries into a
  folder beside `staging`, the new ones out of it, and back if a move fails."""
  kept = _kept(path)
  old = tempfile.mkdtemp(prefix=_INSIDE[1], dir=path)
  previous = [n for n in os.listdir(path) if not n.startswith(kept)]
  moved_out, moved_in = [], []
  try:
    for name in previous:
      os.rename(os.path.join(path, name), os.path.join(old, name))
      moved_out.append(name)
    for name in os.listdir(staging):
      os.rename(os.path.join(staging, name), os.path.join(path, name))
      moved_in.append(name)
  except OSError as e:
    try:
      for name in moved_in:
        os.rename(os.path.join(path, name), os.path.join(staging, name))
      for name in moved_out:
        os.rename(os.path.join(old, name), os.path.join(path, name))
      os.rmdir(old)
    except OSError as again:
      raise _not_put_back(path, e, again, old) from e
    raise
  shutil.rmtree(old, ignore_errors=True)
  os.rmdir(staging)


def _readme(metadata: dict[str, Any]) -> str:
  names = ", ".join(f"{i} {n}" for i, n in enumerate(metadata["class_names"]))
  return f"""# Fashion-MNIST classifier (fashion_jax export)

Model `{metadata['model']}`, checkpoint step {metadata['step']} ({metadata['why']}), from
`{metadata['workdir']}`. Exported {metadata['created']} with fashion_jax
{metadata['versions']['fashion_jax']}, JAX {metadata['versions']['jax']}, TensorFlow
{metadata['versions']['tensorflow']}, for platforms {', '.join(metadata['platforms'])}.

Input: uint8 pixels 0..255, 28x28, a light garment on a dark background as in Fashion-MNIST
(scaling happens inside the model). Output: class probabilities [batch, 10]; any batch size.
The signatures reject other dtypes; `model.probabilities` converts NumPy input to uint8, so
float images in [0, 1] must be scaled back to 0..255 first.

Classes (label order): {names}. Also in `assets/{CLASS_NAMES_FILE}` and `model.class_names`.

```python
import numpy as np
import tensorflow as tf

model = tf.saved_model.load("{metadata['output']}")
images = np.zeros((4, 28, 28), np.uint8)  # your images, [batch, 28, 28] uint8
probabilities = model.signatures["serving_default"](images=tf.constant(images))["probabilities"]
# or: model.probabilities(images); [batch, 28, 28, 1] inputs: signature "serving_nhwc" or
# model.probabilities_nhwc(images)
names = [n.decode() for n in model.class_names.numpy()]
print([names[i] for i in np.argmax(probabilities, axis=1)])
```

Inspect: `saved_model_cli show --dir {metadata['output']} --all`. The model is one `XlaCallModule`
op (JAX's StableHLO, via jax2tf native serialization), so it runs where TensorFlow has XLA for the
platform it runs on; it is not convertible to TFLite or TF.js. `{METADATA_NAME}` holds the details.
"""


def export(classifier, output: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
           overwrite: bool = False, workdir: str | None = None) -> dict[str, Any]:
  """Writes `classifier` as a SavedModel to `output`; returns the metadata written beside it.

  The export is built in a temporary sibling folder, loaded back and checked
  against JAX, and only then moved to `output`: a failed or interrupted export
  never leaves a half-written model where a working one was.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.model import steps  # pylint: disable=g-import-not-at-top
  platforms = check_platforms(platforms)
  path = check_output(output, overwrite)
  # XLA's ops, whatever model the classifier ran (the native CPU kernels do not serialize).
  classifier = dataclasses.replace(classifier, model=steps.create_model(
      classifier.config, training=False, portable=True))
  tf, _ = savedmodel.import_tf()
  t0 = time.perf_counter()
  parent = None if storage.is_url(path) else os.path.dirname(path)  # gs://: staged locally.
  # Beside the folder, so that one rename swaps it in; inside it where that cannot be (a mount
  # point cannot be renamed; a parent you cannot write to takes no sibling).
  inside = bool(parent) and os.path.isdir(path) and (os.path.ismount(path) or
                                                     not os.access(parent, os.W_OK))
  try:
    if parent:
      os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_INSIDE[0] if inside else
                               f".{os.path.basename(path)}.export-", dir=path if inside else parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private.
  except OSError as e:
    raise UserError(f"cannot write to {path if inside else parent!r} ({e.strerror}); pass an "
                    "--output you can write to") from e
  try:
    with tempfile.TemporaryDirectory() as scratch:
      names_path = os.path.join(scratch, CLASS_NAMES_FILE)
      with open(names_path, "w") as f:
        f.write("\n".join(classifier.class_names) + "\n")
      written = savedmodel.save(classifier, platforms, names_path, staging)
    export_seconds = time.perf_counter() - t0
    backend = jax.default_backend()
    runnable_here = {"gpu": "cuda"}.get(backend, backend) in platforms
    diff = savedmodel.verify(staging, classifier) if runnable_here else None
    config = classifier.config
    metadata = {
        "format": "tensorflow SavedModel (jax2tf native serialization)",
        "output": path,
        "model": config.model,
        "model_kwargs": config.model_kwargs.to_dict(),
        "step": classifier.step,
        "why": classifier.why,
        "workdir": workdir,
        "checkpoint": classifier.checkpoint_dir,
        "ema": bool(config.ema_decay > 0),
        "flip_tta": bool(config.eval_flip_tta),
        "dataset": config.dataset,
        "class_names": list(classifier.class_names),
        "signatures": {
            "serving_default": {"inputs": {savedmodel.INPUT_NAME: "uint8 [batch, 28, 28]"},
                                "outputs": {savedmodel.OUTPUT_NAME: "float32 [batch, 10]"}},
            "serving_nhwc": {"inputs": {savedmodel.INPUT_NAME: "uint8 [batch, 28, 28, 1]"},
                             "outputs": {savedmodel.OUTPUT_NAME: "float32 [batch, 10]"}},
        },
        "functions": ["probabilities", "probabilities_nhwc"],
        "attributes": {"class_names": "tf.Variable string [10]", "step": "tf.Variable int64"},
        "assets": [CLASS_NAMES_FILE],
        "platforms": list(platforms),
        "self_check": ({"batch": 3, "max_abs_diff_vs_jax": diff,
                        "atol": savedmodel.VERIFY_ATOL[classifier.config.compute_dtype]}
                       if diff is not None else
                       f"skipped: this machine's backend {backend!r} is not in --platforms"),
        "versions": {"fashion_jax": fashion_jax.__version__, "jax": jax.__version__,
                     "tensorflow": tf.__version__, **written},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(export_seconds, 3),
    }
    with open(os.path.join(staging, README_NAME), "w") as f:
      f.write(_readme(metadata))
    # Every file of the export, so --overwrite can tell them from anything added beside them.
    metadata["files"] = sorted([*_relative_files(staging), METADATA_NAME])
    with open(os.path.join(staging, METADATA_NAME), "w") as f:
      json.dump(metadata, f, indent=2)
      f.write("\n")
    check_output(path, overwrite)  # Again: something may have appeared meanwhile.
    _move_into_place(staging, path)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return metadata


def export_run(workdir: str, output: str, step: int | None = None,
               platforms: Sequence[str] = DEFAULT_PLATFORMS, overwrite: bool = False
               ) -> dict[str, Any]:
  """Loads a run's checkpoint (as `fashion_jax.serving.inference.load` chooses it) and exports it."""
  check_platforms(platforms)  # Before the slow part: fail fast on wrong flags.
  check_output(output, overwrite)
  from fashion_jax.serving import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  classifier = inference.load(workdir, step, portable=True)
  return export(classifier, output, platforms, overwrite,
                workdir=storage.resolve(workdir, "--workdir"))


def main(argv):
  cli.quiet_console()
  cli.refuse_arguments(argv)
  try:
    metadata = export_run(FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.platforms,
                          FLAGS.overwrite)
  except UserError as e:
    cli.fail(str(e))
  check = metadata["self_check"]
  print(f"exported {metadata['model']} step {metadata['step']} to {metadata['output']} in "
        f"{metadata['seconds']:.1f}s for {', '.join(metadata['platforms'])}")
  print(f"checkpoint: {metadata['why']}")
  print("self-check vs JAX: " + (f"max |diff| {check['max_abs_diff_vs_jax']:.2g}"
                                 if isinstance(check, dict) else check))
  print(f"call: tf.saved_model.load({metadata['output']!r}).signatures['serving_default']"
        f"(images=uint8 [batch, 28, 28]) -> {{'probabilities': [batch, 10]}}; see README.md")

