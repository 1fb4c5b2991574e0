"""The train-and-evaluate loop: data, state restore, windows of steps, checkpoints, evals, stops.

The step functions it runs are in steps.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

import fashion_jax
from fashion_jax import augment
from fashion_jax import checkpointing
from fashion_jax import config_lib
from fashion_jax import datasets
from fashion_jax import errors
from fashion_jax import faults
from fashion_jax import input_pipeline
from fashion_jax import loop
from fashion_jax import metric_writers
from fashion_jax import parallel as parallel_lib
from fashion_jax import progress
from fashion_jax import steps
from fashion_jax import stops
from fashion_jax.errors import UserError


def _write_config(workdir: str, config: ml_collections.ConfigDict, derived: dict) -> None:
  resolved = json.loads(config.to_json_best_effort())
  resolved["_derived"] = derived
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
    f.write("\n")


def _summarize(sums: dict, prefix: str) -> dict:
  count = max(float(sums["count"]), 1.0)
  return {f"{prefix}_loss": float(sums["loss_sum"]) / count,
          f"{prefix}_accuracy": float(sums["correct"]) / count}


class Evaluator:
  """Exact evaluation of a split: every example once, padding masked out.

  The padded split stays on the device(s) from the start (each process holds
  its part of every batch), and an evaluation is one dispatch.
  """

  def __init__(self, split, config, model, parallel: parallel_lib.Parallel):
    parallel.check_batch(config.eval_batch_size, "eval_batch_size")
    self.split, self.parallel = split, parallel
    batches = list(input_pipeline.eval_batches(split, config.eval_batch_size,
                                               parallel.process_index, parallel.process_count))
    self._batches = parallel.put_batch(input_pipeline.stack(batches), stacked=True)
    self._sums = parallel.compile(
        functools.partial(steps.eval_sums, model=model, flip_tta=config.eval_flip_tta),
        donate_state=False, stacked=True)

  def __call__(self, state, show_progress: bool = False, desc: str = "eval") -> dict:
    with progress.Bar(show_progress, len(self.split), desc=desc, leave=False) as bar:
      total = self.parallel.fetch(self._sums(state, self._batches))
      bar.update(len(self.split))
    return total


class SamplePredictions:
  """A fixed handful of test images with the model's predictions, for TensorBoard.

  Runs on process 0's first device from a host copy of the parameters, so it
  needs no collectives and works the same in every parallel mode.
  """

  def __init__(self, split, count: int, model: nn.Module, parallel: parallel_lib.Parallel,
               class_names):
    self.images, self.labels = split.images[:count], split.labels[:count]
    self.parallel, self.class_names = parallel, class_names
    self._apply = jax.jit(lambda variables, images: jax.nn.softmax(
        steps.eval_logits(model, variables, images)))

  def __call__(self, state):
    variables = self.parallel.fetch(steps.eval_variables(state.params, state.batch_stats,
                                                   state.ema_params, state.ema_batch_stats))
    probabilities = np.asarray(self._apply(variables, self.images))
    return metric_writers.prediction_figure(self.images, self.labels, probabilities,
                                            self.class_names)


# What fixes a run's data order, learning-rate schedule, update rule and model: a resume
# that would change any of them is refused (keys that change nothing -- logging, eval and
# checkpoint intervals, op formulations, placement, parallelism -- may change).
FINGERPRINT_KEYS = (
    "dataset", "seed", "batch_size", "validation_size", "augment_translate", "augment_flip",
    "random_erasing", "model", "model_kwargs", "compute_dtype", "optimizer", "learning_rate",
    "lr_schedule", "warmup_steps", "weight_decay", "momentum", "label_smoothing", "ema_decay")


def fingerprint(config: ml_collections.ConfigDict, train_examples: int, total_steps: int) -> dict:
  """The values of FINGERPRINT_KEYS, the train split's size, and the total steps where the
  schedule depends on them (cosine/onecycle, or a warmup longer than the run)."""
  values = {key: config[key].to_dict() if isinstance(config[key], ml_collections.ConfigDict)
            else config[key] for key in FINGERPRINT_KEYS}
  values["train_examples"] = train_examples
  if config.lr_schedule != "constant" or config.warmup_steps >= total_steps:
    values["total_steps"] = total_steps
  return json.loads(json.dumps(values))  # As the checkpoint's JSON gives it back.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, splits=None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates.

  Returns the last eval metrics. Raises UserError for fixable input problems,
  stops.Preempted after a signal (with a checkpoint saved at the step all
  processes agreed on). `splits`: (train, test) already in memory (the
  benchmark's loop timing), instead of loading the configured data.
  """
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, splits, cleanup)


