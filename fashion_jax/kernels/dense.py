"""Dense layers' matmuls on the native CPU kernels.

flax's `nn.Dense` computes `dot_general(x, kernel, ...)` and takes the function as its
`dot_general` attribute, so the models pass `dot_general` from here where their native ops run:
the same parameters and checkpoints, another matmul. It multiplies on the register-blocked
micro-kernel of the fused Winograd layers (`csrc/conv_pool.cc`, section 5), the input gradient
and the weight gradient in one call. XLA:CPU ran the classic CNN's Dense(1600 -> 128) on two Zen 5
cores (peak ~460 GFLOP/s) at 200-350 GFLOP/s at batch 512, its gradients slowest, and at 66-110
GFLOP/s at the default training batch of 32; the kernels at 260-400 at both, and the CNN's step
is ~5 % faster at either batch (BENCHMARKS.md, session 15).

Each output is one float32 accumulator summed over the contraction in order (XLA blocks the sum
differently), so results equal `lax.dot_general`'s to float32 rounding and do not depend on the
thread count (tests/test_native.py).
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

from fashion_jax.kernels import native


def _float32_matmul(x: jax.Array, w: jax.Array) -> bool:
  return (x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0]
          and x.dtype == w.dtype == jnp.float32)


def supports(x: jax.Array, w: jax.Array) -> bool:
  """Whether `matmul(x, w)` runs natively: x [B, D] and w [D, H], float32, with H a multiple of
  `native.lanes()` (not whether the kernels are built)."""
  return _float32_matmul(x, w) and native.fits_lanes(w.shape[1])


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w on the native kernels, differentiable. ValueError where `supports` is False or the
  kernels are unavailable."""
  if not supports(x, w):
    raise ValueError(f"native dense does not support x {x.shape} {x.dtype}, w {w.shape} "
                     f"{w.dtype}; see dense.supports")
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  return _matmul(x, w)


def _matmul_fwd(x, w):
  y = native.call("fashion_jax_dense_fwd",
                  jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32), x, w)
  return y, (x, w)


@jax.custom_vjp
def _matmul(x, w):
  return _matmul_fwd(x, w)[0]


def _matmul_bwd(residuals, dy):
  x, w = residuals
  return tuple(native.call("fashion_jax_dense_bwd",
                           (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            jax.ShapeDtypeStruct(w.shape, jnp.float32)), x, w, dy))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _padded_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w on the kernels with w's columns padded with zeros to whole vectors, and y's cut back
  (the classifiers' Dense(128 -> 10), cnn_bn's 256 -> 10: XLA ran the CNN's three small
  matmuls at 14-23 us each; its training step at batch 32 takes ~5 % less this way on session
  31's Xeon). The padded columns' products are zeros that are never read; their gradients are
  dropped by the pad's transpose."""
  h = w.shape[1]
  padded = jnp.pad(w, ((0, 0), (0, -h % native.lanes())))
  return _matmul(x, padded)[:, :h]


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for `nn.Dense(dot_general=...)`: `matmul` where lhs's last axis
  contracts with a 2-D rhs's first, no batch axes, float32 (lhs's leading axes flattened; rhs's
  columns padded to whole vectors where the kernels' width does not divide them:
  `_padded_matmul`); `lax.dot_general` otherwise. The native sum is float32 throughout, so any
  `precision` is met."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and lhs.ndim >= 1 and tuple(lhs_contract) == (lhs.ndim - 1,)
      and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch
      and preferred_element_type in (None, jnp.float32)):
    flat = lhs.reshape((math.prod(lhs.shape[:-1]), lhs.shape[-1]))
    if _float32_matmul(flat, rhs) and native.available():
      multiply = _matmul if native.fits_lanes(rhs.shape[1]) else _padded_matmul
      return multiply(flat, rhs).reshape((*lhs.shape[:-1], rhs.shape[1]))
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
