"""Data augmentation inside the jitted train step (on device, no host round trip).

Every function takes a PRNG key and a float batch [B, H, W, C] in [0, 1] and
is a pure function of the key, so augmentation is a function of (seed, step)
and resumed runs are exact.

Under `pmap` (`axis_name`: each device holds rows [i*B, (i+1)*B) of the global
batch) the random values are drawn for the global batch and each device takes
its rows, so every image gets the draw it gets under `mesh` or on one device:
the parallel modes train alike, and a run resumes alike under another mode or
device count.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def draw_rows(draw, key: jax.Array, shape, axis_name: str | None = None) -> jax.Array:
  """`draw(key, shape)`, a random array whose leading dimension is the batch's; under pmap
  (`axis_name`) drawn for the global batch (the devices' batches one after the other), and this
  device's rows returned."""
  shape = tuple(shape)
  if axis_name is None:
    return draw(key, shape)
  devices = lax.psum(1, axis_name)  # The axis size, a constant.
  drawn = draw(key, (devices * shape[0],) + shape[1:])
  return lax.dynamic_slice_in_dim(drawn, lax.axis_index(axis_name) * shape[0], shape[0], 0)


def random_translate(key: jax.Array, images: jax.Array, pad: int,
                     axis_name: str | None = None) -> jax.Array:
  """Zero-pads by `pad` pixels and crops back at a random offset per image."""
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = draw_rows(lambda k, s: jax.random.randint(k, s, 0, 2 * pad + 1), key, (b, 2),
                      axis_name)
  crop = lambda image, offset: lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = draw_rows(lambda k, s: jax.random.bernoulli(k, 0.5, s), key, (images.shape[0], 1, 1, 1),
                   axis_name)
  return jnp.where(flip, images[:, :, ::-1, :], images)


def random_erasing(key: jax.Array, images: jax.Array, prob: float,
                   area: tuple[float, float] = (0.02, 0.25),
                   log_ratio: tuple[float, float] = (-1.2, 1.2),
                   axis_name: str | None = None) -> jax.Array:
  """Random erasing (Zhong et al. 2017): with probability `prob` per image, one
  rectangle of random area fraction and aspect ratio is filled with noise."""
  b, h, w, c = images.shape
  k_apply, k_area, k_ratio, k_y, k_x, k_fill = jax.random.split(key, 6)
  uniform = lambda k, low=0.0, high=1.0, shape=(b,), dtype=jnp.float32: draw_rows(
      lambda k, s: jax.random.uniform(k, s, dtype, minval=low, maxval=high), k, shape, axis_name)
  frac = uniform(k_area, *area)
  ratio = jnp.exp(uniform(k_ratio, *log_ratio))
  eh = jnp.clip(jnp.round(jnp.sqrt(frac * h * w * ratio)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(frac * h * w / ratio)), 1, w).astype(jnp.int32)
  y0 = (uniform(k_y) * (h - eh + 1)).astype(jnp.int32)
  x0 = (uniform(k_x) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= y0[:, None, None]) & (rows < (y0 + eh)[:, None, None])
            & (cols >= x0[:, None, None]) & (cols < (x0 + ew)[:, None, None]))
  erase = draw_rows(lambda k, s: jax.random.bernoulli(k, prob, s), k_apply, (b, 1, 1),
                    axis_name) & inside
  noise = uniform(k_fill, shape=images.shape, dtype=images.dtype)
  return jnp.where(erase[..., None], noise, images)


def make_augment(translate: int = 0, flip: bool = False, erasing: float = 0.0):
  """The configured augmentation as one function (key, images) -> images, or None if off."""
  if not translate and not flip and not erasing:
    return None

  def augment(key: jax.Array, images: jax.Array, axis_name: str | None = None) -> jax.Array:
    k_translate, k_flip, k_erase = jax.random.split(key, 3)
    if translate:
      images = random_translate(k_translate, images, translate, axis_name)
    if flip:
      images = random_flip(k_flip, images, axis_name)
    if erasing:
      images = random_erasing(k_erase, images, erasing, axis_name=axis_name)
    return images
  return augment
