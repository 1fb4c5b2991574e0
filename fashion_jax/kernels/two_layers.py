"""The classic CNN's two conv + pool layers as one native CPU op (`conv3x3_pool2_twice`).

Per image the first layer's output stays in the thread's cache for the second, instead of going
to memory between them (the kernels: `csrc/conv_pool.cc`, built and loaded by
`fashion_jax.kernels.native`). Where the second layer's pooled output has sides that are
multiples of 5 (the CNN's 5x5), it runs as Winograd F(5x5, 3x3): its 10x10 conv outputs are 2x2
tiles of 7x7 windows, 196 channel products an image instead of F(2x2, 3x3)'s 400, computed for a
group of images' tiles at once (`two_layer_tile`; its rounding is F(4x4, 3x3)'s order,
`winograd`), and the first layer computes only the 12x12 of its 13x13 output those windows read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.kernels import native


def supports_two_layers(x: jax.Array, k1: jax.Array, k2: jax.Array) -> bool:
  """Whether `conv3x3_pool2_twice` handles these shapes and dtypes (not whether it is built):
  the first layer the direct kernel's (Cin < 8), the second a Winograd one `supports` takes."""
  if not (k2.ndim == 4 and native.supports(x, k1) and x.shape[-1] < native.DIRECT_MAX_CHANNELS):
    return False
  h = native.pooled(x, k1.shape[-1])
  return h.shape[-1] >= native.DIRECT_MAX_CHANNELS and native.supports(h, k2)


def conv3x3_pool2_twice(x: jax.Array, k1: jax.Array, b1: jax.Array, k2: jax.Array,
                        b2: jax.Array, relu: bool = False) -> jax.Array:
  """conv3x3_pool2(conv3x3_pool2(x, k1, b1, relu), k2, b2, relu) as one op on CPU.

  Per image the first layer's pooled output and argmax stay in the thread's cache, where the
  second layer reads them (separately they went to memory: 11 MB at batch 512 for the CNN,
  written once and read twice); under differentiation the forward also writes them out once,
  for the backward (recomputing them there was 5-10 % slower). With F(2x2, 3x3)
  (`two_layer_tile`) outputs are bitwise those of the two layers' own kernels, gradients equal
  to float rounding (summed in other chunks); with F(5x5, 3x3) both are equal to theirs to its
  rounding (RMS error ~2e-6 of the outputs' RMS, `winograd`), and a pooling window's near-ties
  can go to another of its outputs. Raises ValueError where the shapes are not supported
  (`supports_two_layers`) or the kernels are unavailable.
  """
  if not supports_two_layers(x, k1, k2):
    raise ValueError(f"native conv3x3_pool2_twice does not support x {x.shape} {x.dtype}, "
                     f"kernels {k1.shape} {k1.dtype} and {k2.shape} {k2.dtype}; see "
                     "two_layers.supports_two_layers")
  if not native.available():
    raise ValueError("the native CPU kernels are unavailable (see the warning above)")
  return _two_layers(x, k1, native.channel_vector(b1, k1.shape[-1]), k2,
                     native.channel_vector(b2, k2.shape[-1]), bool(relu))


# The second layer's pooled outputs with at most this many F(5x5, 3x3) tiles an image run as
# F(5x5, 3x3) where their sides are multiples of 5 (the CNN's 5x5: 2x2 tiles, 196 products an
# image against F(2x2, 3x3)'s 400). Larger images keep F(2x2, 3x3), blocked per image.
TWO_LAYER_F5_MAX_TILES = 16


def two_layer_tile(x_shape) -> int:
  """The Winograd tile of `conv3x3_pool2_twice`'s second layer for images x_shape: 5 or 2."""
  _, h, w, _ = x_shape
  ph, pw = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
  if ph > 0 and pw > 0 and ph % 5 == 0 and pw % 5 == 0:
    if (2 * ph // 5) * (2 * pw // 5) <= TWO_LAYER_F5_MAX_TILES:
      return 5
  return 2


def first_layer_shape(x_shape, channels: int) -> tuple[int, int, int, int]:
  """h, the first layer's pooled output, as the op computes it (and training keeps it): every
  pooled window, or with F(5x5, 3x3) the first 2 ((hp - 2) // 2) + 2 rows and columns, which its
  tiles' 7x7 windows read (the CNN's 12x12 of 13x13)."""
  n, h, w, _ = x_shape
  hp, wp = (h - 2) // 2, (w - 2) // 2
  if two_layer_tile(x_shape) == 5:
    hp, wp = 2 * ((hp - 2) // 2) + 2, 2 * ((wp - 2) // 2) + 2
  return n, hp, wp, channels


# The op makes the second layer's Winograd filter U = G k2 G^T itself (U^T for the gradient)
# and returns its kernel's gradient, not dU: no filter-transform ops around it (csrc/conv_pool.cc,
# TwoLayerKernelShapes).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _two_layers(x, k1, b1, k2, b2, relu):
  return native.call("fashion_jax_two_layer_fwd",
                     native.pooled_shapes(native.pooled(x, k1.shape[-1]), k2), x, k1, b1, k2, b2,
                     relu1=np.int32(relu), relu2=np.int32(relu),
                     tile=np.int32(two_layer_tile(x.shape)))[0]


def _two_layers_forward(x, k1, b1, k2, b2, relu):
  """Training's forward: also the first layer's output h and argmax, the backward's inputs: with
  F(5x5, 3x3) only the rows and columns its tiles read (the CNN's first 12x12 of 13x13)."""
  kept = first_layer_shape(x.shape, k1.shape[-1])
  y_shapes = native.pooled_shapes(native.pooled(x, k1.shape[-1]), k2)
  h_shapes = (jax.ShapeDtypeStruct(kept, jnp.float32), jax.ShapeDtypeStruct(kept, jnp.int8))
  y, which2, h, which1 = native.call("fashion_jax_two_layer_train_fwd", y_shapes + h_shapes, x,
                                     k1, b1, k2, b2, relu1=np.int32(relu), relu2=np.int32(relu),
                                     tile=np.int32(two_layer_tile(x.shape)))
  return y, (x, k1, b1, k2, b2, h, which1, which2)


def _two_layers_bwd(relu, residuals, dy):
  x, k1, b1, k2, b2, h, which1, which2 = residuals
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (k1, b1, k2, b2))
  dk1, db1, dk2, db2 = native.call("fashion_jax_two_layer_bwd", shapes, x, h, which1, k2, which2,
                                   dy, tile=np.int32(two_layer_tile(x.shape)))
  # The input gradient (unused, and so removed by XLA, when x is the image): through the two
  # layers' own ops.
  conv = native.conv3x3_pool2
  separate = lambda v: conv(conv(v, k1, b1, relu), k2, b2, relu)
  dx = jax.vjp(separate, x)[1](dy)[0]
  return dx, dk1, db1, dk2, db2


_two_layers.defvjp(_two_layers_forward, _two_layers_bwd)