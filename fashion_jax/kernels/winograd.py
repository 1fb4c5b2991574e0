"""3x3 convolution fused with 2x2 max-pooling by Winograd's minimal filtering.

`conv3x3_pool2(x, kernel, bias)` computes exactly the reference

    reduce_window_max_2x2(conv_valid_3x3(x, kernel) + bias)

with Winograd's F(2x2, 3x3) algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2015): each 2x2 block of outputs comes from the
4x4 input window above it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

so the channel contraction is 16 matrix multiplies [tiles, C] x [C, K] instead
of 9 for every output pixel: 16 multiplies per 4 outputs instead of 36, 2.25x
fewer FLOPs. The forward, the input gradient and the weight gradient are all
such batched matmuls (the backward is written by hand so that each is one large
matmul in the layout XLA:CPU runs fastest).

`conv3x3(x, kernel)` is the same algorithm for a 3x3 convolution on its own
(`conv_impl="winograd"` for the models whose convolutions are not followed by a
pool); its four outputs per tile are interleaved back into the image.

Why it fits the classic CNN: a 2x2 output tile is exactly a 2x2 pooling window,
so the pooling (and its argmax for the backward) happens right on the four
outputs of each tile, and the conv's odd last row/column, which VALID pooling
drops, is never computed. Measured on 2 CPU cores (BENCHMARKS.md) this is the
fastest formulation for the 32->64 channel layer; for 1 input channel the
transforms cost more than they save and im2col stays faster.

The native plain convolution (`fashion_jax.kernels.plain_conv`) also runs
F(4x4, 3x3) where its output's sides are multiples of 4: 6x6 windows, 36
multiplies per 16 outputs (2.25 per output against 4); `filter_transform(kernel,
tile=4)` is its U, the rest is in C++.

The native two-layer op (`two_layers.conv3x3_pool2_twice`, the classic CNN's pair)
runs its second layer as F(5x5, 3x3) where the pooled output's sides are
multiples of 5: points 0, +-1, +-2, 1/2 and infinity, 7x7 windows, 49 multiplies
per 25 outputs (1.96 per output); the CNN's 10x10 conv outputs that the pool
reads are 2x2 such tiles (400 products an image with F(2x2, 3x3), 196 here).
`filter_transform(kernel, tile=5)` is its U.

Numerics: the transforms are exact in binary (0, +-1, +-1/2), outputs agree with
`lax.conv_general_dilated` to float32 rounding (tests compare outputs and
gradients). F(4x4, 3x3)'s are not (factors 4, 5, 8, sixths): on ReLU'd inputs
with 32 channels its outputs' RMS error is 1.1e-6 of their RMS (max 2.3e-5),
against 1.8e-7 for F(2x2, 3x3) and 2.2e-7 for the direct sums in float32.
F(5x5, 3x3)'s B^T and A^T are exact in binary (halves, powers of two) and G has
thirds to forty-fifths: 1.9e-6 RMS (max 1.8e-5) in the same numpy model (64
outputs, 20 windows; F(4x4, 3x3) 1.2e-6, F(2x2, 3x3) 1.9e-7 there); through
the two-layer op against `lax` at HIGHEST precision, max errors 7-9e-6 of the
outputs' RMS and 1-4e-6 for the gradients.
Ties in a pooling window (common on Fashion-MNIST's blank
background, where all four outputs are exactly the bias) send the gradient to
the first maximum in row-major order, as the transpose of `reduce_window` does.
Rounding can still break an exact tie of the direct convolution: on 1,000 real
test images with random weights, 7 of 1.6M windows pick a different maximum
than `lax` (6 of them exact ties there, where either choice is a valid
subgradient). Harmless for training, but it makes runs whose parameters differ
in the last bit (e.g. all-reduced in another order) drift apart faster.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# Both sides of each 2-D transform at once, acting on a tile flattened row-major:
_BB = np.kron(_BT, _BT)  # [16, 16] input tile d -> B^T d B
_GG = np.kron(_G, _G)    # [16, 9]  filter g -> G g G^T
_AA = np.kron(_AT, _AT)  # [4, 16]  product m -> A^T m A (the four outputs y00 y01 y10 y11)
# F(4x4, 3x3)'s filter transform (points 0, +-1, +-2, infinity; its input and output transforms
# run in the native kernels only, fashion_jax/kernels/plain_conv.py): [36, 9].
_G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_GG4 = np.kron(_G4, _G4).astype(np.float32)
# F(5x5, 3x3)'s (points 0, +-1, +-2, 1/2, infinity; the two-layer op's second layer,
# fashion_jax/kernels/native.py): [49, 9].
_G5 = np.array([[-1 / 2, 0, 0], [-1 / 3, -1 / 3, -1 / 3], [1 / 9, -1 / 9, 1 / 9],
                [1 / 36, 1 / 18, 1 / 9], [-1 / 60, 1 / 30, -1 / 15], [32 / 45, 16 / 45, 8 / 45],
                [0, 0, 1]])
_GG5 = np.kron(_G5, _G5).astype(np.float32)
_FILTER_MATRICES = {2: _GG, 4: _GG4, 5: _GG5}

# The weight gradient contracts over all tiles; splitting them into this many
# chunks (summed afterwards) lets XLA:CPU run the chunks' matmuls on both cores.
_WEIGHT_GRAD_CHUNKS = 2


def tile_counts(x_shape, pooled: bool) -> tuple[int, int]:
  """2x2 output tiles per image of a VALID 3x3 conv on `x_shape`.

  Pooled: the tiles the 2x2 VALID pool needs (an odd last row/column is
  dropped). Not pooled: tiles covering the whole conv output (the last one may
  overhang and is cropped).
  """
  _, h, w, _ = x_shape
  smallest, name = (4, "conv3x3_pool2") if pooled else (3, "conv3x3")
  if h < smallest or w < smallest:
    raise ValueError(f"{name} needs inputs of at least {smallest}x{smallest} pixels, got {h}x{w}")
  return ((h - 2) // 2, (w - 2) // 2) if pooled else ((h - 1) // 2, (w - 1) // 2)


def _tiles(x: jax.Array, th: int, tw: int) -> jax.Array:
  """[B,H,W,C] -> [16, B*th*tw, C]: the 4x4 input window of every 2x2 output tile.

  Windows overlap by 2, so the input is viewed as 2x2 blocks ("space to
  depth") and each window is 2x2 neighbouring blocks: four block-shifted
  slices and one transpose, no gathers.
  """
  b, c = x.shape[0], x.shape[-1]
  blocks = x[:, :2 * th + 2, :2 * tw + 2].reshape(b, th + 1, 2, tw + 1, 2, c)
  shifted = jnp.stack([jnp.stack([blocks[:, p:p + th, :, q:q + tw] for q in range(2)])
                       for p in range(2)])  # [p, q, B, i, u, j, v, C]
  # Window row r = 2p + u, column s = 2q + v.
  return shifted.transpose(0, 4, 1, 6, 2, 3, 5, 7).reshape(16, b * th * tw, c)


def _untiles(windows: jax.Array, x_shape, th: int, tw: int) -> jax.Array:
  """The transpose of `_tiles`: adds each window back where it came from."""
  b, h, w, c = x_shape
  d = windows.reshape(2, 2, 2, 2, b, th, tw, c).transpose(0, 2, 4, 5, 1, 6, 3, 7)

  def shift(a, p, q):  # Block (i, j) of window (p, q) lands on block (i + p, j + q).
    return jnp.pad(a, ((0, 0), (p, 1 - p), (0, 0), (q, 1 - q), (0, 0), (0, 0)))

  blocks = shift(d[0, 0], 0, 0) + shift(d[0, 1], 0, 1) + shift(d[1, 0], 1, 0) + shift(d[1, 1], 1, 1)
  dx = blocks.reshape(b, 2 * th + 2, 2 * tw + 2, c)
  return jnp.pad(dx, ((0, 0), (0, h - 2 * th - 2), (0, w - 2 * tw - 2), (0, 0)))


def input_transform(x: jax.Array, th: int, tw: int) -> jax.Array:
  """V = B^T d B for the 4x4 input window d of every tile: [B,H,W,C] -> [16, B*th*tw, C]."""
  c = x.shape[-1]
  return (jnp.asarray(_BB, x.dtype) @ _tiles(x, th, tw).reshape(16, -1)).reshape(16, -1, c)


def input_transform_grad(dv: jax.Array, x_shape, th: int, tw: int) -> jax.Array:
  """The transpose of `input_transform`: dx [B,H,W,C] from dV [16, tiles, C]."""
  c = dv.shape[-1]
  d_windows = (jnp.asarray(_BB, dv.dtype).T @ dv.reshape(16, -1)).reshape(16, -1, c)
  return _untiles(d_windows, x_shape, th, tw)


def _filter_matrix(tile: int) -> np.ndarray:
  if tile not in _FILTER_MATRICES:
    raise ValueError(f"Winograd tiles are 2 (F(2x2, 3x3)), 4 (F(4x4, 3x3)) or 5 (F(5x5, 3x3)), "
                     f"got {tile}")
  return _FILTER_MATRICES[tile]


def filter_transform(kernel: jax.Array, tile: int = 2) -> jax.Array:
  """U = G g G^T for each (input, output) channel pair: HWIO [3,3,C,K] -> [16, C, K] (F(2x2,
  3x3)), [36, C, K] with tile=4 (F(4x4, 3x3)) or [49, C, K] with tile=5 (F(5x5, 3x3))."""
  _, _, c, k = kernel.shape
  gg = jnp.asarray(_filter_matrix(tile), kernel.dtype)
  return (gg @ kernel.reshape(9, c * k)).reshape(gg.shape[0], c, k)


def product(v: jax.Array, u: jax.Array) -> jax.Array:
  """M = V U: the channel contraction, 16 matmuls [n, C] x [C, K] -> [16, n, K]."""
  return jnp.einsum("xnc,xck->xnk", v, u)


def product_grads(v: jax.Array, u: jax.Array,
                  dm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gradients of `product` (and `filter_transform`): dV [16, n, C] and the kernel's [3,3,C,K]."""
  c, k = u.shape[1], u.shape[2]
  n = v.shape[1]
  chunks = _WEIGHT_GRAD_CHUNKS if n % _WEIGHT_GRAD_CHUNKS == 0 else 1
  du = jnp.einsum("xpnc,xpnk->xpck", v.reshape(16, chunks, n // chunks, c),
                  dm.reshape(16, chunks, n // chunks, k)).sum(axis=1)
  return jnp.einsum("xnk,xck->xnc", dm, u), filter_transform_grad(du)


def filter_transform_grad(du: jax.Array) -> jax.Array:
  """The transpose of `filter_transform`: the kernel's gradient [3,3,C,K] from dU [16, C, K]
  (F(2x2, 3x3)), [36, C, K] (F(4x4, 3x3)) or [49, C, K] (F(5x5, 3x3))."""
  p, c, k = du.shape
  gg = _filter_matrix(math.isqrt(p) - 2)  # (tile + 2)^2 planes.
  return (jnp.asarray(gg, du.dtype).T @ du.reshape(p, c * k)).reshape(3, 3, c, k)


def _transformed_product(x, kernel, th, tw):
  """The Winograd-domain input V [16, n, C], filter U [16, C, K] and the four
  outputs of every tile [4, n*K] (y00, y01, y10, y11), n = B*th*tw tiles."""
  v = input_transform(x, th, tw)
  u = filter_transform(kernel)
  return v, u, jnp.asarray(_AA, x.dtype) @ product(v, u).reshape(16, -1)


def _backward(v, u, d_outputs, x_shape, th, tw):
  """Kernel and input gradients from the gradients of the tiles' four outputs [4, n*K]."""
  dm = (jnp.asarray(_AA, d_outputs.dtype).T @ d_outputs).reshape(16, v.shape[1], u.shape[2])
  dv, d_kernel = product_grads(v, u, dm)
  return input_transform_grad(dv, x_shape, th, tw), d_kernel


def _forward(x, kernel, bias):
  b = x.shape[0]
  k = kernel.shape[-1]
  th, tw = tile_counts(x.shape, pooled=True)
  v, u, outputs = _transformed_product(x, kernel, th, tw)
  outputs = outputs.reshape(4, b, th, tw, k)
  y = jnp.max(outputs, axis=0)
  winner = jnp.argmax(outputs, axis=0).astype(jnp.int8)  # First maximum, like reduce_window.
  return y + bias, (v, u, winner)


@jax.custom_vjp
def conv3x3_pool2(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """max_pool_2x2_valid(conv_3x3_valid(x, kernel) + bias) for NHWC x and HWIO kernel."""
  return _forward(x, kernel, bias)[0]


def _fwd(x, kernel, bias):
  y, (v, u, winner) = _forward(x, kernel, bias)
  return y, (v, u, winner, x.shape)


def _bwd(residuals, dy):
  v, u, winner, x_shape = residuals
  th, tw = tile_counts(x_shape, pooled=True)
  taps = jnp.arange(4, dtype=jnp.int8).reshape(4, 1, 1, 1, 1)
  d_outputs = jnp.where(winner[None] == taps, dy[None], jnp.zeros((), dy.dtype))
  dx, d_kernel = _backward(v, u, d_outputs.reshape(4, -1), x_shape, th, tw)
  return dx, d_kernel, jnp.sum(dy, axis=(0, 1, 2))


conv3x3_pool2.defvjp(_fwd, _bwd)


def pad_to_tiles(x: jax.Array) -> tuple[jax.Array, int, int]:
  """Pads x so whole 2x2 output tiles cover the VALID conv output; returns it and the tile counts."""
  _, h, w, _ = x.shape
  th, tw = tile_counts(x.shape, pooled=False)
  return jnp.pad(x, ((0, 0), (0, 2 * th + 2 - h), (0, 2 * tw + 2 - w), (0, 0))), th, tw


def outputs_to_image(m: jax.Array, x_shape, th: int, tw: int) -> jax.Array:
  """A^T M A for every tile, interleaved back into the (cropped) VALID conv output."""
  b, h, w, _ = x_shape
  k = m.shape[-1]
  outputs = (jnp.asarray(_AA, m.dtype) @ m.reshape(16, -1)).reshape(2, 2, b, th, tw, k)
  y = outputs.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * th, 2 * tw, k)  # (row, col) in the tile.
  return y[:, :h - 2, :w - 2]


def outputs_to_image_grad(dy: jax.Array, x_shape, th: int, tw: int) -> jax.Array:
  """The transpose of `outputs_to_image`: dM [16, tiles, K] from the conv output's gradient."""
  b, h, w, _ = x_shape
  k = dy.shape[-1]
  dy = jnp.pad(dy, ((0, 0), (0, 2 * th - (h - 2)), (0, 2 * tw - (w - 2)), (0, 0)))
  d_outputs = dy.reshape(b, th, 2, tw, 2, k).transpose(2, 4, 0, 1, 3, 5).reshape(4, -1)
  return (jnp.asarray(_AA, dy.dtype).T @ d_outputs).reshape(16, b * th * tw, k)


def _conv_forward(x, kernel):
  xp, th, tw = pad_to_tiles(x)
  v = input_transform(xp, th, tw)
  u = filter_transform(kernel)
  return outputs_to_image(product(v, u), x.shape, th, tw), (v, u)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID, stride-1 3x3 convolution (NHWC x, HWIO kernel) by Winograd F(2x2, 3x3).

  For convolutions not followed by a pool (SAME padding is the caller's
  `jnp.pad`, as for im2col). Odd output sizes are computed on whole tiles and
  cropped.
  """
  return _conv_forward(x, kernel)[0]


def _conv_fwd(x, kernel):
  y, (v, u) = _conv_forward(x, kernel)
  return y, (v, u, x.shape)


def _conv_bwd(residuals, dy):
  v, u, x_shape = residuals
  b, h, w, c = x_shape
  th, tw = tile_counts(x_shape, pooled=False)
  dm = outputs_to_image_grad(dy, x_shape, th, tw)
  dv, d_kernel = product_grads(v, u, dm)
  return input_transform_grad(dv, (b, 2 * th + 2, 2 * tw + 2, c), th, tw)[:, :h, :w], d_kernel


conv3x3.defvjp(_conv_fwd, _conv_bwd)


# Shared by the 2x2 max-pool formulations' gradients (ops.py's select pool, the native kernels).
def unpool_to_argmax(dy: jax.Array, idx: jax.Array, shape) -> jax.Array:
  """The gradient of a 2x2 VALID max-pool: dy at each window's winning tap `idx`
  (0..3, row-major; another value sends it nowhere), zeros elsewhere, in the pooled input's
  `shape`."""
  bsz, h2, w2, ch = dy.shape
  taps = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)
  g = jnp.where(idx[:, :, None, :, None, :] == taps, dy[:, :, None, :, None, :],
                jnp.zeros((), dy.dtype))
  g = g.reshape(bsz, 2 * h2, 2 * w2, ch)
  h, w = shape[1], shape[2]
  if (h, w) != (2 * h2, 2 * w2):
    g = jnp.pad(g, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
  return g
