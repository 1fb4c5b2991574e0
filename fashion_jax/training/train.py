"""The train-and-evaluate loop: data, state restore, windows of steps, checkpoints, evals, stops
(the step functions it runs are in steps.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

import fashion_jax
from fashion_jax import config_lib
from fashion_jax.data import datasets
from fashion_jax.data import input_pipeline
from fashion_jax.model import steps
from fashion_jax.support import checkpointing, errors, faults, metric_writers, multihost, storage
from fashion_jax.support.errors import UserError
from fashion_jax.support import compile_ahead as compile_ahead_lib
from fashion_jax.support import parallel as parallel_lib
from fashion_jax.training import loop, progress, stops
from fashion_jax.training import workdir as workdir_lib


def _write_config(run: "Run", config: ml_collections.ConfigDict, step: int) -> None:
  """config.json, by the lead process, once a resume was accepted (a refused one raised before).
  A finished run keeps the record of what it trained with: a re-run with another
  eval_batch_size or log_every trains nothing. Its failure (a full disk), or the lead's in
  dropping metrics lines (`restore`), stops every process: the others had gone on into the
  first window's collective, and crashed there (gloo) or waited for JAX's heartbeat timeout."""
  path, refusal = storage.join(run.workdir, "config.json"), None
  if run.is_lead and not (step >= run.total_steps and storage.exists(path)):
    resolved = {**json.loads(config.to_json_best_effort()), "_derived": run.derived()}
    resolved.update({k: input_pipeline.absolute(config[k]) for k in ("idx_dir", "data_dir") if config[k]})
    try:
      storage.write_text(path, json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    except UserError as e:
      refusal = str(e)
  if refusals := multihost.gather("config_json", refusal):  # (The lead's failure before: seen.)
    raise UserError(refusals[min(refusals)])


def _summarize(sums: dict, prefix: str) -> dict:
  """Mean loss and accuracy; None where no example counted (an interval whose every step was
  skipped as non-finite: it read loss 0.0, a perfect-looking loss where nothing trained)."""
  count = float(sums["count"])
  return {f"{prefix}_loss": float(sums["loss_sum"]) / count if count else None,
          f"{prefix}_accuracy": float(sums["correct"]) / count if count else None}


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
    self._program = parallel.compile(
        functools.partial(steps.eval_sums, model=model, flip_tta=config.eval_flip_tta),
        donate_state=False, stacked=True)
    self._sums = self._program

  def compile_ahead(self, state) -> compile_ahead_lib.CompiledAhead:
    """Compiles the evaluation of states like `state` in a background thread."""
    self._sums = compile_ahead_lib.CompiledAhead(self._program, state, self._batches)
    return self._sums

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
    return metric_writers.prediction_grid(self.images, self.labels, probabilities,
                                          self.class_names)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run fixes before its first step: data, step counts, intervals, devices."""
  config: ml_collections.ConfigDict
  workdir: str
  parallel: parallel_lib.Parallel
  train: input_pipeline.Split
  val: input_pipeline.Split | None
  test: input_pipeline.Split
  data_description: str
  train_examples: int  # Before the validation hold-out.
  train_data: str  # input_pipeline.digest of the train split before the hold-out.
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  checkpoint_every: int

  @property
  def is_lead(self) -> bool:
    return self.parallel.process_index == 0

  def fingerprint(self) -> dict:
    """What a resume must match (config_lib.fingerprint)."""
    return config_lib.fingerprint(self.config, self.train_examples, self.total_steps,
                                  self.train_data)

  def derived(self) -> dict:
    """What config.json records beside the config: the values derived from it here."""
    return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "eval_every_steps": self.eval_every, "checkpoint_every_steps": self.checkpoint_every,
            "parallelism": self.parallel.mode, "num_devices": self.parallel.num_devices,
            "num_processes": self.parallel.process_count, "backend": jax.default_backend(),
            "data_source": self.data_description, "jax_version": jax.__version__,
            "fashion_jax_version": fashion_jax.__version__}


