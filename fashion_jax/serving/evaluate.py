r"""Evaluates a trained run on the full test set: metrics, a confusion matrix, its worst mistakes.

  python -m fashion_jax.evaluate --workdir=/tmp/fj [--output_dir=DIR] [--step=N] \
      [--idx_dir=FOLDER | --data_dir=DIR] [--num_mistakes=25]

Writes to --output_dir (default WORKDIR/evaluation):
  evaluation.json       accuracy, loss, per-class precision/recall/F1/support, macro
                        averages, the confusion matrix (rows = true class, columns =
                        predicted), the checkpoint step and why it was chosen, the data
                        source, counts, and training's own eval of that step
  confusion_matrix.png  counts, coloured by row-normalised fraction
  mistakes.png          the most confident misclassifications
and prints a per-class table.

The checkpoint is chosen, restored and applied exactly as in `fashion_jax.serving.inference`
(EMA parameters, BatchNorm statistics, flip TTA as the run evaluated), and the test set is
batched at the run's `eval_batch_size`, so the accuracy is the one training's evaluation logged
for that step (`eval_accuracy` in metrics.jsonl); the JSON records both.

The test data comes from the run's config.json unless --idx_dir (an IDX folder) or --data_dir
(a tensorflow-datasets data dir) is given: a run trained with a relative `idx_dir` can then be
evaluated from anywhere. A run trained from $FASHION_JAX_IDX_DIR, evaluated where it is not
set, reads the folder config.json records, if no other user could have written it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import flags
import numpy as np

import fashion_jax  # Records the process start time first.
from fashion_jax import cli
from fashion_jax.serving import export_folder
from fashion_jax.support import errors
from fashion_jax.support.errors import UserError
from fashion_jax.support import metric_writers
from fashion_jax.support import storage

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Registers the CLI flags; called only when run as a program (not at import: the functions
  here are a library too, beside other entry points defining flags of the same names)."""
  flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
  flags.DEFINE_string("output_dir", None, "Where to write the report (default WORKDIR/evaluation).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation, else latest).")
  flags.DEFINE_string("idx_dir", None,
                      "IDX folder with the test files (default: the run's config).")
  flags.DEFINE_string("data_dir", None, "tensorflow-datasets data dir; reads the test split via "
                      "tfds instead of the run's IDX folder.")
  flags.DEFINE_integer("num_mistakes", 25, "How many of the most confident mistakes to draw "
                       "(0 to 100).")


JSON_NAME = "evaluation.json"
MAX_MISTAKES = 100  # Drawn 5 a row: 20 rows at most.
CONFUSION_NAME = "confusion_matrix.png"
MISTAKES_NAME = "mistakes.png"
RECORDED_SOURCE = "config.json's _derived.data_source"
STAGING_PREFIX = ".fashion_jax_evaluation_"  # The figures' hidden folder in --output_dir.


