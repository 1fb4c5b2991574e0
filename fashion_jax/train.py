"""Train state, the pure train/eval steps, and the train-and-evaluate loop."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import fashion_jax
from fashion_jax import augment
from fashion_jax import checkpointing
from fashion_jax import config_lib
from fashion_jax import errors
from fashion_jax import faults
from fashion_jax import input_pipeline
from fashion_jax import loop
from fashion_jax import metric_writers
from fashion_jax import models
from fashion_jax import parallel as parallel_lib
from fashion_jax import progress
from fashion_jax import stops
from fashion_jax.errors import UserError

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@flax.struct.dataclass
class TrainState:
  """Everything needed to continue training exactly. A plain pytree: no callables."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Raw key data (uint32); wrapped with jax.random.wrap_key_data when used.
  batch_stats: Any = flax.struct.field(default_factory=dict)
  ema_params: Any = None  # Exponential moving average of params (config.ema_decay > 0).
  ema_batch_stats: Any = None  # The same average of the BatchNorm statistics (BN models).


def create_model(config: ml_collections.ConfigDict, training: bool = True,
                 axis_name: str | None = None) -> nn.Module:
  """The configured model: training uses the configured op formulations, inference XLA's.

  Training on CPU wants the im2col/Winograd/native formulations (fast
  gradients); for inference XLA's own forward convolution and reduce_window
  are fastest on every backend (measured: 10k test images 0.4s vs 1.0s on 2
  CPU cores), need no native build, and lower for every platform (export).
  Both share one parameter tree. `axis_name`: the pmap axis, for synchronised
  BatchNorm.
  """
  conv, pool = (config.conv_impl, config.pool_impl) if training else ("xla", "xla")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]
  return models.create_model(config.model, conv_impl=conv, pool_impl=pool, dtype=dtype,
                             axis_name=axis_name, **config.model_kwargs.to_dict())


def create_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  lr, warmup = config.learning_rate, min(config.warmup_steps, max(total_steps - 1, 0))
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=lr * 1e-3)
  if config.lr_schedule == "onecycle":
    return optax.cosine_onecycle_schedule(max(total_steps, 1), lr)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  return optax.constant_schedule(lr)


def create_optimizer(config: ml_collections.ConfigDict,
                     total_steps: int = 1) -> optax.GradientTransformation:
  """The configured optimizer; schedules need the run's total steps (not the state's shape)."""
  schedule = create_schedule(config, total_steps)
  if config.optimizer == "adam":
    return optax.adam(schedule)
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  raise UserError(f"config.optimizer={config.optimizer!r} is invalid: use one of "
                  f"{', '.join(config_lib.OPTIMIZERS)}")


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       ema: bool = False) -> TrainState:
  """Initial state, computed on the host's default device (then placed by `Parallel`).

  One compiled function, compiled without XLA:CPU's backend optimizations: the
  truncated-normal initializers take 1.8 s to compile optimized on CPU and run
  once (start-up of a 30 s speedrun: 2.3 s op by op -> 0.3 s).
  """

  @jax.jit
  def init():
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init(init_key, jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key),
                      batch_stats=variables.get("batch_stats", {}),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      ema_batch_stats=(jax.tree.map(jnp.copy, variables["batch_stats"])
                                       if ema and variables.get("batch_stats") else None))

  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return init.lower().compile(compiler_options=options)()


def _scale(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32) * (1.0 / 255.0)


