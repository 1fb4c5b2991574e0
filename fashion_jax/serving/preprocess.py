"""Turns an arbitrary image file into a 28x28 uint8 image the way Fashion-MNIST was made.

A model trained on Fashion-MNIST has only seen images made by one fixed
recipe, so a photo has to go through the same recipe before the model sees it.
The Fashion-MNIST paper (Xiao, Rasul & Vollgraf 2017, section 2) converted
Zalando's product photos (a garment on a light background) like this:

  1. trim the edges whose colour is close to the corner pixels' (5% distance);
  2. resize so the longest edge is 28 px (aspect ratio preserved);
  3. sharpen (Gaussian operator, radius and sigma 1);
  4. extend the shorter edge to 28 px, the object centred;
  5. negate the intensities (the garment becomes bright on black);
  6. convert to 8-bit grayscale.

What the real data shows (measured on the 10,000 test images of the IDX files
in $FASHION_JAX_IDX_DIR, "object" = pixels > 0; tests/test_preprocess.py
re-checks it), and how it is matched:

- Long edge: the object's bounding box spans all 28 px along its long edge in
  98.4% of the images (27 px in 1.6%): the trim is tight and the resize fills
  the frame. Only 0.2% of corner pixels are nonzero. 65% of the objects are
  taller than wide (tops, dresses, trousers), the rest wider (shoes, bags).
  -> Trim to the object, then resize its longest edge to exactly 28 px.
- Short edge: the margins on its two sides are equal (49.9%) or the left/top
  one is 1 px wider (49.8%); other offsets are rare (0.4%).
  -> Centre the short edge, an odd leftover pixel going to the left/top.
- Intensity: the maximum is 255 in 91.7% of the images and >= 254 in 99%,
  the median image has exactly one pixel at 255, and the median object
  intensity varies from 59 to 229 between images (5th-95th percentile). So
  each image was stretched to a peak of 255 (not clipped: then dark garments
  would have many 255s), light and dark garments alike.
  -> After negating, stretch so that the brightest pixel is 255.
- Background: 50% of all pixels are exactly 0 (the white studio background,
  negated). Photos often have an off-white or gray background, so rather than
  negating (255 - v) the background level is subtracted: background pixels
  become 0 whatever their shade.

Order: negation and background subtraction are linear, so they are done
before the resize here (the padding then is simply 0); the result is the
paper's order up to rounding. Sharpening is ImageMagick's `-sharpen 1x1`
kernel (3x3), applied before the short edge is extended, as in the paper.
Big photos are first reduced (box filter) to at most WORKING_SIZE px.

Which way round. The background colour is the colour most of the border is
close to (robust to an object touching the border or a corner). Where the
object (the pixels differing from it by more than the 5% trim distance, specks
left out) is on average clearly lighter or darker than the background (by over
twice that distance), it decides: a white sneaker on a light-grey backdrop is
kept, a black coat on dark grey negated. Otherwise a light background
(luminance >= 60% of white) is negated -- the usual product photo -- and a dark
one (<= 40%) is kept -- a bright garment on black, like Fashion-MNIST itself;
in between, the object's mean decides. (The object's mean alone is not enough:
on a noisy dark background, noise darker than the median counts as "object"
too.)

28x28 inputs are taken to be in Fashion-MNIST form already (e.g. an image saved
from the data set): they are only made grayscale and, where the rule above says
so, negated. Trimming, resampling and sharpening them again would blur and
re-sharpen an image that was made by this recipe once; with this rule an image
from the data set round-trips exactly.

`load_image` does what the recipe leaves implicit for files: the first frame
of animations, EXIF orientation, alpha flattened so that transparent areas are
background (onto white, as the studio photos were; onto black only when most
of the opaque area is itself white and would vanish), and 16-bit samples
scaled, not clipped, to 8 bits (Pillow's own I;16 -> L conversion clips).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import warnings

import numpy as np
try:
  from PIL import Image
  from PIL import ImageOps
except ImportError:  # Pillow is the `serve` extra; predict says so in one line (errors.require).
  Image = ImageOps = None

from fashion_jax.serving import image_files

SIZE = 28
TRIM_FUZZ = 0.05  # Fraction of the full 0..255 colour distance.
SHARPEN_RADIUS, SHARPEN_SIGMA = 1, 1.0  # "Gaussian operator of radius and sigma 1": 3x3.
# Photos are reduced to at most this longest edge before trimming: plenty for
# a 28 px result, and it bounds the time spent on a 50-megapixel file.
WORKING_SIZE = 1024
# Background luminances that decide the polarity on their own (see the docstring).
LIGHT_BACKGROUND = 0.6 * 255
DARK_BACKGROUND = 0.4 * 255
# For the trim box, an object pixel needs at least this many object pixels in
# its 3x3 neighbourhood (itself included): isolated specks of dust or noise do
# not stretch the box, one-pixel-wide lines still count.
MIN_NEIGHBOURS = 3

# File extensions a folder is searched for (lower case).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".pbm", ".pgm", ".ppm", ".pnm", ".avif",
    ".heic", ".heif",  # Pillow reads none: each is named, not skipped (an iPhone's photos).
})

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as Pillow's convert("L").
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(Exception):
  """A file that cannot be read as an image; the message says why."""


def is_image_filename(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


@contextlib.contextmanager
def _pillow_warnings_silenced():
  """Damaged files make Pillow warn as well as fail; the ImageError says it once. And an image
  above Pillow's decompression-bomb warning threshold (MAX_IMAGE_PIXELS) is fine to read, as it
  is only made 28x28 (warned in Image.open, so set before it); above twice that, Pillow's
  DecompressionBombError is that file's error."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # A RuntimeWarning.
    yield


