"""The 3x3 convolution without a pool (cnn_bn, ResNets) on the native CPU kernels.

- Wide inputs: Winograd, the whole layer fused as for the conv + pool (the same per-block
  transforms and micro-kernel, the outputs written as they are). Its wide layers take half the
  time of the separate transforms around XLA's matmuls they replaced (BENCHMARKS.md).
  F(4x4, 3x3) (36 products per 16 outputs) where the output's sides are multiples of 4
  (cnn_bn's 28x28 layer), F(2x2, 3x3) (16 per 4) elsewhere: `winograd_tile`.
- Few input channels (cnn_bn's first layer, 1 -> 32): the conv + pool's direct kernel, writing
  each window's four outputs instead of their maximum. XLA ran it as an im2col matmul with K = 9
  (a 9x copy of the image first) and the kernel's gradient as a [9, N * H * W] x [N * H * W,
  32] matmul, both limited by memory traffic; the direct kernels read the image and the output
  gradient once.

SAME padding is the caller's `jnp.pad` (`ops.conv_general_dilated_native` and "auto" do it).
Outputs and gradients equal lax's to float32 rounding (tests/test_native.py); F(4x4, 3x3)'s
transforms round a few bits more (within 2.6e-5 of the outputs' RMS; winograd.py).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from fashion_jax.kernels import native


def supports(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether `conv3x3` handles these shapes and dtypes (not whether it is built)."""
  if not (x.ndim == 4 and kernel.ndim == 4 and kernel.shape[:2] == (3, 3)
          and kernel.shape[2] == x.shape[-1] and x.dtype == kernel.dtype == jnp.float32):
    return False
  if x.shape[-1] < native.DIRECT_MAX_CHANNELS:
    return native.fits_lanes(kernel.shape[-1]) and x.shape[1] >= 3 and x.shape[2] >= 3
  return (native.winograd_channels_fit(x.shape[-1], kernel.shape[-1])
          and x.shape[1] >= 3 and x.shape[2] >= 3)


def winograd_tile(x: jax.Array) -> int:
  """The Winograd tile `conv3x3` takes for a wide input x: 4 (F(4x4, 3x3)) where the VALID
  output's sides are multiples of 4, else 2 (F(2x2, 3x3), which pads at most one row and
  column)."""
  _, h, w, _ = x.shape
  return 4 if (h - 2) % 4 == 0 and (w - 2) % 4 == 0 else 2


def conv3x3(x: jax.Array, kernel: jax.Array, tile: int | None = None) -> jax.Array:
  """VALID, stride-1 3x3 convolution, fused, on CPU.

  x NHWC float32, kernel HWIO float32 with Cout a multiple of `native.lanes()`, and either
  Cin < `native.DIRECT_MAX_CHANNELS` (direct kernel, 2x2 outputs at a time) or Cin a multiple of
  the lanes with Cin * Cout at most `native.WINOGRAD_MAX_CHANNEL_PRODUCT` (Winograd with
  `tile` x `tile` outputs at a time, 2 or 4; `winograd_tile` by default) (`supports`). Output
  sides that are not multiples of the tile are computed on zeros padded in and cropped. Raises
  ValueError where `supports` is False or the kernels are unavailable.
  """
  if not supports(x, kernel):
    raise ValueError(f"native conv3x3 does not support x {x.shape} {x.dtype}, "
                     f"kernel {kernel.shape} {kernel.dtype}; see plain_conv.supports")
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  if x.shape[-1] < native.DIRECT_MAX_CHANNELS:
    tile, conv = 2, _direct
  else:
    tile = winograd_tile(x) if tile is None else tile  # 2 or 4: native.filter_transform checks.
    conv = lambda x, kernel: _winograd(x, kernel, tile)
  _, h, w, _ = x.shape
  ph, pw = -(h - 2) % tile, -(w - 2) % tile
  if ph or pw:
    return conv(jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))), kernel)[:, :h - 2, :w - 2]
  return conv(x, kernel)


def _output(x, kernel) -> jax.ShapeDtypeStruct:
  n, h, w, _ = x.shape
  return jax.ShapeDtypeStruct((n, h - 2, w - 2, kernel.shape[-1]), jnp.float32)


def _winograd_forward(x, kernel, tile):
  u = native.filter_transform(kernel, tile)  # [16 or 36, C, K]: the kernels read the tile off it.
  return native.call("fashion_jax_winograd_conv_fwd", _output(x, kernel), x, u), (x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _winograd(x, kernel, tile):
  return _winograd_forward(x, kernel, tile)[0]


def _winograd_bwd(tile, residuals, dy):
  x, kernel = residuals
  ut = native.filter_transform(kernel, tile, transposed=True)
  dx, du = native.call("fashion_jax_winograd_conv_bwd",
                       (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        jax.ShapeDtypeStruct((ut.shape[0],) + kernel.shape[2:], jnp.float32)),
                       x, ut, dy)
  return dx, native.filter_transform_grad(du)


_winograd.defvjp(_winograd_forward, _winograd_bwd)


def _direct_forward(x, kernel):
  return native.call("fashion_jax_direct_conv_fwd", _output(x, kernel), x, kernel), (x, kernel)


@jax.custom_vjp
def _direct(x, kernel):
  return _direct_forward(x, kernel)[0]


def _direct_bwd(residuals, dy):
  x, kernel = residuals
  dkernel = native.call("fashion_jax_direct_conv_bwd",
                        jax.ShapeDtypeStruct(kernel.shape, jnp.float32), x, dy)
  # The input gradient (unused, and so removed by XLA, when x is the image): the transposed
  # convolution, XLA's.
  dx = jax.vjp(lambda v: lax.conv_general_dilated(v, kernel, (1, 1), "VALID",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")),
               x)[1](dy)[0]
  return dx, dkernel


_direct.defvjp(_direct_forward, _direct_bwd)
