"""The SavedModel itself: the classifier as a tf.Module whose computation is one XlaCallModule op
(jax2tf native serialization), written for the StableHLO version and calling convention the
installed TensorFlow runs, and loaded back to check it against JAX. `export` (the command's
module) decides where it goes.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import re
from collections.abc import Sequence

import numpy as np

from fashion_jax.support import backends
from fashion_jax.support.errors import UserError

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# The exported model must agree with JAX's to the compute dtype's rounding; the self-check refuses
# more. bfloat16 keeps 8 significant bits, and XLA's programs for different batch sizes (the
# export's and JAX's padded one) round differently: probabilities 3-5e-3 apart were measured.
VERIFY_ATOL = {"float32": 1e-5, "bfloat16": 2e-2}


def import_tf():
  """(tensorflow, jax2tf), or a UserError naming the extra to install."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"export needs TensorFlow ({e}); pip install 'fashion_jax[tf]' (or "
                    "tensorflow)") from e
  backends.tensorflow_shares_the_gpu(tf)
  return tf, jax2tf


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split("."))


def tensorflow_stablehlo_version() -> str | None:
  """The newest StableHLO version this TensorFlow's XlaCallModule can read, or None if it
  does not say (then JAX's own choice stands, and the self-check catches a mismatch)."""
  try:
    from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=g-import-not-at-top
    version = stablehlo.get_current_version()
    _version_tuple(version)
  except Exception:  # pylint: disable=broad-except  (an internal module: absent, moved, changed)
    return None
  return version


@contextlib.contextmanager
def stablehlo_readable_by(version: str | None):
  """Serializes the exported StableHLO for a reader of `version` where JAX's default is newer.

  JAX writes the portable artifact for the StableHLO version of four weeks before its release,
  while a TensorFlow reads only up to the version it was built with: jax 0.12 writes 1.18 (its
  shape assertion as `vhlo.custom_call_v2`) and TensorFlow 2.21 reads up to 1.13.7, so the
  SavedModel failed to load ("failed to deserialize portable artifact"). The version JAX picks
  has no public setting; the function that picks it is capped here, for this export only.
  Yields the version written (None: JAX's choice, unknown)."""
  try:
    from jax._src.export import _export  # pylint: disable=g-import-not-at-top
    pick = _export.hlo.get_version_from_compatibility_requirement
    default = pick(_export.hlo.StablehloCompatibilityRequirement.WEEK_4)
    _version_tuple(default)
  except Exception:  # pylint: disable=broad-except  (a JAX whose internals moved: its choice)
    yield None
    return
  if version is None or _version_tuple(version) >= _version_tuple(default):
    yield default
    return

  def capped(requirement):
    chosen = pick(requirement)
    return version if _version_tuple(chosen) > _version_tuple(version) else chosen

  _export.hlo.get_version_from_compatibility_requirement = capped
  try:
    yield version
  finally:
    _export.hlo.get_version_from_compatibility_requirement = pick


def tensorflow_calling_convention_version() -> int | None:
  """The newest jax.export calling convention this TensorFlow's XlaCallModule runs (what
  jax2tf itself checks), or None if it does not say."""
  try:
    from tensorflow.compiler.tf2xla.python import xla as tfxla  # pylint: disable=g-import-not-at-top
    return int(tfxla.call_module_maximum_supported_version())
  except Exception:  # pylint: disable=broad-except  (an internal module: absent, moved, changed)
    return None