def load_image(path: str) -> Image.Image:
  """Opens an image file as an 8-bit "L" or "RGB" image (see the module docstring).

  Raises:
    ImageError: the file does not exist, is not an image Pillow can read, or is corrupt.
  """
  try:
    with _pillow_warnings_silenced(), image_files.opened(path, WORKING_SIZE) as image:
      image.load()
      try:
        image = ImageOps.exif_transpose(image)
      except Exception:  # pylint: disable=broad-except  (malformed EXIF: keep the pixels as stored)
        pass
      return normalize(_reduced(image))
  except Image.DecompressionBombError as e:
    raise ImageError(f"too large to decode safely ({e})") from e
  except OSError as e:
    if isinstance(e, Image.UnidentifiedImageError):
      raise ImageError(image_files.unidentified(path)) from e
    if e.errno in (errno.ENOENT, errno.EISDIR, errno.EACCES, errno.ENOTDIR):
      raise ImageError(f"cannot open ({os.strerror(e.errno)})") from e
    raise ImageError(f"corrupt or truncated image ({e})") from e
  except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
          MemoryError) as e:  # What Pillow's decoders raise for damaged files.
    raise ImageError(f"corrupt image ({type(e).__name__}: {e})") from e


def _reduced(image: Image.Image) -> Image.Image:
  """A big image shrunk to about WORKING_SIZE before `normalize`, whose alpha flattening and
  16-bit scaling work in floats at full size (an 8000x6000 RGBA cut-out took 3.4 GB and 14 s).
  Palette and 1-bit images are expanded first (reduce would average palette indices)."""
  factor = math.ceil(max(image.size) / WORKING_SIZE)
  if factor <= 1:
    return image
  keyed = "transparency" in image.info  # One colour transparent: averaged, edges kept it.
  if image.mode in _SIXTEEN_BIT or (keyed and image.mode == "I"):  # (Pillow 10: 16-bit PNGs "I".)
    image = _high_depth(image) if keyed else image.convert("I")
  elif image.mode in ("1", "P", "PA") or (keyed and image.mode in ("L", "RGB")):
    gray = image.mode in ("1", "L") or (image.mode in ("P", "PA") and _gray_palette(image))
    alpha = image.mode == "PA" or keyed
    image = image.convert(("LA" if gray else "RGBA") if alpha else ("L" if gray else "RGB"))
  return image.reduce(factor)