def prepare(config: ml_collections.ConfigDict, workdir: str, splits=None) -> Run:
  """Validates the config, sets up the devices and loads the data (or takes `splits`)."""
  config_lib.validate(config)
  new_workdir = not storage.exists(storage.resolve(workdir, "--workdir"))
  workdir = storage.ensure_writable_dir(workdir, "--workdir")  # Early: a typo fails at once.
  workdir_lib.refuse_foreign_or_unwritable(workdir)
  try:
    return _prepare(config, workdir, splits)
  except UserError:
    if new_workdir and jax.process_count() == 1:  # Data or devices: leave no empty folder.
      storage.remove_if_empty(workdir)
    raise


def _prepare(config, workdir: str, splits) -> Run:
  parallel = parallel_lib.Parallel(config.parallelism)
  batch_split = parallel.check_batch(config.batch_size, "batch_size")
  steps.check_native_placement(config, parallel)
  parallel.check_batch(config.eval_batch_size, "eval_batch_size")  # Now: before anything is written.
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
  train_examples, train_data = len(train_split), input_pipeline.digest(train_split)
  parallel_lib.check_same_data(f"{train_data}/{input_pipeline.digest(test_split)}")
  train_split, val_split = input_pipeline.hold_out(train_split, config.validation_size)
  n = len(train_split)
  run = Run(config, workdir, parallel, train_split, val_split, test_split, data_description,
            train_examples, train_data, config_lib.steps_per_epoch(config, n), config_lib.total_steps(config, n),
            config_lib.eval_every_steps(config, n), config_lib.checkpoint_every_steps(config, n))
  logging.info("data: %d train, %d test examples; %d steps (%d per epoch)", n, len(test_split),
               run.total_steps, run.steps_per_epoch)
  return run


def restore(run: Run, checkpointer, writer, state_shapes, init_state, description):
  """(state placed on the devices, its step): the latest readable checkpoint, else `init_state()`
  (made only then: a resume held both at its peak, 2x the state's memory).

  Drops the metrics lines an interrupted attempt wrote after that step.
  """
  latest, restored = checkpointer.restore_latest(run.parallel.abstract_state(state_shapes),
                                                 description)
  dropped = writer.truncate_after(latest or 0)
  if latest is not None:
    logging.info("resumed from checkpoint at step %d%s", latest,
                 f" (dropped {dropped} metrics lines written after it)" if dropped else "")
    return run.parallel.put_state(restored), latest
  if dropped:  # A previous attempt died before its first checkpoint.
    logging.info("no checkpoint yet: starting from step 0 (dropped %d metrics lines of an "
                 "earlier attempt)", dropped)
  return run.parallel.put_state(init_state()), 0


class Evaluation:
  """The periodic evaluation: test (and validation) metrics, written and logged."""

  def __init__(self, run: Run, writer, show_progress: bool):
    config, parallel = run.config, run.parallel
    model = steps.create_model(config, training=False)
    self.run, self.writer, self.show_progress = run, writer, show_progress
    self.test = Evaluator(run.test, config, model, parallel)
    self.val = Evaluator(run.val, config, model, parallel) if run.val else None
    self.samples = None
    if run.is_lead and config.tensorboard_samples and not errors.available("PIL"):
      # Information, not a warning: the base install (README's first command) has no Pillow,
      # and the run is complete without the picture.
      logging.info("no TensorBoard sample predictions: they need Pillow (pip install "
                   "'fashion_jax[serve]'); --config.tensorboard_samples=0 turns them off")
    elif run.is_lead and config.tensorboard_samples:
      self.samples = SamplePredictions(run.test, config.tensorboard_samples, model, parallel,
                                       datasets.class_names(config.dataset))
    self.bar = progress.Bar(False, 0)  # The train loop's bar, once it starts.

  def compile_ahead(self, state):
    """Starts compiling the evaluations while the first train windows compile and run; returns
    what waits for those compiles (a run that ended before its first evaluation left them
    running after it returned: in a notebook, beside the next cell).

    Called before the first window donates the state's buffers, in single-process runs only:
    with several, a compile may wait for the others' (XLA's GPU autotuning shared through the
    distributed key-value store), and two compiles started in different orders must not wait
    on each other.
    """
    logging.info("compiling the evaluation in the background")
    compiles = [e.compile_ahead(state) for e in (self.test, self.val) if e is not None]
    return lambda: [program.ready for program in compiles]

  def __call__(self, state, step: int, record: bool = True) -> dict:
    """The metrics at `step`; `record`: also written to metrics.jsonl and TensorBoard."""
    run, t0 = self.run, time.perf_counter()
    result = _summarize(self.test(state, self.show_progress, "eval test"), "eval")
    seconds = time.perf_counter() - t0
    if self.val is not None:
      result.update(_summarize(self.val(state, self.show_progress, "eval val"), "val"))
    result = {"epoch": step / run.steps_per_epoch, **result}
    if record:
      self.writer.write(step, result)
      if self.samples is not None:
        self.writer.write_image(step, "eval/sample_predictions", self.samples(state))
      self.writer.flush()
    val = (f" | val loss {result['val_loss']:.4f} accuracy {100 * result['val_accuracy']:.2f}%"
           if self.val is not None else "")  # The split config.validation_size held out.
    with self.bar.external_write():
      logging.info("eval  step %d/%d epoch %.2f | loss %.4f accuracy %.2f%% | %.2fs for %d images%s",
                   step, run.total_steps, step / run.steps_per_epoch, result["eval_loss"],
                   100 * result["eval_accuracy"], seconds, len(run.test), val)
    self.bar.set_postfix(eval_acc=f"{100 * result['eval_accuracy']:.2f}%")
    return result