# ----------------------------------------------------------------------------------------------
# Metrics (numpy only: a 10x10 confusion matrix needs no scikit-learn).


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [num_classes, num_classes]: rows are true classes, columns predicted ones."""
  labels = np.asarray(labels, np.int64)
  predictions = np.asarray(predictions, np.int64)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ")
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes}), got "
                       f"[{values.min()}, {values.max()}]")
  flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                   where=denominator != 0)


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
  """Accuracy, per-class precision/recall/F1/support and their macro averages.

  Everything is derived from the confusion matrix, so the numbers in the JSON
  are consistent with the matrix by construction. Undefined ratios (a class
  never predicted, or absent from the labels) count as 0, as scikit-learn
  does with zero_division=0. The macro average is over the classes that occur
  in the labels or the predictions -- scikit-learn's default label set --
  which on the full test set is every class.
  """
  confusion = np.asarray(confusion, np.int64)
  true_positives = np.diag(confusion)
  support = confusion.sum(axis=1)  # Per true class.
  predicted = confusion.sum(axis=0)  # Per predicted class.
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, support)
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  present = (support > 0) | (predicted > 0)
  total = int(support.sum())
  macro = {name: float(values[present].mean()) if present.any() else 0.0
           for name, values in (("precision", precision), ("recall", recall), ("f1", f1))}
  macro["support"] = total
  macro["classes"] = int(present.sum())
  return {
      "accuracy": float(true_positives.sum()) / total if total else 0.0,
      "correct": int(true_positives.sum()),
      "count": total,
      "precision": precision, "recall": recall, "f1": f1,
      "support": support, "predicted": predicted,
      "macro_avg": macro,
  }


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-example softmax cross-entropy, in float64 (a stable log-sum-exp)."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=1, keepdims=True)
  log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  return log_norm - logits[np.arange(len(labels)), labels]


def top_confusions(confusion: np.ndarray, class_names, n: int = 5) -> list[dict[str, Any]]:
  """The n largest off-diagonal cells: the mistakes the model makes most often."""
  off = np.array(confusion, np.int64)
  np.fill_diagonal(off, 0)
  order = np.argsort(-off, axis=None, kind="stable")[:n]
  result = []
  for flat in order:
    i, j = divmod(int(flat), off.shape[1])
    if off[i, j] == 0:
      break
    result.append({"true": class_names[i], "predicted": class_names[j], "count": int(off[i, j]),
                   "fraction_of_true": float(off[i, j] / max(confusion[i].sum(), 1))})
  return result


# ----------------------------------------------------------------------------------------------
# Data and the training run's own record.


def _first_missing(folder: str) -> str | None:
  """The outermost folder of the local path `folder` that does not exist yet (None: it does)."""
  if storage.is_url(folder):
    return None
  folder, missing = os.path.abspath(os.path.expanduser(folder)), None
  while not os.path.exists(folder):
    folder, missing = os.path.dirname(folder), folder
  return missing


def _remove_empty(root: str) -> None:
  """Removes `root` and the folders below it that hold nothing but tfds locks of this project."""
  lock = lambda name: name.startswith(".fashion_jax-tfds-") and name.endswith(".lock")
  for folder, _, _ in os.walk(root, topdown=False):
    try:
      entries = os.listdir(folder)
      if not all(lock(name) for name in entries):
        continue  # Something else is there: kept, its locks too.
      for name in entries:
        os.remove(os.path.join(folder, name))
      os.rmdir(folder)
    except OSError:
      pass


def _test_data(config, idx_dir: str | None, data_dir: str | None, workdir: str | None = None):
  """(Split, description of the source). Overrides beat the run's config.json; without them or
  $FASHION_JAX_IDX_DIR, the IDX folder training recorded it read (a shell without the variable
  had tried tfds or the download instead: offline, an error)."""
  from fashion_jax.data import download, input_pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.serving import inference  # pylint: disable=g-import-not-at-top
  if idx_dir and data_dir:
    raise UserError("pass --idx_dir (an IDX folder) or --data_dir (tensorflow-datasets), not both")
  data_config = copy.deepcopy(config)
  if idx_dir:
    data_config.idx_dir, origin = idx_dir, "--idx_dir"
  elif data_dir:
    data_config.idx_dir, data_config.data_dir, origin = "", data_dir, "--data_dir"
  else:
    origin = "config.json"
    recorded, unsafe = (inference.recorded_idx_folder(workdir) if (
        workdir and not config.idx_dir and not config.data_dir
        and not os.environ.get(input_pipeline.IDX_ENV)) else (None, None))
    if recorded:
      data_config.idx_dir, origin = recorded, RECORDED_SOURCE
      print(f"fashion_jax: ${input_pipeline.IDX_ENV} is not set: reading the test set from "
            f"{recorded}, the IDX folder training read (config.json records it)", file=sys.stderr)
    elif unsafe:  # (Then the error of the source below says what to pass.)
      print(f"fashion_jax: not reading the IDX folder training read: {unsafe}", file=sys.stderr)
  if data_config.idx_dir:
    folder = (storage.resolve(data_config.idx_dir, origin) if storage.is_url(data_config.idx_dir)
              else os.path.abspath(os.path.expanduser(data_config.idx_dir)))
    if not storage.isdir(folder):
      relative = ("" if storage.is_url(folder) or os.path.isabs(os.path.expanduser(
          data_config.idx_dir)) else f", relative to the current directory {os.getcwd()}")
      hint = ("pass --idx_dir=FOLDER with the IDX test files (or --data_dir=DIR for "
              "tensorflow-datasets)" if origin == "config.json" else "pass an existing folder")
      what = "is a file, not a folder" if storage.exists(folder) else "does not exist"
      raise UserError(f"test data folder {data_config.idx_dir!r} (from {origin}{relative}) "
                      f"{what}; {hint}")
    data_config.idx_dir = folder
    source = {"type": "idx", "idx_dir": folder, "from": origin}
    where = None
  else:
    where = input_pipeline.source(data_config)  # $FASHION_JAX_IDX_DIR, tfds or the download.
    if where.origin.startswith("$"):
      origin = where.origin
    source = {"type": where.kind, "dataset": data_config.dataset, "location": where.location,
              "description": where.describe(), "from": origin}
  created = _first_missing(data_dir) if data_dir and origin == "--data_dir" else None
  try:
    split = input_pipeline.load(data_config, "test", where)
  except UserError as e:  # The data layer's hint names training's flag; this command has its own.
    if created:  # What tfds and its lock made of a --data_dir that was not there: nothing kept.
      _remove_empty(created)
    message = str(e)
    if origin == "--data_dir":  # $FASHION_JAX_IDX_DIR is not read when --data_dir is given.
      message = message.replace(download.OFFLINE_HINT, download.FLAG_HINT)
    message = message.replace(download.IDX_FLAG_HINT, "--idx_dir=FOLDER holding the IDX test files")
    raise UserError(message.replace("--config.idx_dir", "--idx_dir")
                    .replace("--config.data_dir", "--data_dir")) from e
  source.update(split="test", count=len(split))
  return split, source


def _training_eval(workdir: str, step: int) -> dict[str, Any] | None:
  """What training's own evaluation logged at `step` (the last such line), if anything."""
  found = None
  for record in metric_writers.read_lines(workdir):
    if record.get("step") == step and "eval_accuracy" in record:
      found = {"step": step, "eval_accuracy": record["eval_accuracy"],
               "eval_loss": record.get("eval_loss")}
  return found