def _train_and_evaluate(config, workdir, splits, cleanup: contextlib.ExitStack) -> dict:
  config_lib.validate(config)
  workdir = errors.ensure_writable_dir(workdir, "--workdir")
  parallel = parallel_lib.Parallel(config.parallelism)
  batch_split = parallel.check_batch(config.batch_size, "batch_size")
  is_lead = parallel.process_index == 0
  logging.info("%s; batch global=%d per-host=%d per-device=%d", parallel_lib.describe(parallel),
               batch_split["global"], batch_split["per_host"], batch_split["per_device"])

  if splits is None:
    data_source = input_pipeline.source(config)
    logging.info("data: %s from %s", config.dataset, data_source.describe())
    train_split = input_pipeline.load(config, "train", data_source)
    test_split = input_pipeline.load(config, "test", data_source)
    data_description = data_source.describe()
  else:
    (train_split, test_split), data_description = splits, "given in memory"
  train_examples = len(train_split)  # Before the hold-out (validation_size is its own key).
  train_split, val_split = input_pipeline.hold_out(train_split, config.validation_size)
  steps_per_epoch = config_lib.steps_per_epoch(config, len(train_split))
  total_steps = config_lib.total_steps(config, len(train_split))
  eval_every = config_lib.eval_every_steps(config, len(train_split))
  checkpoint_every = config_lib.checkpoint_every_steps(config, len(train_split))
  logging.info("data: %d train, %d test examples; %d steps (%d per epoch)", len(train_split),
               len(test_split), total_steps, steps_per_epoch)

  model = steps.create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  # Jitted: it only feeds log lines, and op by op its first call compiles for 0.75 s.
  schedule = jax.jit(steps.create_schedule(config, total_steps))
  tx = steps.create_optimizer(config, total_steps)
  init_state = steps.create_train_state(model, tx, config.seed, ema=config.ema_decay > 0)
  description = checkpointing.describe_state(
      config.model, init_state, fingerprint(config, train_examples, total_steps))
  # Closed (pending saves finished, event files flushed) however the run ends.
  checkpointer = cleanup.enter_context(checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      async_save=config.async_checkpointing))
  writer = cleanup.enter_context(metric_writers.MetricWriter(workdir, enabled=is_lead))
  abstract = parallel.abstract_state(init_state)
  latest, restored = checkpointer.restore_latest(abstract, description)
  if latest is not None:
    state = parallel.put_state(restored)
    del restored
    dropped = writer.truncate_after(latest)
    logging.info("resumed from checkpoint at step %d%s", latest,
                 f" (dropped {dropped} metrics lines written after it)" if dropped else "")
  else:
    state = parallel.put_state(init_state)
    dropped = writer.truncate_after(0)  # A previous attempt died before its first checkpoint.
    if dropped:
      logging.info("no checkpoint yet: starting from step 0 (dropped %d metrics lines of an "
                   "earlier attempt)", dropped)
  del init_state
  start_step = latest or 0
  # Only now is the run known to go on (a refused resume raised above): config.json is
  # rewritten only for a run that uses this workdir's checkpoints as they are.
  if is_lead:
    _write_config(workdir, config, {
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "eval_every_steps": eval_every,
        "checkpoint_every_steps": checkpoint_every,
        "parallelism": parallel.mode, "num_devices": parallel.num_devices,
        "num_processes": parallel.process_count, "backend": jax.default_backend(),
        "data_source": data_description,
        "jax_version": jax.__version__, "fashion_jax_version": fashion_jax.__version__})

  inference_model = steps.create_model(config, training=False)
  evaluator = Evaluator(test_split, config, inference_model, parallel)
  val_evaluator = Evaluator(val_split, config, inference_model, parallel) if val_split else None
  samples = None
  if is_lead and config.tensorboard_samples:
    samples = SamplePredictions(test_split, config.tensorboard_samples, inference_model, parallel,
                                datasets.class_names(config.dataset))
  show_progress = progress.wanted(config.progress_bar, is_lead)
  bar = progress.Bar(False, 0)  # The train loop's bar, once it starts.

  def evaluate(step: int) -> dict:
    t0 = time.perf_counter()
    result = _summarize(evaluator(state, show_progress, "eval test"), "eval")
    seconds = time.perf_counter() - t0
    if val_evaluator is not None:
      result.update(_summarize(val_evaluator(state, show_progress, "eval val"), "val"))
    result = {"epoch": step / steps_per_epoch, **result}
    writer.write(step, result)
    if samples is not None:
      writer.write_figure(step, "eval/sample_predictions", samples(state))
    writer.flush()
    with bar.external_write():
      logging.info("eval  step %d/%d epoch %.2f | loss %.4f accuracy %.2f%% | %.2fs for %d images",
                   step, total_steps, step / steps_per_epoch, result["eval_loss"],
                   100 * result["eval_accuracy"], seconds, len(test_split))
    bar.set_postfix(eval_acc=f"{100 * result['eval_accuracy']:.2f}%")
    return result

  if start_step >= total_steps:
    logging.info("training already finished (step %d); evaluating the final checkpoint", start_step)
    return evaluate(start_step)

  step_kwargs = {"model": model, "tx": tx, "label_smoothing": config.label_smoothing,
                 "ema_decay": config.ema_decay,
                 "augment": augment.make_augment(config.augment_translate, config.augment_flip,
                                                 config.random_erasing)}
  data_placement = loop.placement(config)
  windows = loop.Windows(functools.partial(steps.train_step, **step_kwargs), train_split, config,
                         parallel, data_placement, start_step)
  window = loop.window_length(config, steps_per_epoch, checkpoint_every, eval_every,
                              jax.default_backend())
  logging.info("train loop: data on the %s, %d steps per dispatch", data_placement, window)
  intervals = loop.LogIntervals(config.log_every_steps, total_steps, steps.combine_metrics)

  def save(step: int, metrics: dict | None = None) -> None:
    checkpointer.save(step, parallel.logical_state(state), description, metrics)

  step = start_step
  last_result = {}
  clock = [time.perf_counter(), step]  # Since when images/s counts: (time, step).
  compile_seconds = 0.0
  bar = progress.Bar(show_progress, total_steps * config.batch_size, step * config.batch_size,
                     desc="train")

  def log_lines(first_step: int, metrics) -> None:
    """Fetches a window's per-step metrics (waits for it) and writes the log lines it ends."""
    fetched = parallel.fetch(metrics)
    now, last = time.perf_counter(), first_step + len(fetched["count"])
    images_per_sec = float("nan")
    if last > clock[1]:
      images_per_sec = (last - clock[1]) * config.batch_size / (now - clock[0])
      clock[:] = [now, last]
    for line_step, sums in intervals.add(first_step, fetched):
      train = _summarize(sums, "train")
      skipped = int(sums["nonfinite_steps"])
      if skipped and config.on_nonfinite == "stop":
        raise UserError(
            f"training diverged: non-finite loss or gradients at step "
            f"{int(sums['first_nonfinite_step'])} (that update was not applied); the last good "
            f"checkpoint is at step {checkpointer.latest_step()} in {checkpointer.directory}; "
            "lower --config.learning_rate, or pass --config.on_nonfinite=skip to skip such batches")
      if skipped:
        with bar.external_write():
          logging.warning("skipped %d step(s) with non-finite loss or gradients, the first "
                          "at step %d", skipped, int(sums["first_nonfinite_step"]))
      line = {"epoch": line_step / steps_per_epoch, **train,
              "learning_rate": float(schedule(line_step - 1))}  # Of the interval's last step.
      if skipped:
        line["train_skipped_steps"] = skipped
      if math.isfinite(images_per_sec):
        line["train_images_per_sec"] = images_per_sec
      writer.write(line_step, line)
      bar.set_postfix(loss=f"{train['train_loss']:.4f}", acc=f"{100 * train['train_accuracy']:.2f}%")
      if not bar.enabled:  # The bar shows the same (and metrics.jsonl has it all).
        remaining = ((total_steps - line_step) * config.batch_size / images_per_sec
                     if math.isfinite(images_per_sec) else float("nan"))
        logging.info("train step %d/%d epoch %.2f | loss %.4f accuracy %.2f%% | %s img/s | "
                     "eta %s", line_step, total_steps, line_step / steps_per_epoch,
                     train["train_loss"], 100 * train["train_accuracy"],
                     f"{images_per_sec:,.0f}" if math.isfinite(images_per_sec) else "-",
                     _fmt_seconds(remaining))

  with stops.StopRequest() as stop, bar:
    in_flight = None  # The dispatched window whose metrics are not read yet: (first step, metrics).
    while step < total_steps:
      n = min(window - step % window, total_steps - step)
      t0 = time.perf_counter()
      state, metrics, compiled = windows(state, step, n)
      if compiled:  # This length was compiled by this call; keep it out of images/s.
        jax.block_until_ready(metrics)
        compile_seconds += time.perf_counter() - t0
        with bar.external_write():
          logging.info("compiled and ran the %d-step train window in %.2fs", n,
                       time.perf_counter() - t0)
        clock[:] = [time.perf_counter(), step + n]
        bar.restart_clock()
      faults.maybe_kill("step", step + 1, step + n)  # Tests: SIGKILL while steps run.
      if in_flight is not None:  # Read the previous window while this one runs.
        log_lines(*in_flight)
      in_flight = (step, metrics)
      step += n
      bar.update(n * config.batch_size)
      stopping = stop.agreed(step) if step < total_steps else None  # The same on every process.
      if step % checkpoint_every and step % eval_every and step < total_steps and not stopping:
        continue
      log_lines(*in_flight)  # The host needs the state here: drain the pipeline first.
      in_flight = None
      evaluated = None
      if step % eval_every == 0 or step == total_steps:
        last_result = evaluated = evaluate(step)
      if step % checkpoint_every == 0 or step == total_steps:
        save(step, evaluated)  # With its validation accuracy: the best one is kept.
      if stopping:
        save(step)
        checkpointer.wait()  # Durable before the process exits.
        raise stops.Preempted(f"stopped by {stopping} at step {step}; checkpoint saved in "
                              f"{checkpointer.directory}; re-run the same command to resume")
      clock[:] = [time.perf_counter(), step]
  logging.info("done: step %d, eval accuracy %.2f%%, compile %.1fs, wall %.1fs", step,
               100 * last_result.get("eval_accuracy", float("nan")), compile_seconds,
               fashion_jax.seconds_since_start())
  return last_result


def _fmt_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "-"
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")
