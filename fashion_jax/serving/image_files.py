"""Opening an image file for `preprocess.load_image`: Pillow's Image.open of FORMATS only, with
its decompression-bomb limit applied to the size a JPEG is decoded at; and, for a file it cannot
identify, what it is instead."""

from __future__ import annotations

import gzip
import zlib

try:
  from PIL import Image
except ImportError:  # Pillow is the `serve` extra; predict says so in one line (errors.require).
  Image = None

_JPEG_START = b"\xff\xd8\xff"
# The formats read (those predict names, and PNM), where Pillow's Image.open tries every plugin
# it has: an EPS file (whatever its name: photo.jpg) was rendered by running Ghostscript, a
# PostScript interpreter with a record of code execution from crafted files, and rare formats'
# decoders (FLI, PCX, SGI, TGA...) have had memory errors of their own. (MPO: the JPEG opener's.)
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM", "AVIF")
_POSTSCRIPT_STARTS = (b"%!PS", b"\xc5\xd0\xd3\xc6")  # PostScript/EPS text, DOS EPS binary.


def formats() -> list[str]:
  """FORMATS that this Pillow has (AVIF: Pillow 11.2 or later); Image.open fails on a name it
  has no opener for."""
  Image.init()
  return [name for name in FORMATS if name in Image.OPEN]


def opened(path: str, draft_size: int) -> Image.Image:
  """Image.open, its first frame, a JPEG set to decode at 1/2, 1/4 or 1/8 scale (libjpeg's draft)
  where it is bigger than `draft_size`; Pillow's decompression-bomb limit (2 x MAX_IMAGE_PIXELS)
  applies to the size decoded. Image.open applies it to the full size, and refused a 200-megapixel
  phone photo (16320 x 12240) that is decoded at 2040 x 1530: a JPEG it refuses is opened again
  by its JPEG opener, which has no size check (the global limit is never changed: that was not
  thread-safe), and checked here once drafted."""
  limit = Image.MAX_IMAGE_PIXELS
  try:
    image = Image.open(path, formats=formats())
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


# ISO media brands (ftyp box): HEVC-coded HEIF (an iPhone's HEIC), AVIF, and the general HEIF
# ones both use (which alone decide nothing: an AVIF is mif1 as often as an iPhone photo is).
_HEIC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (*_HEIC_BRANDS, b"mif1", b"msf1")


def _ftyp_brands(head: bytes) -> list[bytes]:
  """The brands of a file's first box if it is an ftyp (HEIF, AVIF, MP4): major, then compatible."""
  if head[4:8] != b"ftyp":
    return []
  size = int.from_bytes(head[:4], "big")
  box = head[:size] if 16 <= size <= len(head) else head
  return [box[8:12]] + [box[i:i + 4] for i in range(16, len(box) - 3, 4)]


def _avif_unread() -> str:
  import PIL  # pylint: disable=g-import-not-at-top
  from PIL import features  # pylint: disable=g-import-not-at-top
  if "avif" in features.modules and features.check_module("avif"):  # Pillow >= 11.2 reads AVIF.
    return ("an AVIF image that Pillow cannot read (damaged, or a kind its libavif cannot "
            "decode); convert it to PNG or JPEG first")
  return (f"an AVIF image, which this Pillow ({PIL.__version__}) cannot read; Pillow 11.2 or "
          "later reads AVIF (pip install -U pillow), or convert it to PNG or JPEG first")


def unidentified(path: str) -> str:
  """What a file Pillow cannot identify is, and what to do: an empty file, a NumPy array or an
  IDX file (the data set's own format: evaluate's) each had the same 'not an image file'."""
  try:
    with open(path, "rb") as f:
      head = f.read(128)
    if head[:2] == b"\x1f\x8b":  # gzip: an .idx-ubyte.gz?
      with gzip.open(path, "rb") as f:
        head = f.read(4)
  except (OSError, EOFError, zlib.error):  # Unreadable or a damaged .gz: said generically.
    head = b"?"
  if not head:
    return "empty file (0 bytes): nothing to classify; pass an image file"
  brands = _ftyp_brands(head)  # The first AVIF or HEVC brand decides, else a general HEIF one.
  kind = next((b for b in brands if b in _AVIF_BRANDS + _HEIC_BRANDS),
              brands[0] if brands else None)
  if kind in _AVIF_BRANDS:
    return _avif_unread()
  if kind in _HEIF_BRANDS:
    return ("a HEIC/HEIF photo (an iPhone camera's format), which Pillow cannot read; convert "
            "it to JPEG or PNG first (e.g. on a Mac: sips -s format jpeg IN.heic --out OUT.jpg)")
  if head[:4] == b"\x93NUM":
    return ("a NumPy array (.npy), not an image file; save it as PNG first "
            "(PIL.Image.fromarray(array).save('image.png')) and pass that")
  if head.startswith(_POSTSCRIPT_STARTS):
    return ("a PostScript/EPS file, which is not read (rendering it would run Ghostscript); "
            "export it as PNG or JPEG first and pass that")
  if head[:3] == b"\0\0\x08" and 1 <= head[3] <= 4:
    return ("an IDX file (the data set's own format), not an image file; evaluate classifies "
            "IDX test files: python -m fashion_jax.evaluate --workdir=DIR --idx_dir=FOLDER")
  return ("not an image file of a format read here; pass PNG, JPEG, WebP, BMP, GIF, TIFF or "
          "PNM images (convert others to PNG first)")
