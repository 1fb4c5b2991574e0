"""Opening an image file for `preprocess.load_image`: Pillow's Image.open, with its
decompression-bomb limit applied to the size a JPEG is decoded at."""

from __future__ import annotations

try:
  from PIL import Image
except ImportError:  # Pillow is the `serve` extra; predict says so in one line (errors.require).
  Image = None

_JPEG_START = b"\xff\xd8\xff"


def opened(path: str, draft_size: int) -> Image.Image:
  """Image.open, its first frame, a JPEG set to decode at 1/2, 1/4 or 1/8 scale (libjpeg's draft)
  where it is bigger than `draft_size`; Pillow's decompression-bomb limit (2 x MAX_IMAGE_PIXELS)
  applies to the size decoded. Image.open applies it to the full size, and refused a 200-megapixel
  phone photo (16320 x 12240) that is decoded at 2040 x 1530: a JPEG it refuses is opened again
  by its JPEG opener, which has no size check (the global limit is never changed: that was not
  thread-safe), and checked here once drafted."""
  limit = Image.MAX_IMAGE_PIXELS
  try:
    image = Image.open(path)
  except Image.DecompressionBombError:
    with open(path, "rb") as f:
      if f.read(len(_JPEG_START)) != _JPEG_START:
        raise
    from PIL import JpegImagePlugin  # pylint: disable=g-import-not-at-top
    image = JpegImagePlugin.jpeg_factory(path)  # Image.open's for JPEG: an MPO is adopted as one.
  try:
    if getattr(image, "n_frames", 1) > 1:
      image.seek(0)
    if image.format in ("JPEG", "MPO"):  # (MPO: a phone's JPEG with a second frame.)
      image.draft(None, (draft_size, draft_size))
    if limit and image.width * image.height > 2 * limit:
      raise Image.DecompressionBombError(
          f"Image size ({image.width * image.height} pixels) exceeds limit of {2 * limit} "
          "pixels, could be decompression bomb DOS attack.")
  except BaseException:
    image.close()
    raise
  return image
