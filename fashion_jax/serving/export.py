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
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

import fashion_jax
from fashion_jax import cli
from fashion_jax.serving import export_folder
from fashion_jax.serving import savedmodel
from fashion_jax.support import faults
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

FLAGS = flags.FLAGS

METADATA_NAME = export_folder.METADATA_NAME
README_NAME = export_folder.README_NAME
check_output = export_folder.check_output
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


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """--platforms as jax2tf wants them: known names, no duplicates, at least one."""
  platforms = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise UserError(f"--platforms={','.join(platforms)} is invalid; pass a comma-separated subset "
                    f"of {', '.join(KNOWN_PLATFORMS)} (NVIDIA GPUs are cuda)")
  return platforms


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
  with export_folder.staged(path) as stage:
    staging = stage.folder
    with tempfile.TemporaryDirectory() as scratch:
      stage.scratch.append(scratch)
      names_path = os.path.join(scratch, CLASS_NAMES_FILE)
      with open(names_path, "w") as f:
        f.write("\n".join(classifier.class_names) + "\n")
      written = savedmodel.save(classifier, platforms, names_path, staging)
      faults.maybe_signal("export_saved")  # Tests: SIGTERM while the export is staged.
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
    metadata["files"] = sorted([*export_folder.relative_files(staging), METADATA_NAME])
    with open(os.path.join(staging, METADATA_NAME), "w") as f:
      json.dump(metadata, f, indent=2)
      f.write("\n")
    check_output(path, overwrite)  # Again: something may have appeared meanwhile.
    stage.move_in(path)
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