@contextlib.contextmanager
def calling_convention_at_most(version: int | None):
  """jax.export's calling convention (a public JAX setting) lowered to `version` for this export
  where JAX's default is newer and JAX can still write it: jax 0.10 writes 10 by default, and
  TensorFlow 2.18 runs up to 9 (jax2tf refused: "supports up to serialization version 9 but the
  serialized module needs version 10"). Yields the version written."""
  import jax  # pylint: disable=g-import-not-at-top
  default = jax.config.jax_export_calling_convention_version
  try:
    from jax._src.export import _export  # pylint: disable=g-import-not-at-top
    oldest = _export.minimum_supported_calling_convention_version
  except Exception:  # pylint: disable=broad-except  (a JAX whose internals moved)
    oldest = default
  if version is None or version >= default or version < oldest:
    yield default  # (Below what JAX can write: jax2tf's own refusal, made one line by export.)
    return
  jax.config.update("jax_export_calling_convention_version", version)
  try:
    yield version
  finally:
    jax.config.update("jax_export_calling_convention_version", default)


def _variable_name(path) -> str:
  """A Flax parameter path as a variable name, e.g. "params/Conv_0/kernel"."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.keystr(path, simple=True, separator="/")


def build_module(classifier, platforms: Sequence[str], class_names_path: str):
  """A tf.Module wrapping the classifier: parameters as tf.Variables, JAX code as one XLA op."""
  import jax  # pylint: disable=g-import-not-at-top
  tf, jax2tf = import_tf()

  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(classifier.variables)
  module = tf.Module(name="fashion_jax")
  # A list of variables is tracked by tf.Module and saved to variables/; names show the Flax path.
  module.model_variables = [
      tf.Variable(np.asarray(leaf), trainable=False, name=_variable_name(path))
      for path, leaf in leaves_with_paths]

  def probabilities_jax(variables, images):
    return jax.nn.softmax(classifier.apply_uint8(variables, images), axis=-1)

  converted = jax2tf.convert(
      probabilities_jax,
      polymorphic_shapes=[None, "(batch, 28, 28)"],  # Parameters fixed; batch symbolic.
      with_gradient=False,  # Inference only: no VJP to serialize.
      native_serialization_platforms=tuple(platforms))

  num_classes = len(classifier.class_names)

  def run(images):
    def apply():
      variables = jax.tree_util.tree_unflatten(treedef, module.model_variables)
      return converted(variables, images)
    # A symbolic dimension is >= 1 (the serialized module asserts it); answer an empty batch
    # with an empty result rather than an error.
    result = tf.cond(tf.shape(images)[0] > 0, apply,
                     lambda: tf.zeros([0, num_classes], tf.float32))
    return tf.ensure_shape(result, [None, num_classes])

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def probabilities(images):
    return run(images)

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def probabilities_nhwc(images):
    return run(images[..., 0])

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def serving_default(images):
    return {OUTPUT_NAME: probabilities(images)}

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def serving_nhwc(images):
    return {OUTPUT_NAME: probabilities_nhwc(images)}

  module.probabilities = probabilities
  module.probabilities_nhwc = probabilities_nhwc
  # Variables, not tf.constant attributes: SavedModel keeps only tracked objects, and a
  # constant that no function uses is not one.
  module.class_names = tf.Variable(list(classifier.class_names), trainable=False,
                                   name="class_names")
  module.step = tf.Variable(classifier.step, trainable=False, dtype=tf.int64, name="step")
  module.class_names_file = tf.saved_model.Asset(class_names_path)
  signatures = {"serving_default": serving_default.get_concrete_function(),
                "serving_nhwc": serving_nhwc.get_concrete_function()}
  return module, signatures


# What TensorFlow's XlaCallModule (and jax2tf) say when the module is newer than it runs.
_TOO_NEW = ("deserialize portable artifact", "is not supported by this build",
            "supports up to serialization version",
            "Cannot deserialize computation")  # (TensorFlow 2.18 says only this.)


def _too_new_message(tf, text: str) -> str:
  """The one line for TensorFlow's refusal `text` of a module newer than it runs."""
  import jax  # pylint: disable=g-import-not-at-top
  produced = re.search(r"produced by: StableHLO_v([\d.]+\d)", text)
  reads = re.search(r"using StableHLO_v([\d.]+\d)", text)
  convention = re.search(r"supports up to serialization version (\d+) but the serialized "
                         r"module needs version (\d+)", text)
  if produced and reads:
    reason = f"it is StableHLO {produced.group(1)}, this TensorFlow reads up to {reads.group(1)}"
  elif convention:
    reason = (f"it needs calling convention {convention.group(2)}, this TensorFlow runs up to "
              f"{convention.group(1)}")
  else:
    reason = next(line.strip() for line in text.splitlines()
                  if any(sign in line for sign in _TOO_NEW))[:200]
  return (f"TensorFlow {tf.__version__} cannot run the model JAX {jax.__version__} wrote "
          f"({reason}); install a TensorFlow released after this JAX (pip install -U "
          "tensorflow) or export with the JAX this TensorFlow came with; nothing was written to "
          "--output")