# ----------------------------------------------------------------------------------------------
# The evaluation.


def _check_num_mistakes(num_mistakes: int) -> None:
  if not 0 <= num_mistakes <= MAX_MISTAKES:  # 100,000 took minutes and gigabytes, unfinished.
    raise UserError(f"--num_mistakes={num_mistakes} is invalid; pass 0 to {MAX_MISTAKES} (the "
                    "figure draws 5 a row; evaluation.json lists the same ones)")


def evaluate(workdir: str, output_dir: str | None = None, step: int | None = None,
             idx_dir: str | None = None, data_dir: str | None = None,
             num_mistakes: int = 25) -> dict[str, Any]:
  """Evaluates a run's checkpoint on the whole test split; writes the report; returns the JSON.

  Raises UserError for anything the user can fix (no run, no checkpoint,
  missing data, unwritable output).
  """
  errors.require("matplotlib", "matplotlib", "serve", "python -m fashion_jax.evaluate (its figures)")
  _check_num_mistakes(num_mistakes)
  from fashion_jax.serving import inference  # pylint: disable=g-import-not-at-top  (imports JAX)
  from fashion_jax.serving import report  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  t0 = time.perf_counter()
  workdir = storage.resolve(workdir, "--workdir")
  classifier = inference.load(workdir, step)
  # The run's eval batch: the same compiled shape as training's evaluation, hence the same
  # logits, bit for bit, and the same accuracy.
  classifier = dataclasses.replace(classifier, batch_size=int(classifier.config.eval_batch_size))
  output_dir = output_dir or storage.join(workdir, "evaluation")
  new_output = not storage.exists(storage.resolve(output_dir, "--output_dir"))
  output_dir = storage.ensure_writable_dir(output_dir, "--output_dir")  # Before minutes of work.
  try:
    split, source = _test_data(classifier.config, idx_dir, data_dir, workdir)
  except UserError:
    if new_output:  # No data: no report, and no empty folder left for one.
      storage.remove_if_empty(output_dir)
    raise
  load_seconds = time.perf_counter() - t0

  t1 = time.perf_counter()
  logits = classifier.logits(split.images, scan=True)  # As training's evaluation runs.
  inference_seconds = time.perf_counter() - t1

  names = list(classifier.class_names)
  labels = split.labels.astype(np.int64)
  predictions = logits.argmax(axis=1)
  confusion = confusion_matrix(labels, predictions, len(names))
  metrics = metrics_from_confusion(confusion)
  losses = cross_entropy(logits, labels)
  shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
  probabilities = shifted / shifted.sum(axis=1, keepdims=True)
  confidence = probabilities[np.arange(len(labels)), predictions]

  wrong = np.flatnonzero(predictions != labels)
  worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:num_mistakes]

  model_name, accuracy = classifier.config.model, metrics["accuracy"]
  # The report is made aside (a hidden folder in a local --output_dir), then moved into place,
  # evaluation.json last: an interruption while drawing (seconds, or minutes for big grids) or a
  # full disk leaves the previous report whole; locally the previous JSON goes first (a bucket's
  # stays during the uploads). A killed evaluation's folder goes once it is stale.
  if not storage.is_url(output_dir):
    export_folder.remove_stale(output_dir, STAGING_PREFIX)
  drawn = tempfile.mkdtemp(prefix=STAGING_PREFIX,
                           dir=None if storage.is_url(output_dir) else output_dir)
  try:
    report.plot_confusion_matrix(
        confusion, names, path=os.path.join(drawn, CONFUSION_NAME),
        title=(f"{model_name} · step {classifier.step} · test accuracy {100 * accuracy:.2f}% "
               f"({metrics['correct']:,} / {metrics['count']:,})"))
    report.plot_mistakes(
        split.images[worst], labels[worst], predictions[worst], confidence[worst], worst, names,
        path=os.path.join(drawn, MISTAKES_NAME),
        title=(f"Most confident mistakes: {len(worst)} of {len(wrong):,} errors "
               f"({model_name}, step {classifier.step})"),
        empty="none drawn (--num_mistakes=0)" if len(wrong) else "no misclassified test images")
    result = _report(classifier, workdir, source, metrics, losses, names, confusion, wrong,
                     worst, labels, predictions, confidence, output_dir,
                     {"load": round(load_seconds, 3), "inference": round(inference_seconds, 3),
                      "total": round(time.perf_counter() - t0, 3)})
    storage.write_text(os.path.join(drawn, JSON_NAME), json.dumps(result, indent=2) + "\n",
                       "free some space or pass another --output_dir")
    if not storage.is_url(output_dir) and os.path.lexists(os.path.join(output_dir, JSON_NAME)):
      os.remove(os.path.join(output_dir, JSON_NAME))
    for name in (CONFUSION_NAME, MISTAKES_NAME, JSON_NAME):
      if storage.is_url(output_dir):
        storage.put_file(os.path.join(drawn, name), storage.join(output_dir, name))
      else:
        os.replace(os.path.join(drawn, name), os.path.join(output_dir, name))
  except OSError as e:  # A folder where a figure goes, another user's file in /tmp, a full disk.
    where = getattr(e, "filename2", None) or getattr(e, "filename", None) or output_dir
    raise storage.out_of_space(output_dir, e, "free some space or pass another --output_dir") or \
        UserError(f"cannot write the report into {output_dir} ({e.strerror or e}: {where}); "
                  "move that away or pass another --output_dir") from e
  finally:
    shutil.rmtree(drawn, ignore_errors=True)
  return result