class TrainLog:
  """The train metrics' log lines: fetched a window at a time, written per log interval."""

  def __init__(self, run: Run, writer, schedule, checkpointer, bar, step: int):
    """`step`: where the loop starts (a checkpoint's, resuming)."""
    self.run, self.writer, self.checkpointer, self.bar = run, writer, checkpointer, bar
    self.rates = loop.LineRates(schedule, run.config.log_every_steps, run.total_steps)
    self.intervals = loop.LogIntervals(run.config.log_every_steps, run.total_steps,
                                       steps.combine_metrics)
    if step:  # The log interval the checkpoint was saved in, from its start.
      self.intervals.resume(checkpointer.meta(step).get("log_interval"), step)
    # Since when images/s counts, (time, step): the last compile, eval or checkpoint. Not the
    # previous window's fetch: on jax 0.7.2's CPU client a window's metrics arrive only once the
    # next window has run too, so the last two before an eval arrived together (2-30 million
    # img/s logged at epoch ends); the average since the last pause does not depend on that.
    self.clock = (time.perf_counter(), step)

  def restart_clock(self, step: int) -> None:
    self.clock = (time.perf_counter(), step)

  def compiled(self, metrics, n: int, step: int, start: float) -> float:
    """After a window of `n` steps up to `step` compiled, dispatched at `start`: waits for it,
    logs the time, and restarts the clocks (compiling is no throughput). The seconds it took."""
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    with self.bar.external_write():
      logging.info("compiled and ran the %d-step train window in %.2fs", n, seconds)
    self.restart_clock(step)
    self.bar.restart_clock()
    return seconds

  def __call__(self, first_step: int, metrics) -> None:
    """Fetches a window's per-step metrics (waits for it) and writes the log lines it ends."""
    run, config = self.run, self.run.config
    fetched = run.parallel.fetch(metrics)
    now, last = time.perf_counter(), first_step + len(fetched["count"])
    rate = float("nan")
    if last > self.clock[1]:
      rate = (last - self.clock[1]) * config.batch_size / (now - self.clock[0])
    for line_step, sums in self.intervals.add(first_step, fetched):
      train, skipped = _summarize(sums, "train"), int(sums["nonfinite_steps"])
      if skipped and config.on_nonfinite == "stop":
        self._diverged(sums["first_nonfinite_step"])
      if skipped:
        with self.bar.external_write():
          logging.warning("skipped %d step(s) with non-finite loss or gradients, the first "
                          "at step %d", skipped, int(sums["first_nonfinite_step"]))
      line = {"epoch": line_step / run.steps_per_epoch, **train,
              "learning_rate": self.rates(line_step)}  # Of the interval's last step.
      if skipped:
        line["train_skipped_steps"] = skipped
      if math.isfinite(rate):
        line["train_images_per_sec"] = rate
      self.writer.write(line_step, line)
      loss, accuracy = ("-", "-") if train["train_loss"] is None else (
          f"{train['train_loss']:.4f}", f"{100 * train['train_accuracy']:.2f}%")
      self.bar.set_postfix(loss=loss, acc=accuracy)
      if not self.bar.enabled:  # The bar shows the same (and metrics.jsonl has it all).
        remaining = ((run.total_steps - line_step) * config.batch_size / rate
                     if math.isfinite(rate) else float("nan"))
        logging.info("train step %d/%d epoch %.2f | loss %s accuracy %s | %s img/s | eta %s",
                     line_step, run.total_steps, line_step / run.steps_per_epoch, loss, accuracy,
                     f"{rate:,.0f}" if math.isfinite(rate) else "-", progress.fmt_seconds(remaining))
    if config.on_nonfinite == "stop" and fetched["nonfinite_steps"].any():  # Not at its line: a
      self._diverged(fetched["first_nonfinite_step"].min())  # later one, or none (log never).

  def _diverged(self, step) -> None:
    """on_nonfinite=stop: the error, raised before the next checkpoint (none after `step`)."""
    good = self.checkpointer.latest_step()
    good = (f"the last good checkpoint is at step {good} in {self.checkpointer.directory}"
            if good is not None else "there is no last good checkpoint yet in "
            f"{self.checkpointer.directory} (re-running starts over)")
    raise UserError(
        f"training diverged: non-finite loss or gradients at step {int(step)} (that update was "
        f"not applied); {good}; lower --config.learning_rate in a new --workdir (this one's "
        "checkpoints are of this rate), or pass --config.on_nonfinite=skip to skip such batches")


