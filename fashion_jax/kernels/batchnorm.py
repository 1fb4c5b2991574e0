"""BatchNorm with batch statistics, then ReLU, as native CPU kernels (cnn_bn's Conv-BN-ReLU).

XLA:CPU runs a training BatchNorm + ReLU and its gradient as about eight full-size passes over
the activation: it materializes y - mean, then the ReLU's masked gradient and its product with
the normalized input for the gradient's sums (its reductions do not fuse with what feeds them),
then dy. `batch_norm_relu` makes it two passes each way (`csrc/conv_pool.cc`): the
statistics, then z = max((y - mean) a + bias, 0); the gradient's two sums, then dy. It can also
write z with the zero border of the SAME-padded convolution that follows, which saves that
pass too. `batch_norm_relu_pool` also takes the 2x2 max-pool that follows (cnn_bn's last
BatchNorm of each block): it writes only the pooled z and each window's argmax, and its
gradient passes read the pooled dz, so the full-size z and the pool's passes over it and over
its gradient are gone.

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
  scale, bias = (native.channel_vector(a, y.shape[-1], name)
                 for a, name in ((scale, "scale"), (bias, "bias")))
  z, mean, var = _bn_relu(y, scale, bias, float(epsilon), axis_name, int(pad))
  return z, lax.stop_gradient(mean), lax.stop_gradient(var)


def supports_pool(y: jax.Array) -> bool:
  """Whether `batch_norm_relu_pool` handles y: `supports` for images of even height and width."""
  return supports(y) and y.ndim == 4 and y.shape[1] % 2 == 0 and y.shape[2] % 2 == 0


def batch_norm_relu_pool(y: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
                         axis_name: str | None = None):
  """2x2 VALID max-pool of `batch_norm_relu`'s z, in the same kernels' passes: returns (pooled
  z [N, H/2, W/2, C], mean, var). The pool's gradient goes to each window's first maximal tap,
  as `ops.max_pool_2x2`'s does. Raises ValueError where `supports_pool` is False or the kernels
  are unavailable."""
  if not supports_pool(y):
    raise ValueError(f"native batch_norm_relu_pool does not support y {y.shape} {y.dtype}; see "
                     "batchnorm.supports_pool")
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  scale, bias = (native.channel_vector(a, y.shape[-1], name)
                 for a, name in ((scale, "scale"), (bias, "bias")))
  z, mean, var = _bn_relu_pool(y, scale, bias, float(epsilon), axis_name)
  return z, lax.stop_gradient(mean), lax.stop_gradient(var)


def _sums(target, y, *args, **attributes):
  return native.call(target, jax.ShapeDtypeStruct((2, y.shape[-1]), jnp.float32), y, *args,
                     **attributes)


def _pixels(y) -> int:
  return y.size // y.shape[-1]


def _statistics(y, scale, bias, epsilon, axis_name):
  """The batch mean and (clipped) variance, and what the kernels and the gradient need: scale,
  1 / sqrt(var + epsilon), coef [a, t, mean], whether the variance was positive."""
  moments = _sums("fashion_jax_bn_stats", y) / _pixels(y)  # E[y], E[y^2]
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean, var_raw = moments[0], moments[1] - jnp.square(moments[0])
  var = jnp.maximum(var_raw, 0.0)  # Round-off can make it negative.
  inv = lax.rsqrt(var + epsilon)
  coef = jnp.stack([scale * inv, bias, mean])
  return mean, var, (scale, inv, coef, var_raw > 0)


def _forward(y, scale, bias, epsilon, axis_name, pad):
  mean, var, stats = _statistics(y, scale, bias, epsilon, axis_name)
  shape = list(y.shape)
  if pad:
    shape[1] += 2 * pad
    shape[2] += 2 * pad
  z = native.call("fashion_jax_bn_relu_fwd", jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
                  y, stats[2], pad=np.int32(pad))
  return (z, mean, var), (y, stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_relu(y, scale, bias, epsilon, axis_name, pad):
  return _forward(y, scale, bias, epsilon, axis_name, pad)[0]


def _gradient(y, stats, axis_name, sums_of, dy_of):
  """z = max(s x + t, 0) with x = (y - mean) inv: g = dz where z > 0; dt = sum g, ds = sum g x
  (this device's: s and t are its own inputs), dy = s inv (g - Dt / n - x Ds / n) with Dt, Ds
  those sums over every device whose statistics were averaged (the transpose of the pmean), n
  all their pixels. The last term only where the variance was not clipped (its gradient is zero
  there). sums_of(coef) runs the sums' kernel, dy_of(coef6) the gradient's."""
  scale, inv, coef, var_positive = stats
  sums = sums_of(coef)  # sum g, sum g (y - mean)
  dbias, dscale = sums[0], sums[1] * inv
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  n = _pixels(y) if axis_name is None else _pixels(y) * lax.psum(1, axis_name)
  c1 = scale * inv
  c3 = jnp.where(var_positive, -c1 * inv * inv * sums[1] / n, 0.0)
  dy = dy_of(jnp.concatenate([coef, jnp.stack([c1, -c1 * sums[0] / n, c3])]))
  return dy, dscale, dbias


def _backward(epsilon, axis_name, pad, residuals, cotangents):
  del epsilon
  dz = cotangents[0]  # mean and var leave `batch_norm_relu` without gradient.
  y, stats = residuals
  return _gradient(
      y, stats, axis_name,
      lambda coef: _sums("fashion_jax_bn_relu_grad_sums", y, dz, coef, pad=np.int32(pad)),
      lambda coef: native.call("fashion_jax_bn_relu_grad",
                               jax.ShapeDtypeStruct(y.shape, jnp.float32), y, dz, coef,
                               pad=np.int32(pad)))


_bn_relu.defvjp(_forward, _backward)


def _pool_forward(y, scale, bias, epsilon, axis_name):
  mean, var, stats = _statistics(y, scale, bias, epsilon, axis_name)
  n, h, w, c = y.shape
  z, arg = native.call("fashion_jax_bn_relu_pool_fwd",
                       (jax.ShapeDtypeStruct((n, h // 2, w // 2, c), jnp.float32),
                        jax.ShapeDtypeStruct((n, h // 2, w // 2, c), jnp.int8)), y, stats[2])
  return (z, mean, var), (y, arg, stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_relu_pool(y, scale, bias, epsilon, axis_name):
  return _pool_forward(y, scale, bias, epsilon, axis_name)[0]


def _pool_backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  dz = cotangents[0]
  y, arg, stats = residuals
  return _gradient(
      y, stats, axis_name,
      lambda coef: _sums("fashion_jax_bn_relu_pool_grad_sums", y, dz, arg, coef),
      lambda coef: native.call("fashion_jax_bn_relu_pool_grad",
                               jax.ShapeDtypeStruct(y.shape, jnp.float32), y, dz, arg, coef))


_bn_relu_pool.defvjp(_pool_forward, _pool_backward)
