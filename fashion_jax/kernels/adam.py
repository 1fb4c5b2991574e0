"""optax.adam's (adamw's) update with the step's non-finite guard, one native pass per parameter.

The train step updates with optax and keeps the old state where the loss or a gradient is not
finite (`steps.train_step`). XLA:CPU compiles that, for each parameter, into four loops over its
arrays: the gradient's squares (shared by the guard's norm and Adam's second moment), then m,
v and p, each `where(bad, old, new)` a loop of its own. For the classic CNN's Dense(1600 -> 128)
kernel that was ~0.4 ms of a 2.6 ms step at the default batch of 32 (Zen 3, two cores). The
native kernel (`csrc/conv_pool.cc`, section 6) reads g, p, m and v once and writes p, m and v in
place (its outputs alias its inputs), or writes nothing on a skipped step.

`FusedAdam` is `optax.adam`, or `optax.adamw` with a weight decay (the same init, update and
state, so checkpoints are the same either way), plus what `apply` needs: the train step computes
optax's update as before, then `apply` replaces the parameters and moments of the parameters with
at least `MIN_SIZE` elements by the native kernel's; XLA drops optax's unused computation for
them. The step counters and the small parameters stay optax's. Results equal optax's to float32
rounding (tests/test_adam.py).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fashion_jax.kernels import native

MIN_SIZE = 1 << 14  # Elements; smaller parameters (biases, Dense(128 -> 10)) keep XLA's loops.


class FusedAdam(NamedTuple):
  """`optax.adam(schedule, b1, b2, eps)` (`optax.adamw(..., weight_decay)` where that is not 0),
  which `steps.train_step` applies natively (`apply`)."""
  init: Callable
  update: Callable
  schedule: Callable[[jax.Array], jax.Array]
  b1: float
  b2: float
  eps: float
  weight_decay: float


def fused_adam(schedule: Callable[[jax.Array], jax.Array], b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.0) -> FusedAdam:
  """optax.adam with these hyperparameters (its defaults), or optax.adamw (every parameter
  decayed) with a weight decay. ValueError without the kernels."""
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  tx = (optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay) if weight_decay
        else optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  return FusedAdam(tx.init, tx.update, schedule, b1, b2, eps, weight_decay)


def _find(opt_state, kind) -> int:
  found = [i for i, s in enumerate(opt_state) if isinstance(s, kind)]
  if len(found) != 1:
    raise ValueError(f"FusedAdam: expected optax.adam's state, one {kind.__name__} in "
                     f"{type(opt_state).__name__}, found {len(found)}")
  return found[0]


def apply(tx: FusedAdam, grads, old_params, old_opt_state, params, opt_state,
          skip: jax.Array) -> tuple[Any, Any]:
  """(params, opt_state) with the large parameters' p, m and v from the native update (on CPU).

  `old_*`: the state before the step; `params`, `opt_state`: after optax's update and the
  guard (`skip`: the step keeps the old state), whose counters and small parameters are kept.
  """
  adam_at = _find(old_opt_state, optax.ScaleByAdamState)
  schedule_at = _find(old_opt_state, optax.ScaleByScheduleState)
  old_adam, new_adam = old_opt_state[adam_at], opt_state[adam_at]
  # As optax: the learning rate of the schedule's count before the step, Adam's bias corrections
  # of its count after it (which counts skipped steps too: `steps._skipped_opt_state`).
  step = -tx.schedule(old_opt_state[schedule_at].count)
  count = new_adam.count
  scalars = jnp.stack([jnp.asarray(step, jnp.float32),
                       jnp.asarray(1 - tx.b1 ** count, jnp.float32),
                       jnp.asarray(1 - tx.b2 ** count, jnp.float32), skip.astype(jnp.float32)])
  attributes = {"b1": np.float32(tx.b1), "b2": np.float32(tx.b2),
                "one_minus_b1": np.float32(1 - tx.b1), "one_minus_b2": np.float32(1 - tx.b2),
                "eps": np.float32(tx.eps), "eps_root": np.float32(0.0),
                "weight_decay": np.float32(tx.weight_decay)}

  def update(g, p_old, m_old, v_old, p_new, m_new, v_new):
    if p_old.size < MIN_SIZE or not p_old.dtype == g.dtype == m_old.dtype == jnp.float32:
      return p_new, m_new, v_new
    shape = jax.ShapeDtypeStruct(p_old.shape, jnp.float32)
    return native.call("fashion_jax_adam", (shape, shape, shape), g, p_old, m_old, v_old,
                       scalars, input_output_aliases={1: 0, 2: 1, 3: 2}, **attributes)

  treedef = jax.tree.structure(params)
  leaves = [treedef.flatten_up_to(t) for t in (grads, old_params, old_adam.mu, old_adam.nu,
                                               params, new_adam.mu, new_adam.nu)]
  p, m, v = zip(*(update(*leaf) for leaf in zip(*leaves))) if leaves[0] else ((), (), ())
  unflatten = lambda xs: jax.tree.unflatten(treedef, list(xs))
  opt_state = list(opt_state)
  opt_state[adam_at] = new_adam._replace(mu=unflatten(m), nu=unflatten(v))
  return unflatten(p), type(old_opt_state)(opt_state)
