"""Synthetic test photos: product-style shots made from 28x28 images, and simple test shapes.

There is no internet here and no real product photos, so the tests make them
from Fashion-MNIST images: undo the data set's recipe (see
fashion_jax/serving/preprocess.py) as a photo studio would present the garment --
smoothly upscaled to hundreds of pixels, dark on a white non-square canvas with
generous margins, a colour instead of gray, a little sensor noise, saved as
JPEG (RGB) or PNG with a transparent background (RGBA).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Garment colours (dark enough to be a product shot on white; not all gray).
COLOURS = ((30, 40, 90), (110, 25, 30), (35, 35, 35), (60, 90, 50), (90, 60, 40), (20, 70, 110))


def product_photo(image: np.ndarray, rng: np.random.Generator, rgba: bool = False,
                  noise: float = 3.0) -> Image.Image:
  """A Fashion-MNIST image [28, 28] (bright on black) as a product photo (dark on white).

  The object is 300-600 px on its long edge, on a canvas with 40-160 px margins
  on each side (so never square by design). With `rgba`, the background is
  transparent and its colour channels are black, which only alpha tells apart.
  """
  side = int(rng.integers(300, 601))
  up = Image.fromarray(np.asarray(image, np.uint8)).resize((side, side),
                                                                Image.Resampling.BICUBIC)
  darkness = np.asarray(up, np.float32) / 255.0  # 1 = the garment's full colour, 0 = white.
  top, bottom, left, right = (int(m) for m in rng.integers(40, 161, size=4))
  height, width = side + top + bottom, side + left + right
  canvas = np.zeros((height, width), np.float32)
  canvas[top:top + side, left:left + side] = darkness
  colour = np.array(COLOURS[int(rng.integers(len(COLOURS)))], np.float32)
  rgb = 255.0 - canvas[..., None] * (255.0 - colour)
  rgb += noise * rng.standard_normal(rgb.shape, dtype=np.float32)
  rgb = np.rint(rgb).clip(0, 255).astype(np.uint8)
  if not rgba:
    return Image.fromarray(rgb)
  # Opaque wherever the garment is visible, fading out over its faint edge.
  alpha = np.rint(np.clip(canvas * 8.0, 0.0, 1.0) * 255).astype(np.uint8)
  rgb[alpha == 0] = 0
  return Image.fromarray(np.dstack([rgb, alpha]))


def dark_rectangle(height: int, width: int, box: tuple[int, int, int, int], *,
                   background: int = 255, value: int = 40) -> np.ndarray:
  """A uint8 [height, width] image: a `value` rectangle `box` = (top, left, bottom, right)."""
  image = np.full((height, width), background, np.uint8)
  top, left, bottom, right = box
  image[top:bottom, left:right] = value
  return image


def garment(width: int = 200, height: int = 240, background: int = 255) -> np.ndarray:
  """A uint8 gray [height, width] 'T-shirt' drawn in proportion to the canvas.

  Dark body and sleeves (40) with a lighter stripe (120) and a neck cut out, on
  `background`, with margins on every side. The same drawing at another size
  converts to (nearly) the same 28x28 image.
  """
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.new("L", (width, height), background)
  draw = ImageDraw.Draw(image)

  def xy(points):
    return [(x * width, y * height) for x, y in points]

  draw.polygon(xy([(0.30, 0.10), (0.42, 0.10), (0.50, 0.18), (0.58, 0.10), (0.70, 0.10),
                   (0.90, 0.30), (0.80, 0.40), (0.72, 0.34), (0.72, 0.90), (0.28, 0.90),
                   (0.28, 0.34), (0.20, 0.40), (0.10, 0.30)]), fill=40)
  draw.rectangle(xy([(0.28, 0.55), (0.72, 0.62)]), fill=120)
  return np.asarray(image)