def _evaluate_finished(evaluate: Evaluation, state, step: int, total_steps: int) -> dict:
  """A re-run of a finished run: its final evaluation, logged but not written again (the first
  run wrote it to metrics.jsonl and TensorBoard; one series, one point a step). Past the end a
  shorter config asks for (a constant schedule allows it): said, not a silent "step 20/15"."""
  if step > total_steps:
    logging.warning("the latest checkpoint (step %d) is past the %d steps this config asks for: "
                    "evaluating it as it is; to train %d steps, use a new --workdir", step,
                    total_steps, total_steps)
  logging.info("training already finished (step %d); evaluating the final checkpoint", step)
  result = evaluate(state, step, record=False)
  logging.info("done: step %d (trained before), eval accuracy %.2f%%, wall %.1fs", step,
               100 * result["eval_accuracy"], fashion_jax.seconds_since_start())
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, splits=None,
                       compile_ahead: bool = True) -> dict:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates.

  Returns the last eval metrics. Raises UserError for fixable input problems,
  stops.Preempted after a signal (with a checkpoint saved at the step all
  processes agreed on). `splits`: (train, test) already in memory (the
  benchmark's loop timing), instead of loading the configured data.
  `compile_ahead`: compile the evaluation and the shorter train windows in the background
  during the first windows (off for the benchmark's loop timing: it would share the cores).
  """
  with contextlib.ExitStack() as cleanup:  # Pending saves finished, files flushed, however it ends.
    cleanup.enter_context(stops.a_crash_ends_the_job())  # Outermost: after those.
    stop = cleanup.enter_context(stops.StopRequest())  # Before the data loads: see stops.py.
    run = prepare(config, workdir, splits)
    cleanup.enter_context(workdir_lib.lock(run.workdir, run.is_lead))  # Before any change.
    parallel, total_steps = run.parallel, run.total_steps
    training = steps.training(config, parallel.mode == "pmap", total_steps)
    state_shapes = training.init_state(abstract=True)
    description = checkpointing.describe_state(config.model, state_shapes, run.fingerprint())
    checkpointer = cleanup.enter_context(checkpointing.Checkpointer(
        storage.join(run.workdir, "checkpoints"), keep=config.keep_checkpoints,
        async_save=config.async_checkpointing, training=True))
    writer = cleanup.enter_context(metric_writers.MetricWriter(run.workdir, enabled=run.is_lead))
    state, step = restore(run, checkpointer, writer, state_shapes, training.init_state,
                          description)
    faults.maybe_signal("restored")  # Tests: SIGTERM before the train loop starts.
    _write_config(run, config, step)  # Only now is the run known to go on (see there).
    show_progress = progress.wanted(config.progress_bar, run.is_lead)
    evaluate = Evaluation(run, writer, show_progress)
    if step >= total_steps:
      return _evaluate_finished(evaluate, state, step, total_steps)
    placement = loop.placement(config)
    windows = loop.Windows(training.train_step, run.train, config, parallel, placement, step)
    window = loop.train_window(config, placement, run.steps_per_epoch, run.checkpoint_every,
                               run.eval_every, jax.default_backend())
    if compile_ahead and parallel.process_count == 1:  # See Evaluation.compile_ahead.
      cleanup.callback(evaluate.compile_ahead(state))  # Waited for however the run ends.
      cleanup.callback(windows.compile_ahead(loop.lengths_ahead(
          step, window, total_steps, run.eval_every, run.checkpoint_every)))
    bar = evaluate.bar = progress.Bar(show_progress, total_steps * config.batch_size,
                                      step * config.batch_size, desc="train")
    log = TrainLog(run, writer, steps.create_schedule(config, total_steps), checkpointer,
                   bar, step)

    def save(step: int, results: dict) -> None:  # With its validation accuracy: best is kept.
      writer.flush()  # The lines up to here, with the checkpoint (buffered for Cloud Storage).
      checkpointer.save(step, parallel.logical_state(state), {
          **description, "log_interval": log.intervals.pending(step)}, results.get("eval"))

    # At window ends where `step % every == 0` (and the last step), in order; each action gets
    # the results of those before it.
    actions = [("eval", run.eval_every, lambda step, results: evaluate(state, step)),
               ("checkpoint", run.checkpoint_every, save)]
    last_eval, compile_seconds = {}, 0.0
    with bar:
      in_flight = None  # The dispatched window whose metrics are not read yet.
      while step < total_steps:
        t0, n = time.perf_counter(), loop.next_window(step, window, total_steps, run.eval_every,
                                                      run.checkpoint_every)
        state, metrics, compiled = windows(state, step, n)
        if compiled:  # This length was compiled by this call; keep it out of images/s.
          compile_seconds += log.compiled(metrics, n, step + n, t0)
        faults.maybe_kill("step", step + 1, step + n)  # Tests: SIGKILL while steps run.
        if in_flight is not None:  # Read the previous window while this one runs.
          log(*in_flight)
        in_flight, step = (step, metrics), step + n
        bar.update(n * config.batch_size)
        due = [(name, action) for name, every, action in actions
               if step % every == 0 or step == total_steps]
        results = {}
        if due:
          log(*in_flight)  # The host needs the state here: drain the pipeline first.
          in_flight = None
          for name, action in due:
            results[name] = action(step, results)
          last_eval = results.get("eval", last_eval)
          log.restart_clock(step)
        # Asked after this step's evaluation and checkpoint: a signal during them stops here, not
        # a window (up to 1,000 steps) later. Same answer on every process.
        if step < total_steps and (stopping := stop.agreed(step)):
          if in_flight is not None:
            log(*in_flight)
          save(step, results)  # With this step's evaluation, if one ran: it competes for best.
          faults.maybe_signal("stop_save")  # Tests: a second signal while it is written.
          checkpointer.wait()  # Durable before the process exits.
          stop.saved(exiting=False)  # A signal from here on changes nothing (StopRequest.saved).
          faults.maybe_signal("stop_saved")  # Tests: a signal once it is saved.
          raise stops.Preempted(f"stopped by {stopping} at step {step}; checkpoint saved in "
                                f"{checkpointer.directory}; re-run the same command to resume")
  logging.info("done: step %d, eval accuracy %.2f%%, compile %.1fs, wall %.1fs", step,
               100 * last_eval.get("eval_accuracy", float("nan")), compile_seconds,
               fashion_jax.seconds_since_start())
  return last_eval
