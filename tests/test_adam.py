"""The native Adam update (fashion_jax/kernels/adam.py) against optax.adam with the step's guard."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fashion_jax.kernels import adam, native
from fashion_jax.model import steps
from tests.conftest import require_native


@pytest.fixture(scope="module", autouse=True)
def built():
  require_native()  # Not a skip where a C++ compiler exists: there the kernels must build.


# Warm-up: the learning rate changes every step, as the schedule's count must be read right.
SCHEDULE = optax.join_schedules([optax.linear_schedule(0.0, 1e-2, 3),
                                 optax.constant_schedule(1e-2)], [3])

# How far the kernel's parameters may be from optax's (beyond rtol 2e-6 of p). Two float32
# formulations of one Adam step differ by more than the rounding of the update: m is a difference
# of two terms ((1 - b1) g and b1 m), so a multiply-add fused or not (the kernel's order against
# whatever XLA compiles optax's into) moves m by an ulp of those terms, and the update m / sqrt(v)
# by up to ~2^-24 / sqrt(1 - b2) ~ 2e-6 of lr per step. jax 0.12.1's XLA put optax 3.6e-8 from
# the kernel over these six steps (0.10.2's 1.4e-9, inside the 1e-8 this was). 1e-7 is 1e-5 of
# lr; a wrong step (a bias correction, the step's learning rate, the weight decay) is off by a
# good fraction of lr.
ATOL = 1e-7


def _params(seed):
  rng = np.random.default_rng(seed)
  # 129 x 129: native, over two tasks, its last 16641 % 16 elements past the last whole vector.
  return {"big": jnp.asarray(rng.standard_normal((129, 129)), jnp.float32),
          "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 32, 64)), jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(64), jnp.float32)}}


def _step(tx, params, opt_state, grads, bad):
  """What steps.train_step does with the gradients (optax, the guard, then the native part)."""
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  new_params = jax.tree.map(lambda new, old: jnp.where(bad, old, new), new_params, params)
  skipped = steps._skipped_opt_state  # pylint: disable=protected-access
  new_state = skipped(new_state, opt_state, bad)
  if isinstance(tx, adam.FusedAdam):
    new_params, new_state = adam.apply(tx, grads, params, opt_state, new_params, new_state, bad)
  return new_params, new_state


def _run(tx, skipped_steps=(), donate=True, count=0):
  params = _params(0)
  opt_state = tx.init(params)
  if count:  # Every step counter (Adam's and the schedule's) as after `count` steps.
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, count) if "count" in jax.tree_util.keystr(path) else x,
        opt_state)
  step = jax.jit(functools.partial(_step, tx), donate_argnums=(0, 1) if donate else ())
  history = []
  for i in range(6):
    grads = jax.tree.map(lambda p, i=i: jnp.asarray(
        np.random.default_rng(100 + i).standard_normal(p.shape), jnp.float32), params)
    params, opt_state = step(params, opt_state, grads, jnp.asarray(i in skipped_steps))
    history.append(jax.tree.map(np.asarray, (params, opt_state)))
  return history


def test_init_is_optax_adams():
  tx = adam.fused_adam(SCHEDULE)
  params = _params(0)
  assert (jax.tree.structure(tx.init(params))
          == jax.tree.structure(optax.adam(SCHEDULE).init(params)))  # Checkpoints are the same.


def test_large_parameters_take_the_kernel():
  tx = adam.fused_adam(SCHEDULE)
  params = _params(0)
  hlo = jax.jit(functools.partial(_step, tx)).lower(
      params, tx.init(params), params, jnp.asarray(False)).as_text()
  assert hlo.count("fashion_jax_adam") == 2  # "big" and the conv kernel, not the bias.


@pytest.mark.parametrize("skipped,weight_decay", [((), 0.0), ((1, 4), 0.0), ((2,), 0.3)])
def test_matches_optax(skipped, weight_decay):
  want = _run(optax.adamw(SCHEDULE, weight_decay=weight_decay) if weight_decay
              else optax.adam(SCHEDULE), skipped)
  got = _run(adam.fused_adam(SCHEDULE, weight_decay=weight_decay), skipped)
  for i, (w, g) in enumerate(zip(want, got)):
    assert jax.tree.structure(w) == jax.tree.structure(g)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g)):
      # Each step's update is ~lr = 1e-2 per element: float32 rounding of it, not of p (ATOL).
      np.testing.assert_allclose(b, a, rtol=2e-6, atol=ATOL, err_msg=f"after step {i}")
  for i in skipped:  # Parameters and moments as before the step; the counters advance.
    before, after = got[i - 1], got[i]
    for a, b in zip(jax.tree.leaves((before[0], before[1][0].mu, before[1][0].nu)),
                    jax.tree.leaves((after[0], after[1][0].mu, after[1][0].nu))):
      np.testing.assert_array_equal(a, b)
    assert after[1][0].count == before[1][0].count + 1


@pytest.mark.parametrize("count", [400, 30_000])
def test_matches_optax_once_bias_corrections_are_one(count):
  """1 - 0.9^t is exactly 1 in float32 from t ~ 160, 1 - 0.999^t from ~17,300: the kernel skips
  those divisions there (the steps from 0 above make both)."""
  assert (np.float32(1) - np.float32(0.9) ** np.float32(count + 1)) == 1
  assert (np.float32(1) - np.float32(0.999) ** np.float32(count + 1) == 1) == (count > 20_000)
  want = _run(optax.adam(SCHEDULE), count=count)
  got = _run(adam.fused_adam(SCHEDULE), count=count)
  for i, (w, g) in enumerate(zip(want, got)):
    assert int(jax.tree.leaves(g[1])[0]) == count + i + 1  # The counters did start there.
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g)):
      np.testing.assert_allclose(b, a, rtol=2e-6, atol=ATOL, err_msg=f"after step {i}")


def test_inputs_kept_without_donation():
  """The kernel writes its outputs in place of its inputs: XLA must copy what is not donated."""
  tx = adam.fused_adam(optax.constant_schedule(1e-2))
  params = _params(0)
  opt_state = tx.init(params)
  keep = jax.tree.map(np.array, (params, opt_state))
  step = jax.jit(functools.partial(_step, tx))
  new_params, _ = step(params, opt_state, params, jnp.asarray(False))
  for a, b in zip(jax.tree.leaves(keep), jax.tree.leaves((params, opt_state))):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(new_params["big"], keep[0]["big"])


def test_create_optimizer_fuses_where_the_kernels_run():
  config = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 1e-3,
                                      "warmup_steps": 0, "lr_schedule": "constant",
                                      "conv_impl": "auto"})
  assert isinstance(steps.create_optimizer(config), adam.FusedAdam) == native.available()
  config.conv_impl = "xla"
  assert not isinstance(steps.create_optimizer(config), adam.FusedAdam)
  config.conv_impl, config.optimizer, config.weight_decay = "auto", "adamw", 1e-4
  tx = steps.create_optimizer(config)
  assert isinstance(tx, adam.FusedAdam) == native.available() and tx.weight_decay == 1e-4
  config.momentum, config.optimizer = 0.9, "sgd"
  assert not isinstance(steps.create_optimizer(config), adam.FusedAdam)