def normalize(image: Image.Image) -> Image.Image:
  """Any-mode image -> 8-bit "L" (grayscale sources) or "RGB", alpha flattened, 16-bit scaled."""
  try:
    return _normalize(image)
  except ValueError as e:  # E.g. a mode Pillow cannot convert to RGB.
    raise ImageError(f"cannot convert a {image.mode} image to RGB ({e})") from e


def _normalize(image: Image.Image) -> Image.Image:
  mode = image.mode
  if mode in ("L", "RGB") and "transparency" not in image.info:
    return image
  if mode in _SIXTEEN_BIT or mode in ("I", "F"):
    image = _high_depth(image)
    if image.mode == "L":
      return image
    mode = image.mode  # "LA": flattened below.
  gray = mode in ("1", "L", "LA", "La") or (mode == "P" and _gray_palette(image))
  has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
  if not has_alpha:
    return image.convert("L" if gray else "RGB")
  rgba = np.asarray(image.convert("RGBA"), np.float32)
  alpha = rgba[..., 3:] / 255.0
  flat = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  opaque = alpha[..., 0] >= 0.5
  on_white = ~_close(flat, np.full(3, 255.0, np.float32))
  if opaque.any() and np.count_nonzero(on_white & opaque) < 0.5 * np.count_nonzero(opaque):
    flat = rgba[..., :3] * alpha  # Mostly white content: it would vanish on white.
  out = Image.fromarray(np.rint(flat).clip(0, 255).astype(np.uint8))
  return out.convert("L") if gray else out


def _high_depth(image: Image.Image) -> Image.Image:
  """A 16-bit (or 32-bit int / float) grayscale image as 8-bit "L", or "LA" where a PNG's tRNS
  keys one value transparent (it was ignored: a cut-out's transparent black read as black)."""
  array = np.asarray(image)
  key = image.info.get("transparency")
  if not isinstance(key, int) or isinstance(key, bool):
    return Image.fromarray(_high_depth_to_uint8(array, image.mode))
  keyed = array == key  # Not counted in the bit depth (a 12-bit cut-out keyed at 65535).
  gray = Image.fromarray(_high_depth_to_uint8(np.where(keyed, 0, array), image.mode))
  gray.putalpha(Image.fromarray(np.where(keyed, 0, 255).astype(np.uint8)))
  return gray


def _gray_palette(image: Image.Image) -> bool:
  palette = image.getpalette("RGB") or []
  return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


def _high_depth_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
  """16-bit (or 32-bit int / float) grayscale samples scaled to 0..255: by the full range of the
  fewest bits (8 or more) that hold the brightest sample. 10- and 12-bit sensor data is often
  stored in 16-bit files: scaled by 255/65535, a 12-bit garment collapsed into 16 levels and was
  called blank. "I" holds 8-bit data from some readers; "F" 0..1 or 0..255."""
  values = np.nan_to_num(array.astype(np.float32))
  peak = float(values.max()) if values.size else 0.0
  if mode == "F" and peak <= 1.0:
    scale = 255.0
  else:
    bits = max(8, math.ceil(math.log2(peak + 1))) if peak > 0 else 8
    scale = 255.0 / (2.0 ** bits - 1)
  return np.rint(values * scale).clip(0, 255).astype(np.uint8)


def to_fashion_mnist(image: Image.Image) -> np.ndarray:
  """The Fashion-MNIST version of a photo: uint8 [28, 28], object bright on black.

  Pure: the input is not modified. Any size and mode (see `normalize`).
  """
  resized = _object_in_box(image, SIZE)
  if resized is None or resized.dtype == np.uint8:  # Blank, or already in the data set's form.
    return np.zeros((SIZE, SIZE), np.uint8) if resized is None else resized
  sharpened = _sharpen(resized)
  new_height, new_width = resized.shape
  canvas = np.zeros((SIZE, SIZE), np.float32)
  y0 = (SIZE - new_height + 1) // 2  # An odd leftover pixel goes top/left, as in the data.
  x0 = (SIZE - new_width + 1) // 2
  canvas[y0:y0 + new_height, x0:x0 + new_width] = np.maximum(sharpened, 0.0)
  return _stretched(canvas)