def _report(classifier, workdir, source, metrics, losses, names, confusion, wrong, worst, labels,
            predictions, confidence, output_dir, seconds) -> dict[str, Any]:
  """evaluation.json's content."""
  config, accuracy = classifier.config, metrics["accuracy"]
  model_name = config.model
  training_eval = _training_eval(workdir, classifier.step)
  return {
      "model": model_name,
      "workdir": workdir,
      "checkpoint": {"step": classifier.step, "why": classifier.why,
                     "path": classifier.checkpoint_dir,
                     "ema": bool(config.ema_decay > 0), "flip_tta": bool(config.eval_flip_tta)},
      "data": source,
      "counts": {"examples": metrics["count"], "correct": metrics["correct"],
                 "errors": int(len(wrong))},
      "accuracy": accuracy,
      "loss": float(losses.mean()) if len(losses) else 0.0,
      "class_names": names,
      "per_class": [{"index": i, "name": name, "precision": float(metrics["precision"][i]),
                     "recall": float(metrics["recall"][i]), "f1": float(metrics["f1"][i]),
                     "support": int(metrics["support"][i]),
                     "predicted": int(metrics["predicted"][i])}
                    for i, name in enumerate(names)],
      "macro_avg": metrics["macro_avg"],
      "confusion_matrix": confusion.tolist(),
      "confusion_matrix_axes": "rows: true class, columns: predicted class (label order)",
      "top_confusions": top_confusions(confusion, names),
      "most_confident_mistakes": [
          {"test_index": int(i), "true": names[labels[i]], "predicted": names[predictions[i]],
           "confidence": float(confidence[i])} for i in worst],
      "training_eval": training_eval,
      "matches_training_eval": (None if training_eval is None
                                else training_eval["eval_accuracy"] == accuracy),
      "files": {"confusion_matrix": storage.join(output_dir, CONFUSION_NAME),
                "mistakes": storage.join(output_dir, MISTAKES_NAME)},
      "seconds": seconds,
      "eval_batch_size": classifier.batch_size,
      "fashion_jax_version": fashion_jax.__version__,
  }


