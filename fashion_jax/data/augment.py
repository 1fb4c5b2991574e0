"""Data augmentation inside the jitted train step (on device, no host round trip).

Every function takes a PRNG key and a float batch [B, H, W, C] in [0, 1] and
is a pure function of the key, so augmentation is a function of (seed, step)
and resumed runs are exact.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def random_translate(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
  """Zero-pads by `pad` pixels and crops back at a random offset per image."""
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda image, offset: lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def random_erasing(key: jax.Array, images: jax.Array, prob: float,
                   area: tuple[float, float] = (0.02, 0.25),
                   log_ratio: tuple[float, float] = (-1.2, 1.2)) -> jax.Array:
  """Random erasing (Zhong et al. 2017): with probability `prob` per image, one
  rectangle of random area fraction and aspect ratio is filled with noise."""
  b, h, w, c = images.shape
  k_apply, k_area, k_ratio, k_y, k_x, k_fill = jax.random.split(key, 6)
  frac = jax.random.uniform(k_area, (b,), minval=area[0], maxval=area[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=log_ratio[0], maxval=log_ratio[1]))
  eh = jnp.clip(jnp.round(jnp.sqrt(frac * h * w * ratio)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(frac * h * w / ratio)), 1, w).astype(jnp.int32)
  y0 = (jax.random.uniform(k_y, (b,)) * (h - eh + 1)).astype(jnp.int32)
  x0 = (jax.random.uniform(k_x, (b,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= y0[:, None, None]) & (rows < (y0 + eh)[:, None, None])
            & (cols >= x0[:, None, None]) & (cols < (x0 + ew)[:, None, None]))
  erase = jax.random.bernoulli(k_apply, prob, (b, 1, 1)) & inside
  noise = jax.random.uniform(k_fill, images.shape, images.dtype)
  return jnp.where(erase[..., None], noise, images)


def make_augment(translate: int = 0, flip: bool = False, erasing: float = 0.0):
  """The configured augmentation as one function (key, images) -> images, or None if off."""
  if not translate and not flip and not erasing:
    return None

  def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    k_translate, k_flip, k_erase = jax.random.split(key, 3)
    if translate:
      images = random_translate(k_translate, images, translate)
    if flip:
      images = random_flip(k_flip, images)
    if erasing:
      images = random_erasing(k_erase, images, erasing)
    return images
  return augment
