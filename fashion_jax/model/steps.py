"""The train state and the pure step functions: model, optimizer, train/eval step, eval logits.

Everything here is a pure function of its arguments, jit/pmap-able, and knows
nothing of loops, files or processes: the train loop (train.py) and serving
(inference.py, export.py, evaluate.py) both build on it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from fashion_jax import config_lib
from fashion_jax.data import augment
from fashion_jax.data import datasets
from fashion_jax.kernels import adam
from fashion_jax.kernels import ops
from fashion_jax.model import models
from fashion_jax.support import parallel as parallel_lib
from fashion_jax.support.errors import UserError

IMAGE_SHAPE = datasets.IMAGE_SHAPE
NUM_CLASSES = datasets.NUM_CLASSES



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
                 axis_name: str | None = None, portable: bool = False) -> nn.Module:
  """The configured model: training uses the configured op formulations; evaluation and
  inference the native kernels on CPU where `ops.native_for_inference` (they are built: their
  forward is 1.4-2x faster than XLA's), else XLA's own convolution and reduce_window, the
  fastest forward elsewhere. `portable`: XLA's ops always (export lowers them for every
  platform). All share one parameter tree. `axis_name`: the pmap axis, for synchronised
  BatchNorm.
  """
  if training:
    conv, pool = config.conv_impl, config.pool_impl
  elif not portable and ops.native_for_inference(config.conv_impl):
    conv, pool = "native", "xla"
  else:
    conv, pool = "xla", "xla"
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
    # Where the model runs the native CPU kernels, so does Adam's update (kernels/adam.py).
    if ops.native_chosen(config.conv_impl):
      return adam.fused_adam(schedule)
    return optax.adam(schedule)
  if config.optimizer == "adamw":
    if ops.native_chosen(config.conv_impl) and config.weight_decay:
      return adam.fused_adam(schedule, weight_decay=config.weight_decay)
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  raise UserError(f"config.optimizer={config.optimizer!r} is invalid: use one of "
                  f"{', '.join(config_lib.OPTIMIZERS)}")


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       ema: bool = False, abstract: bool = False) -> TrainState:
  """Initial state, computed on the host's default device (then placed by `Parallel`);
  `abstract`: its shapes and dtypes only (jax.ShapeDtypeStruct leaves), nothing computed.

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

  if abstract:
    return jax.eval_shape(init)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return init.lower().compile(compiler_options=options)()


class Training(NamedTuple):
  """What a config trains with: its model, optimizer, initial state and train step."""
  model: nn.Module
  tx: optax.GradientTransformation
  init_state: Callable[..., TrainState]  # create_train_state's (abstract=...) for the config.
  train_step: Callable  # (state, batch) -> (state, metrics), with the config's settings.


def training(config: ml_collections.ConfigDict, pmap: bool = False,
             total_steps: int = 1) -> Training:
  """The config's training, one definition for the train loop and the benchmark (which had
  its own copy of the step's settings, and had timed a bare step without the augmentation
  or EMA of configs/cpu_best.py and accelerator_best.py). `pmap`: the model averages its
  batch statistics over the pmap axis; `total_steps`: the schedule's length."""
  model = create_model(config, axis_name=parallel_lib.AXIS if pmap else None)
  tx = create_optimizer(config, total_steps)
  step = functools.partial(
      train_step, model=model, tx=tx,
      augment=augment.make_augment(config.augment_translate, config.augment_flip,
                                   config.random_erasing),
      label_smoothing=config.label_smoothing, ema_decay=config.ema_decay)
  return Training(model, tx, functools.partial(create_train_state, model, tx, config.seed,
                                               ema=config.ema_decay > 0), step)


def check_native_placement(config, parallel) -> None:
  """conv_impl='native' under a multi-device mesh: UserError. The kernels have no sharding rule,
  so XLA gathers the global batch for each device's call: N x the work, silently."""
  if config.conv_impl == "native" and parallel.mode == "mesh" and parallel.num_devices > 1:
    raise UserError(
        f"config.conv_impl='native' under parallelism=mesh on {parallel.num_devices} devices "
        "would run every device's native kernels on the whole global batch (XLA gathers it for "
        f"them: {parallel.num_devices}x the work); use conv_impl='auto' (XLA's ops under a mesh) "
        "or parallelism=pmap (the kernels on each device's own rows)")


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
  # One key for the global batch in every mode: under pmap the draws are made for the global
  # batch and each device takes its rows (data.augment.draw_rows), as mesh and one device do.
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  dropout_key, augment_key = jax.random.split(step_key)
  if augment is not None:
    images = augment(augment_key, images, axis_name)

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

  # A non-finite loss or gradient leaves the state as it was, EMAs included (the step still
  # counts, so the data order is unchanged); the host decides to stop or skip.
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)))
  if axis_name is not None:
    bad = lax.psum(bad.astype(jnp.int32), axis_name) > 0
  keep_old = lambda new, old: jnp.where(bad, old, new)
  params, batch_stats = jax.tree.map(keep_old, (params, batch_stats),
                                     (state.params, state.batch_stats))
  opt_state = _skipped_opt_state(opt_state, state.opt_state, bad)
  if isinstance(tx, adam.FusedAdam):  # The large parameters' update, guard included, natively.
    params, opt_state = adam.apply(tx, grads, state.params, state.opt_state, params, opt_state,
                                   bad)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if ema_params is not None:
    # Warm-up: the average starts short (decay (1+t)/(10+t)) so the random initial weights
    # wash out in tens of steps, not the 1/(1-decay) steps of the full decay.
    t = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    average = lambda e, p: keep_old(decay * e + (1.0 - decay) * p, e)  # (Kept on a bad step.)
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
  # Counted as steps done, as log lines and checkpoints count them: this is step state.step + 1.
  metrics["first_nonfinite_step"] = jnp.where(bad, state.step + 1, NO_STEP).astype(jnp.float32)
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
  # Selected, not multiplied: a padded row's non-finite loss times 0 would be NaN in the sum.
  metrics = {"loss_sum": jnp.sum(jnp.where(mask > 0, losses, 0.0)),
             "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
  if axis_name is not None:
    metrics = lax.psum(metrics, axis_name)
  return metrics


def eval_sums(state: TrainState, batches, *, model: nn.Module, flip_tta: bool = False,
              axis_name: str | None = None):
  """`eval_step` over stacked batches [num_batches, batch, ...] in one call: summed metrics."""
  def body(total, batch):
    metrics = eval_step(state, batch, model=model, flip_tta=flip_tta, axis_name=axis_name)
    return jax.tree.map(jnp.add, total, metrics), None
  zeros = {"loss_sum": jnp.float32(0), "correct": jnp.float32(0), "count": jnp.float32(0)}
  return lax.scan(body, zeros, batches)[0]