def train_step(state: TrainState, batch, *, model: nn.Module, tx: optax.GradientTransformation,
               augment=None, label_smoothing: float = 0.0, ema_decay: float = 0.0,
               axis_name: str | None = None):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit/pmap-able.

  Metrics are sums over the (global) batch, so they add up exactly across
  steps and devices. With `axis_name` (pmap) the gradients are averaged and
  the metrics summed over that axis explicitly.
  """
  images, labels = _scale(batch["image"]), batch["label"]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:  # Each device augments its own shard differently.
    step_key = jax.random.fold_in(step_key, lax.axis_index(axis_name))
  dropout_key, augment_key = jax.random.split(step_key)
  if augment is not None:
    images = augment(augment_key, images)

  def loss_fn(params):
    variables = {"params": params}
    mutable = []
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      mutable = ["batch_stats"]
    logits, updates = model.apply(variables, images, train=True, rngs={"dropout": dropout_key},
                                  mutable=mutable)
    if label_smoothing:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  batch_stats = updates.get("batch_stats", state.batch_stats)
  if axis_name is not None and batch_stats:
    batch_stats = lax.pmean(batch_stats, axis_name)

  # A non-finite loss or gradient leaves the state as it was (the step still
  # counts, so the data order is unchanged); the host decides to stop or skip.
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads)))
  if axis_name is not None:
    bad = lax.psum(bad.astype(jnp.int32), axis_name) > 0
  keep_old = lambda new, old: jnp.where(bad, old, new)
  params, batch_stats = jax.tree.map(keep_old, (params, batch_stats),
                                     (state.params, state.batch_stats))
  opt_state = _skipped_opt_state(opt_state, state.opt_state, bad)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if ema_params is not None:
    # Warm-up: the average starts short (decay (1+t)/(10+t)) so the random initial weights
    # wash out in tens of steps, not the 1/(1-decay) steps of the full decay.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    average = lambda e, p: decay * e + (1.0 - decay) * p
    ema_params = jax.tree.map(average, ema_params, params)
    if ema_batch_stats is not None:  # Averaged like the weights they belong to.
      ema_batch_stats = jax.tree.map(average, ema_batch_stats, batch_stats)

  n = jnp.where(bad, 0.0, float(labels.shape[0]))
  metrics = {"loss_sum": jnp.where(bad, 0.0, loss) * n,
             "correct": jnp.where(bad, 0.0, jnp.sum(jnp.argmax(logits, -1) == labels)),
             "count": n}
  if axis_name is not None:
    metrics = lax.psum(metrics, axis_name)
  metrics["nonfinite_steps"] = bad.astype(jnp.float32)
  metrics["first_nonfinite_step"] = jnp.where(bad, state.step, NO_STEP).astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats, ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats)
  return new_state, metrics


def _skipped_opt_state(new, old, bad):
  """The old optimizer state on a skipped step, except its step counters (optax's `count`).

  They advance with `state.step`, so a schedule's learning rate stays the
  one of the step (what is logged), not one that lags by the skipped steps.
  """
  def pick(path, new_leaf, old_leaf):
    if path and getattr(path[-1], "name", None) == "count":
      return new_leaf
    return jnp.where(bad, old_leaf, new_leaf)
  return jax.tree_util.tree_map_with_path(pick, new, old)


NO_STEP = 2**24  # "No such step" in float32 metrics (exact up to 2**24 steps).


def combine_metrics(metrics: dict, axis: int = 0, xp=jnp) -> dict:
  """Reduces stacked step metrics: sums, except the first bad step (a min)."""
  return {k: (xp.min(v, axis=axis) if k == "first_nonfinite_step" else xp.sum(v, axis=axis))
          for k, v in metrics.items()}


def eval_variables(params, batch_stats=None, ema_params=None, ema_batch_stats=None) -> dict:
  """The variables evaluation uses: the EMA parameters when kept, with the EMA of the
  BatchNorm statistics (the statistics of the live weights do not fit averaged weights)."""
  if ema_params is not None:
    params = ema_params
    batch_stats = ema_batch_stats if ema_batch_stats is not None else batch_stats
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def eval_logits(model: nn.Module, variables: dict, images: jax.Array,
                flip_tta: bool = False) -> jax.Array:
  """Logits of uint8 images [N, 28, 28, 1], as evaluation (and inference) computes them.

  With `flip_tta` the logits of each image and its mirror image are averaged.
  """
  x = _scale(images)
  logits = model.apply(variables, x, train=False)
  if flip_tta:
    logits = 0.5 * (logits + model.apply(variables, x[:, :, ::-1, :], train=False))
  return logits


def eval_step(state: TrainState, batch, *, model: nn.Module, flip_tta: bool = False,
              axis_name: str | None = None):
  """Masked sums of loss and correct predictions over one (padded) eval batch.

  Uses the EMA parameters when the state has them; with `flip_tta` the logits
  of each image and its mirror image are averaged.
  """
  variables = eval_variables(state.params, state.batch_stats, state.ema_params,
                             state.ema_batch_stats)
  logits = eval_logits(model, variables, batch["image"], flip_tta)
  mask = batch["mask"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  metrics = {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
             "count": jnp.sum(mask)}
  if axis_name is not None:
    metrics = lax.psum(metrics, axis_name)
  return metrics


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


def eval_sums(state: TrainState, batches, *, model: nn.Module, flip_tta: bool = False,
              axis_name: str | None = None):
  """`eval_step` over stacked batches [num_batches, batch, ...] in one call: summed metrics."""
  def body(total, batch):
    metrics = eval_step(state, batch, model=model, flip_tta=flip_tta, axis_name=axis_name)
    return jax.tree.map(jnp.add, total, metrics), None
  zeros = {"loss_sum": jnp.float32(0), "correct": jnp.float32(0), "count": jnp.float32(0)}
  return lax.scan(body, zeros, batches)[0]


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
        functools.partial(eval_sums, model=model, flip_tta=config.eval_flip_tta),
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
        eval_logits(model, variables, images)))

  def __call__(self, state):
    variables = self.parallel.fetch(eval_variables(state.params, state.batch_stats,
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

  model = create_model(config, axis_name=parallel_lib.AXIS if parallel.mode == "pmap" else None)
  # Jitted: it only feeds log lines, and op by op its first call compiles for 0.75 s.
  schedule = jax.jit(create_schedule(config, total_steps))
  tx = create_optimizer(config, total_steps)
  init_state = create_train_state(model, tx, config.seed, ema=config.ema_decay > 0)
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

  inference_model = create_model(config, training=False)
  evaluator = Evaluator(test_split, config, inference_model, parallel)
  val_evaluator = Evaluator(val_split, config, inference_model, parallel) if val_split else None
  samples = None
  if is_lead and config.tensorboard_samples:
    from fashion_jax import inference  # pylint: disable=g-import-not-at-top  (import cycle)
    samples = SamplePredictions(test_split, config.tensorboard_samples, inference_model, parallel,
                                inference.class_names(config))
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
  windows = loop.Windows(functools.partial(train_step, **step_kwargs), train_split, config,
                         parallel, data_placement, start_step)
  window = loop.window_length(config, steps_per_epoch, checkpoint_every, eval_every,
                              jax.default_backend())
  logging.info("train loop: data on the %s, %d steps per dispatch", data_placement, window)
  intervals = loop.LogIntervals(config.log_every_steps, total_steps, combine_metrics)

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
