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


def _reads_avif() -> bool:
  from PIL import features  # pylint: disable=g-import-not-at-top
  return "avif" in features.modules and bool(features.check_module("avif"))  # Pillow >= 11.2.


def _avif_unread() -> str:
  import PIL  # pylint: disable=g-import-not-at-top
  if _reads_avif():
    return ("an AVIF image that Pillow cannot read (damaged, or a kind its libavif cannot "
            "decode); convert it to PNG or JPEG first")
  return (f"an AVIF image, which this Pillow ({PIL.__version__}) cannot read; Pillow 11.2 or "
          "later reads AVIF (pip install -U pillow), or convert it to PNG or JPEG first")


_SHOWN = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF",
          "TIFF": "TIFF", "PPM": "PNM", "AVIF": "AVIF"}


def _read_here() -> str:
  """The formats read, as predict names them: "PNG, JPEG, ... or PNM" (and AVIF where read)."""
  names = [_SHOWN[f] for f in formats() if f in _SHOWN and (f != "AVIF" or _reads_avif())]
  return ", ".join(names[:-1]) + " or " + names[-1]


# Formats Image.open has no magic bytes for (no accept function): a TGA 2.0 file ends in this
# footer (Pillow writes it), an IM file starts with this line.
_TGA_FOOTER = b"TRUEVISION-XFILE.\0"
_IM_START = b"Image type: "


def _claimed(head: bytes, tail: bytes) -> tuple[str, str, str | bool] | None:
  """(The Pillow format a file with these first and last bytes is, its description, what its
  accept function said), else None. Only the accept functions of Pillow's own plugins run, on
  the 16 bytes Image.open gives them: each compares magic bytes (a str: the format's, but its
  library missing), and opens, parses or runs nothing; no plugin's opener runs."""
  Image.init()
  for name, (factory, accept) in Image.OPEN.items():
    if accept is None or not getattr(accept, "__module__", "").startswith("PIL."):
      continue
    try:
      said = accept(head[:16])
    except Exception:  # pylint: disable=broad-except  (struct.error: fewer bytes than it reads)
      continue
    if said:
      return name, getattr(factory, "format_description", None) or name, said
  if tail == _TGA_FOOTER:
    return "TGA", "Targa (TGA)", True
  if head.startswith(_IM_START):
    return "IM", "IFUNC Image Memory (IM)", True
  return None


def _named(head: bytes, tail: bytes) -> str | None:
  """What to say of a file Pillow cannot identify whose bytes name a format, else None."""
  if not (claimed := _claimed(head, tail)):
    return None
  name, description, said = claimed
  if isinstance(said, str):  # WebP (AVIF) with this Pillow built without its library.
    return (f"a {_SHOWN.get(name, name)} image, which this Pillow cannot read ({said}); convert "
            "it to PNG first")
  if name in FORMATS:  # One of those read, which Image.open refused.
    return (f"a {_SHOWN.get(name, name)} image by its first bytes, which Pillow cannot read "
            "(damaged or cut short?); pass an intact copy")
  return (f"{'an' if description[0] in 'AEIOU' else 'a'} {description} image, a format not read "
          f"here; convert it to PNG or JPEG first (read here: {_read_here()})")


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
