"""Opening an image file for `preprocess.load_image`: Pillow's Image.open of FORMATS only, with
its decompression-bomb limit applied to the size a JPEG is decoded at; and, for a file it cannot
identify, what it is instead."""

from __future__ import annotations

import gzip
import os
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


def _reads(module: str) -> bool:
  """Whether this Pillow has its `module` ("avif": Pillow 11.2 or later; "webp") built in."""
  from PIL import features  # pylint: disable=g-import-not-at-top
  return module in features.modules and bool(features.check_module(module))


def _avif_unread() -> str:
  import PIL  # pylint: disable=g-import-not-at-top
  if _reads("avif"):
    return ("an AVIF image that Pillow cannot read (damaged, or a kind its libavif cannot "
            "decode); convert it to PNG or JPEG first")
  return (f"an AVIF image, which this Pillow ({PIL.__version__}) cannot read; Pillow 11.2 or "
          "later reads AVIF (pip install -U pillow), or convert it to PNG or JPEG first")


_SHOWN = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF",
          "TIFF": "TIFF", "PPM": "PNM", "AVIF": "AVIF"}


def _read_here() -> str:
  """The formats read, as predict names them: "PNG, JPEG, ... or PNM" (and AVIF where read)."""
  names = [_SHOWN[f] for f in formats() if f in _SHOWN and (f != "AVIF" or _reads("avif"))]
  return ", ".join(names[:-1]) + " or " + names[-1]


# A file Pillow cannot identify is named only by magic bytes specific enough to say what it is:
# Pillow's accept functions are not (XBM takes any file starting "/*", a C or CSS file; PNM any
# text starting "P1".."P6" or "Py"; DIB any file starting with the little-endian 40; BMP "BM").
# Formats read: a file with their magic is called damaged (PNG, JPEG, GIF, TIFF, WebP; AVIF and
# HEIF by their ftyp brands, above). Others: named as a format not read, by these tests (on the
# first 128 bytes, and the last 18: a TGA 2.0 file ends in its footer), never by a plugin.
_DAMAGED = (("PNG", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
            ("JPEG", lambda h: h.startswith(b"\xff\xd8\xff")),
            ("GIF", lambda h: h.startswith((b"GIF87a", b"GIF89a"))),
            ("TIFF", lambda h: h.startswith((b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"))),
            ("WebP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"))
_TGA_FOOTER = b"TRUEVISION-XFILE.\0"
_NOT_READ = (
    ("JPEG 2000", lambda h: h.startswith((b"\xff\x4f\xff\x51", b"\0\0\0\x0cjP  \r\n\x87\n"))),
    ("Photoshop (PSD)", lambda h: h.startswith((b"8BPS\0\1", b"8BPS\0\2"))),
    ("Windows icon (ICO)", lambda h: h[:4] == b"\0\0\1\0" and h[4:6] != b"\0\0"
     and h[9] == 0 and h[10:12] in (b"\0\0", b"\1\0")),  # Images, then 1st: reserved, planes.
    ("Mac OS icon (ICNS)", lambda h: h.startswith(b"icns")),
    ("PDF", lambda h: h.startswith(b"%PDF-")),
    ("SGI", lambda h: h[:2] == b"\1\xda" and h[2] in (0, 1) and h[3] in (1, 2)
     and h[4:6] in (b"\0\1", b"\0\2", b"\0\3")),  # Magic, RLE, bytes a value, dimensions.
    ("FITS", lambda h: h.startswith(b"SIMPLE  =")),
    ("HDF5", lambda h: h.startswith(b"\x89HDF\r\n\x1a\n")),
    ("X11 pixmap (XPM)", lambda h: h.startswith(b"/* XPM */")),
    ("QOI", lambda h: h.startswith(b"qoif")),
    ("DirectDraw Surface (DDS)", lambda h: h[:8] == b"DDS |\0\0\0"),
    ("IFUNC Image Memory (IM)", lambda h: h.startswith(b"Image type: ")))


def _named(head: bytes, tail: bytes) -> str | None:
  """What to say of a file Pillow cannot identify whose bytes name a format, else None."""
  head = head.ljust(16, b"\0")  # (The tests index up to 12.)
  for name, test in _DAMAGED:
    if test(head):
      if name == "WebP" and not _reads("webp"):
        return ("a WebP image, which this Pillow cannot read (built without WebP support); "
                "convert it to PNG first")
      return (f"a {name} image by its first bytes, which Pillow cannot read (damaged or cut "
              "short?); pass an intact copy")
  name = next((name for name, test in _NOT_READ if test(head)),
              "Targa (TGA)" if tail == _TGA_FOOTER else None)
  if name:
    return (f"a file in the {name} format, which is not read here; convert it to PNG or JPEG "
            f"first (read here: {_read_here()})")
  return None


def unidentified(path: str) -> str:
  """What a file Pillow cannot identify is, and what to do: an empty file, a NumPy array or an
  IDX file (the data set's own format: evaluate's) each had the same 'not an image file'."""
  try:
    with open(path, "rb") as f:
      head = raw = f.read(128)
      try:
        f.seek(-len(_TGA_FOOTER), os.SEEK_END)
        tail = f.read()
      except OSError:  # Shorter than that.
        tail = b""
    if head[:2] == b"\x1f\x8b":  # gzip: an .idx-ubyte.gz?
      with gzip.open(path, "rb") as f:
        head = f.read(4)
  except (OSError, EOFError, zlib.error):  # Unreadable or a damaged .gz: said generically.
    head = raw = tail = b"?"
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
  if why := _named(raw, tail):
    return why
  return (f"not an image file of a format read here; pass {_read_here()} images (convert others "
          "to PNG first)")