# MNIST's recipe (LeCun, Cortes & Burges): the digit scaled to fit a 20x20 box, aspect ratio kept
# (anti-aliased), then placed in the 28x28 field so that its centre of mass is at the centre.
MNIST_BOX = 20


def to_mnist(image: Image.Image) -> np.ndarray:
  """The MNIST version of an image of a digit: uint8 [28, 28], the digit bright on black.

  The object is found as for Fashion-MNIST (background, polarity, trim); then MNIST's recipe
  instead of the paper's: no sharpening, a 20 px box, centred by its centre of mass.
  """
  digit = _object_in_box(image, MNIST_BOX)
  if digit is None or digit.dtype == np.uint8:  # Blank, or already in the data set's form.
    return np.zeros((SIZE, SIZE), np.uint8) if digit is None else digit
  digit = np.maximum(digit, 0.0)
  new_height, new_width = digit.shape
  mass = digit.sum()
  if mass <= 0:
    return np.zeros((SIZE, SIZE), np.uint8)
  # The centre of mass (pixel centres at +0.5) onto the field's centre, 14; the box stays inside.
  com_y = float((digit.sum(1) * (np.arange(new_height) + 0.5)).sum() / mass)
  com_x = float((digit.sum(0) * (np.arange(new_width) + 0.5)).sum() / mass)
  y0 = min(max(round(SIZE / 2 - com_y), 0), SIZE - new_height)
  x0 = min(max(round(SIZE / 2 - com_x), 0), SIZE - new_width)
  canvas = np.zeros((SIZE, SIZE), np.float32)
  canvas[y0:y0 + new_height, x0:x0 + new_width] = digit
  return _stretched(canvas)


def _object_in_box(image: Image.Image, box: int) -> np.ndarray | None:
  """The object (`_object`) resized to fit a `box` px square, aspect ratio kept (Lanczos):
  float32 [h, w], max(h, w) == box. As `_object`: None where blank, the finished uint8 [28, 28]
  where the image is already in the data set's form."""
  crop = _object(image)
  if crop is None or crop.dtype == np.uint8:
    return crop
  height, width = crop.shape
  scale = box / max(height, width)
  size = (min(box, max(1, round(width * scale))), min(box, max(1, round(height * scale))))
  return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), np.float32)


def _stretched(canvas: np.ndarray) -> np.ndarray:
  """`canvas` stretched so that its brightest pixel is 255, as uint8 (all 0 if it is blank)."""
  peak = float(canvas.max())
  if peak < 1e-3:
    return np.zeros((SIZE, SIZE), np.uint8)
  return np.rint(canvas * (255.0 / peak)).clip(0, 255).astype(np.uint8)


def _object(image: Image.Image) -> np.ndarray | None:
  """The object of an image, bright on black: float32 [h, w], trimmed to its bounding box and
  the background level subtracted. None where nothing differs from the background. An image
  already 28x28 comes back as the finished uint8 [28, 28] (only negated, if need be): it is
  taken to be in the data set's form. Pure: the input is not modified."""
  image = normalize(image)
  if max(image.size) > WORKING_SIZE:
    image = image.reduce(math.ceil(max(image.size) / WORKING_SIZE))
  pixels = np.asarray(image, np.float32)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.size == 0:
    return None

  background = _background_colour(pixels)
  is_object = ~_close(pixels, background)
  luma = pixels[..., 0] if pixels.shape[-1] == 1 else pixels @ _LUMA
  background_luma = float(background[0] if pixels.shape[-1] == 1 else background @ _LUMA)
  if not is_object.any():
    return None  # A blank image: nothing to see.
  solid = _without_specks(is_object)
  lighter_by = float(np.mean(luma[solid])) - background_luma
  if abs(lighter_by) > 2 * TRIM_FUZZ * 255:  # The object itself, specks left out, says which.
    darker = lighter_by < 0
  elif background_luma >= LIGHT_BACKGROUND:
    darker = True
  elif background_luma <= DARK_BACKGROUND:
    darker = False
  else:
    darker = float(np.mean(luma[is_object])) < background_luma
  if luma.shape == (SIZE, SIZE):  # Already in the data set's form: only negated, if need be.
    return np.rint(255.0 - luma if darker else luma).clip(0, 255).astype(np.uint8)

  # Negated (light background) or kept (dark background); the background level becomes 0.
  value = np.maximum((background_luma - luma) if darker else (luma - background_luma), 0.0)
  top, bottom = _span(solid.any(axis=1))
  left, right = _span(solid.any(axis=0))
  return np.ascontiguousarray(value[top:bottom, left:right], np.float32)


