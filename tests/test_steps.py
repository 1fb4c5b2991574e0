"""The train state and the pure steps (fashion_jax/model/steps.py): models for training and serving,
schedules, a skipped step, the EMA."""

import jax
import numpy as np
import pytest

from fashion_jax.model import steps


def test_inference_model_uses_xla_ops_without_the_native_kernels(tiny_config, monkeypatch):
  from fashion_jax.kernels import native  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(native, "available_without_building", lambda: False)
  training, inference = steps.create_model(tiny_config), steps.create_model(tiny_config, False)
  assert (inference.conv_impl, inference.pool_impl) == ("xla", "xla")
  assert (training.conv_impl, training.pool_impl) == ("auto", "auto")
  x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
  variables = training.init(jax.random.key(0), x)
  np.testing.assert_allclose(inference.apply(variables, x), training.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  for conv in ("im2col", "winograd", "native"):  # Training's choice; serving uses XLA's here.
    tiny_config.conv_impl = conv
    assert steps.create_model(tiny_config).conv_impl == conv
    assert steps.create_model(tiny_config, False).conv_impl == "xla"


@pytest.mark.parametrize("model", ["cnn", "cnn_bn"])
def test_inference_model_takes_the_native_kernels_where_built(tiny_config, model, monkeypatch):
  """On CPU with the kernels built, evaluation and inference run them (their forward is
  1.4-2x XLA's), with the training model's outputs; export's portable model, a config that
  keeps training off them, and a process that would have to compile them use XLA's ops."""
  from fashion_jax.kernels import native  # pylint: disable=g-import-not-at-top
  from tests.conftest import require_native  # pylint: disable=g-import-not-at-top
  require_native()
  tiny_config.model = model
  inference = steps.create_model(tiny_config, training=False)
  portable = steps.create_model(tiny_config, training=False, portable=True)
  assert (inference.conv_impl, inference.pool_impl) == ("native", "xla")
  assert (portable.conv_impl, portable.pool_impl) == ("xla", "xla")
  x = jax.random.uniform(jax.random.key(2), (3, 28, 28, 1))
  variables = steps.create_model(tiny_config).init(jax.random.key(0), x)
  hlo = lambda m: jax.jit(m.apply).lower(variables, x).as_text()
  assert "fashion_jax_" in hlo(inference) and "fashion_jax_" not in hlo(portable)
  np.testing.assert_allclose(inference.apply(variables, x), portable.apply(variables, x),
                             rtol=1e-4, atol=1e-4)
  for conv in ("im2col", "winograd", "xla"):
    tiny_config.conv_impl = conv
    assert steps.create_model(tiny_config, False).conv_impl == "xla"
  tiny_config.conv_impl = "native"
  assert steps.create_model(tiny_config, False).conv_impl == "native"
  monkeypatch.setattr(native, "available_without_building", lambda: False)
  assert steps.create_model(tiny_config, False).conv_impl == "xla"


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules_peak_at_the_learning_rate(tiny_config, schedule):
  tiny_config.lr_schedule = schedule
  tiny_config.warmup_steps = 10
  fn = steps.create_schedule(tiny_config, 100)
  values = [float(fn(s)) for s in range(100)]
  assert max(values) == pytest.approx(tiny_config.learning_rate, rel=1e-3)
  if schedule != "constant":
    assert values[-1] < 0.1 * tiny_config.learning_rate


def test_ema_warms_up_and_averages_batchnorm_statistics(tiny_config):
  """Step t averages with decay min(ema_decay, (1+t)/(10+t)); the BatchNorm statistics are
  averaged like the weights, and evaluation uses both averages together."""
  tiny_config.model, tiny_config.ema_decay = "cnn_bn", 0.999
  model, tx = steps.create_model(tiny_config), steps.create_optimizer(tiny_config)
  state = steps.create_train_state(model, tx, 0, ema=True)
  assert state.ema_batch_stats is not None
  batch = {"image": np.asarray(jax.random.randint(jax.random.key(0), (8, 28, 28, 1), 0, 256),
                               np.uint8), "label": np.arange(8, dtype=np.int32) % 10}
  step = jax.jit(lambda s: steps.train_step(s, batch, model=model, tx=tx, ema_decay=0.999))
  for t in range(3):
    new, _ = step(state)
    decay = min(0.999, (1 + t) / (10 + t))
    for ema, old, live in ((new.ema_params, state.ema_params, new.params),
                           (new.ema_batch_stats, state.ema_batch_stats, new.batch_stats)):
      jax.tree.map(lambda e, o, p: np.testing.assert_allclose(
          e, decay * o + (1 - decay) * p, rtol=1e-6, atol=1e-7), ema, old, live)
    state = new
  variables = steps.eval_variables(state.params, state.batch_stats, state.ema_params,
                                   state.ema_batch_stats)
  assert variables["params"] is state.ema_params
  assert variables["batch_stats"] is state.ema_batch_stats


def test_skipped_step_advances_optax_counts_with_the_step(tiny_config):
  """A non-finite step leaves weights, moments and their EMA as they were, but every optax
  `count` moves with state.step, so the schedule's learning rate is the logged one (that of the
  step). The bad step is named as log lines count steps: the second step is step 2."""
  tiny_config.lr_schedule, tiny_config.warmup_steps = "cosine", 5
  model, tx = steps.create_model(tiny_config), steps.create_optimizer(tiny_config, 20)
  state = steps.create_train_state(model, tx, 0, ema=True)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  good = {"image": images, "label": np.arange(4, dtype=np.int32)}
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, ema_decay=0.99))
  state, _ = step(state, good)
  poisoned = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(np.nan),
                                               state.params))
  after, metrics = step(poisoned, good)
  assert int(after.step) == 2 and float(metrics["nonfinite_steps"]) == 1.0
  assert float(metrics["first_nonfinite_step"]) == 2.0
  jax.tree.map(np.testing.assert_array_equal, after.params, poisoned.params)
  jax.tree.map(np.testing.assert_array_equal, after.ema_params, poisoned.ema_params)
  counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]
            if getattr(path[-1], "name", None) == "count"]
  assert counts and all(int(c) == 2 for c in counts), counts
  others = lambda s: [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(s.opt_state)[0]
                      if getattr(path[-1], "name", None) != "count"]
  jax.tree.map(np.testing.assert_array_equal, others(after), others(poisoned))


def test_a_padded_rows_non_finite_loss_stays_out_of_the_eval_sums(tiny_config):
  """The test set is padded to whole batches with blank images (mask 0): their losses were
  multiplied by the mask, and inf x 0 is NaN, so one blank row whose logits were not finite made
  the whole evaluation's loss NaN. Here a model whose logits are infinite on a blank image."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  class InfiniteOnBlank(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      del train
      scale = self.param("scale", nn.initializers.ones, ())
      total = scale * jnp.sum(x, axis=(1, 2, 3))
      return jnp.stack([1.0 / total] + [jnp.zeros_like(total)] * 9, axis=-1)

  model = InfiniteOnBlank()
  state = steps.create_train_state(model, steps.create_optimizer(tiny_config), 0)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  images[:3] = 200  # Three real images; the fourth is padding.
  batch = {"image": images, "label": np.zeros(4, np.int32),
           "mask": np.array([1, 1, 1, 0], np.float32)}
  sums = jax.jit(lambda s, b: steps.eval_step(s, b, model=model))(state, batch)
  assert float(sums["count"]) == 3 and float(sums["correct"]) == 3
  assert np.isfinite(float(sums["loss_sum"])), sums
