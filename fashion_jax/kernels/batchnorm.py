"""BatchNorm with batch statistics, then ReLU, as native CPU kernels (cnn_bn's Conv-BN-ReLU).

XLA:CPU runs a training BatchNorm + ReLU and its gradient as about eight full-size passes over
the activation: it materializes y - mean, then the ReLU's masked gradient and its product with
the normalized input for the gradient's sums (its reductions do not fuse with what feeds them),
then dy. `batch_norm_relu` makes it two passes each way (`csrc/conv_pool.cc`): the
statistics, then z = max((y - mean) a + bias, 0); the gradient's two sums, then dy. It can also
write z with the zero border of the SAME-padded convolution that follows, which saves that
pass too.

The math is flax's `nn.BatchNorm` (the default fast variance E[y^2] - E[y]^2, clipped at 0;
the biased variance for the running average) followed by `jax.nn.relu`; tests compare outputs
and gradients with them.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fashion_jax.kernels import native


def supports(y: jax.Array) -> bool:
  """Whether `batch_norm_relu` handles y (not whether the kernels are built): float32
  [N, H, W, C] or [P, C] with C a multiple of `native.lanes()`."""
  return (y.ndim in (2, 4) and y.dtype == jnp.float32 and y.size > 0
          and native.fits_lanes(y.shape[-1]))


def batch_norm_relu(y: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                    axis_name: str | None = None, pad: int = 0):
  """max(BatchNorm(y), 0) over all axes but the last, with batch statistics, on CPU.

  Returns (z, mean, var): z with `pad` zero rows and columns around each image ([N, H, W, C]
  inputs only), and the batch mean and (biased) variance, without gradient, for the running
  averages. `axis_name`: average the statistics over that mapped axis too (pmap). Raises
  ValueError where `supports` is False or the kernels are unavailable.
  """
  if not supports(y) or (pad and y.ndim != 4) or pad < 0:
    raise ValueError(f"native batch_norm_relu does not support y {y.shape} {y.dtype} with "
                     f"pad={pad}; see batchnorm.supports")
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
  z, mean, var = _bn_relu(y, scale, bias, float(epsilon), axis_name, int(pad))
  return z, lax.stop_gradient(mean), lax.stop_gradient(var)


def _sums(target, y, *args, pad=None):
  attributes = {} if pad is None else {"pad": np.int32(pad)}
  return native.call(target, jax.ShapeDtypeStruct((2, y.shape[-1]), jnp.float32), y, *args,
                     **attributes)


def _pixels(y) -> int:
  return y.size // y.shape[-1]


def _forward(y, scale, bias, epsilon, axis_name, pad):
  moments = _sums("fashion_jax_bn_stats", y) / _pixels(y)  # E[y], E[y^2]
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean, var_raw = moments[0], moments[1] - jnp.square(moments[0])
  var = jnp.maximum(var_raw, 0.0)  # Round-off can make it negative.
  inv = lax.rsqrt(var + epsilon)
  coef = jnp.stack([scale * inv, bias, mean])
  shape = list(y.shape)
  if pad:
    shape[1] += 2 * pad
    shape[2] += 2 * pad
  z = native.call("fashion_jax_bn_relu_fwd", jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
                  y, coef, pad=np.int32(pad))
  return (z, mean, var), (y, scale, mean, inv, coef, var_raw > 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_relu(y, scale, bias, epsilon, axis_name, pad):
  return _forward(y, scale, bias, epsilon, axis_name, pad)[0]


def _backward(epsilon, axis_name, pad, residuals, cotangents):
  """z = max(s x + t, 0) with x = (y - mean) inv: g = dz where z > 0; dt = sum g, ds = sum g x
  (this device's: s and t are its own inputs), dy = s inv (g - Dt / n - x Ds / n) with Dt, Ds
  those sums over every device whose statistics were averaged (the transpose of the pmean), n
  all their pixels. The last term only where the variance was not clipped (its gradient is zero
  there)."""
  del epsilon
  dz = cotangents[0]  # mean and var leave `batch_norm_relu` without gradient.
  y, scale, mean, inv, coef, var_positive = residuals
  sums = _sums("fashion_jax_bn_relu_grad_sums", y, dz, coef, pad=pad)  # sum g, sum g (y - mean)
  dbias, dscale = sums[0], sums[1] * inv
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  n = _pixels(y) if axis_name is None else _pixels(y) * lax.psum(1, axis_name)
  c1 = scale * inv
  c3 = jnp.where(var_positive, -c1 * inv * inv * sums[1] / n, 0.0)
  coef = jnp.concatenate([coef, jnp.stack([c1, -c1 * sums[0] / n, c3])])
  dy = native.call("fashion_jax_bn_relu_grad", jax.ShapeDtypeStruct(y.shape, jnp.float32),
                   y, dz, coef, pad=np.int32(pad))
  return dy, dscale, dbias


_bn_relu.defvjp(_forward, _backward)