def _close(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """Pixels [..., C] within the trim distance of `colour`: RMS over channels <= 5% of 255."""
  squared = sum((pixels[..., c] - colour[c]) ** 2 for c in range(pixels.shape[-1]))
  return squared <= (TRIM_FUZZ * 255) ** 2 * pixels.shape[-1]


def _background_colour(pixels: np.ndarray) -> np.ndarray:
  """The colour most of the one-pixel border is close to (within the trim distance).

  Candidates are the four corner pixels (ImageMagick's trim reference) and the
  border's median; the one most border pixels are close to wins, and the
  median of those pixels is the estimate (so sensor noise averages out). This
  holds up when the object covers a corner or most of the border.
  """
  border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
  candidates = [np.median(border, axis=0), pixels[0, 0], pixels[0, -1], pixels[-1, 0],
                pixels[-1, -1]]
  best = None
  for candidate in candidates:
    close = _close(border, candidate)
    if best is None or close.sum() > best.sum():
      best = close
  return np.median(border[best], axis=0).astype(np.float32)


def _without_specks(mask: np.ndarray) -> np.ndarray:
  """`mask` without pixels that have fewer than MIN_NEIGHBOURS set in their 3x3 neighbourhood."""
  padded = np.pad(mask, 1).astype(np.uint8)
  height, width = mask.shape
  count = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
  solid = mask & (count >= MIN_NEIGHBOURS)
  return solid if solid.any() else mask


def _span(hits: np.ndarray) -> tuple[int, int]:
  """[start, stop) of the True entries."""
  where = np.flatnonzero(hits)
  return int(where[0]), int(where[-1]) + 1


def _sharpen_kernel(radius: int, sigma: float) -> np.ndarray:
  """ImageMagick's `-sharpen RADIUSxSIGMA` kernel: a negated Gaussian with a boosted centre.

  As in its SharpenImage: Gaussian weights g over a (2 radius + 1)^2 window,
  the centre replaced by 2 * sum(g), all but the centre negated, normalised to
  sum 1 -- i.e. the image plus a multiple of (image - Gaussian blur).
  """
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  u, v = np.meshgrid(offsets, offsets)
  kernel = -np.exp(-(u * u + v * v) / (2 * sigma * sigma)) / (2 * np.pi * sigma * sigma)
  kernel[radius, radius] = -2.0 * kernel.sum()
  return (kernel / kernel.sum()).astype(np.float32)


_KERNEL = _sharpen_kernel(SHARPEN_RADIUS, SHARPEN_SIGMA)


def _sharpen(image: np.ndarray) -> np.ndarray:
  """Convolution with the sharpen kernel; edges extended by replication (ImageMagick's default)."""
  radius = _KERNEL.shape[0] // 2
  padded = np.pad(image, radius, mode="edge")
  height, width = image.shape
  out = np.zeros_like(image)
  for dy in range(_KERNEL.shape[0]):
    for dx in range(_KERNEL.shape[1]):
      out += _KERNEL[dy, dx] * padded[dy:dy + height, dx:dx + width]
  return out