@contextlib.contextmanager
def _too_new_is_one_line(tf):
  """jax2tf's (while building) or XlaCallModule's (while running) refusal of a module newer than
  this TensorFlow runs, as a UserError; any other error as it is."""
  try:
    yield
  except (NotImplementedError, tf.errors.InvalidArgumentError) as e:
    if not any(sign in str(e) for sign in _TOO_NEW):
      raise
    raise UserError(_too_new_message(tf, str(e))) from e


def save(classifier, platforms: Sequence[str], class_names_path: str, folder: str) -> dict:
  """Writes the SavedModel into `folder`, serialized for what this TensorFlow runs; returns the
  versions written ({"stablehlo": ..., "calling_convention": ...}; None where unknown)."""
  tf, _ = import_tf()
  with (stablehlo_readable_by(tensorflow_stablehlo_version()) as stablehlo,
        calling_convention_at_most(tensorflow_calling_convention_version()) as convention):
    with _too_new_is_one_line(tf):
      module, signatures = build_module(classifier, platforms, class_names_path)
    with logging_levels_kept():
      tf.saved_model.save(module, folder, signatures=signatures)
  return {"stablehlo": stablehlo, "calling_convention": convention}


def verify(saved_dir: str, classifier, batch: int = 3, seed: int = 0) -> float:
  """Loads the SavedModel back and compares it with JAX on `batch` images; returns max |diff|.

  Random pixels plus an all-black and an all-white image: inputs of every
  brightness, and nothing that needs the data set to be present.
  """
  tf, _ = import_tf()
  images = np.random.default_rng(seed).integers(0, 256, size=(batch, 28, 28), dtype=np.uint8)
  images[0] = 0
  images[-1] = 255
  loaded = tf.saved_model.load(saved_dir)
  with _too_new_is_one_line(tf):
    exported = loaded.signatures["serving_default"](**{INPUT_NAME: tf.constant(images)})
  exported = exported[OUTPUT_NAME].numpy()
  expected = classifier.probabilities(images)
  diff = float(np.abs(exported - expected).max())
  atol = VERIFY_ATOL[classifier.config.compute_dtype]
  top2 = np.sort(expected, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 2 * atol  # Near-ties may flip within tolerance.
  same_class = np.array_equal(exported.argmax(1)[clear], expected.argmax(1)[clear])
  if not diff <= atol or not same_class:
    raise UserError(f"the exported model disagrees with JAX (max |diff| {diff:.3g} > "
                    f"{atol} for {classifier.config.compute_dtype}, or another argmax), so "
                    "nothing was written to --output; try another TensorFlow version, or "
                    "--platforms without this machine's backend to skip the check")
  return diff


@contextlib.contextmanager
def logging_levels_kept():
  """TensorFlow's SavedModel writer silences absl while it walks the module and then sets absl's
  verbosity to the level that was in effect: where nothing had set one (a notebook, a test, any
  program calling export() in-process), absl's logger is left at WARNING, and the caller's INFO
  lines (training's progress, its notes) vanish from then on. The levels are put back as found."""
  loggers = (logging_std.getLogger("absl"), logging_std.getLogger())
  levels = [logger.level for logger in loggers]
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