def format_report(result: dict[str, Any]) -> str:
  """The human-readable summary printed by the CLI: a per-class table and the headline numbers."""
  width = max(len("macro avg"), *(len(c["name"]) for c in result["per_class"]))
  checkpoint, data = result["checkpoint"], result["data"]
  where = f"IDX {data['idx_dir']}" if "idx_dir" in data else data["description"]
  via = "" if data["from"] in where else f" (via {data['from']})"  # (Named twice, it was.)
  lines = [f"{result['model']}, checkpoint step {checkpoint['step']}: {checkpoint['why']}",
           f"test set: {data['count']:,} images from {where}{via}", "",
           f"{'class':<{width}}  precision  recall      f1  support  predicted"]
  for c in result["per_class"]:
    lines.append(f"{c['name']:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  "
                 f"{c['f1']:6.4f}  {c['support']:7d}  {c['predicted']:9d}")
  macro = result["macro_avg"]
  lines.append(f"{'macro avg':<{width}}  {macro['precision']:9.4f}  {macro['recall']:6.4f}  "
               f"{macro['f1']:6.4f}  {macro['support']:7d}")
  counts = result["counts"]
  lines += ["", f"accuracy {100 * result['accuracy']:.2f}% ({counts['correct']:,} / "
                f"{counts['examples']:,}), loss {result['loss']:.4f}"]
  trained = result["training_eval"]
  if trained is None:
    lines.append(f"training logged no eval at step {checkpoint['step']} (metrics.jsonl)")
  else:
    if result["matches_training_eval"]:
      verdict = "same"
    elif not data["from"].startswith("config.json"):
      verdict = f"differs: this evaluation used other test data ({data['from']})"
    else:
      verdict = "DIFFERS: the test data changed since training, or the checkpoint was replaced"
    lines.append(f"training's eval at step {trained['step']}: accuracy "
                 f"{100 * trained['eval_accuracy']:.2f}% ({verdict})")
  if result["top_confusions"]:
    lines.append("most frequent confusions: " + "; ".join(
        f"{c['true']} -> {c['predicted']} {c['count']}" for c in result["top_confusions"][:3]))
  output_dir = result["files"]["confusion_matrix"].rsplit("/", 1)[0]
  lines.append(f"wrote {JSON_NAME}, {CONFUSION_NAME}, {MISTAKES_NAME} to {output_dir}")
  return "\n".join(lines)


def main(argv):
  cli.refuse_arguments(argv)  # Its flags' mistakes (--help too) are said before JAX's import.
  try:
    _check_num_mistakes(FLAGS.num_mistakes)
  except UserError as e:
    cli.fail(str(e))
  from fashion_jax.support import compile_cache  # pylint: disable=g-import-not-at-top  (JAX)
  cli.quiet_console()
  compile_cache.enable()  # GPU/TPU only: the evaluation's compile, once.
  try:
    result = evaluate(FLAGS.workdir, FLAGS.output_dir, FLAGS.step, FLAGS.idx_dir, FLAGS.data_dir,
                      FLAGS.num_mistakes)
  except UserError as e:
    cli.fail(str(e))
  print(format_report(result))

