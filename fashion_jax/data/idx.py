"""Reading (and, for tests and tools, writing) the IDX files MNIST-style data sets ship as.

Format: a big-endian header -- two zero bytes, a type code (0x08 = uint8), the
number of dimensions, then one uint32 per dimension -- followed by the raw
values. Files may be gzip-compressed.

A folder may hold each file raw, as .gz, or both; where both, the raw one is read, and the .gz is
compared with it (by its gzip trailer and header; inflated whole where they do not match), one that
cannot be read, or that another user could have written, ignored with a warning. Where a raw file
and its .gz differ, the folder holds two versions of it, and the pair read (images, labels) could
mix them: refused where the partner's data is also in the .gz form (the partner only .gz, or its
raw and .gz the same data), as nothing says which version it belongs with; a warning where the
partner read is a raw file no .gz matches (only raw, or differing from its .gz too: both files
replaced by a new version), the raw files being a pair.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import stat
import struct
import zlib

from absl import logging
import numpy as np

from fashion_jax.support import storage
from fashion_jax.data import datasets
from fashion_jax.support.errors import UserError
from fashion_jax.support.paths import put_by_others, read_only

_UINT8 = 0x08

# Raw or decompressed, no IDX file of these data sets is larger (Fashion-MNIST's train images:
# 47 MB). A file past it (pointed at by mistake), or a gzip that inflates past it (a "zip bomb"),
# would take all memory: refused.
MAX_BYTES = 1 << 30
_BLOCK = 1 << 22  # Inflated a piece at a time.
_CHUNK = 1 << 20  # What a file of no known size (a pipe, a bucket's object) is read by.

# split -> (images file, labels file), without the optional ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str, expected_ndim: int | None = None) -> np.ndarray:
  """Reads one IDX file (raw or gzip; local or gs://) into a uint8 array, validating the header."""
  return parse_idx(_reading(path, _read_capped), path, expected_ndim)


def _reading(path: str, how):
  """how(path), a failure to read the file `path` a UserError naming it."""
  try:
    return how(path)
  except OSError as e:
    raise UserError(f"cannot read IDX file {path}: {e}; re-download or replace the file") from e
  except Exception as e:  # pylint: disable=broad-except  (a Cloud Storage client's own errors)
    if not storage.is_url(path):
      raise
    raise UserError(f"cannot read IDX file {path}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}; check the bucket and your "
                    "credentials (gcloud auth application-default login)") from e


def _too_large(path: str, size: str) -> UserError:
  return UserError(f"cannot read IDX file {path}: it is {size}, more than any IDX file of these "
                   f"data sets ({MAX_BYTES:,} bytes at most); replace the file")


def _open(path: str):
  if storage.is_url(path):
    from etils import epath  # pylint: disable=g-import-not-at-top  (as storage reads a bucket)
    return epath.Path(path).open("rb")
  return open(path, "rb")  # pylint: disable=consider-using-with


def _size_of(f) -> int | None:
  """The size of the local file open as `f` where it has one (a regular file), else None."""
  info = os.fstat(f.fileno())
  return info.st_size if stat.S_ISREG(info.st_mode) else None


def _read_capped(path: str) -> bytes:
  """The file's bytes, refusing one of more than MAX_BYTES: a local file by its size, before it
  is read (a huge file pointed at by mistake took all memory first), then read as one block of
  that size (and one byte more: a file still growing goes on in blocks); whatever has no size (a
  pipe, a device, an object in a bucket) read a block at a time, no further than the cap. (One
  read of MAX_BYTES + 1 reserved 1 GiB for a 5 KB file: a buffered read allocates what is asked.)"""
  with _open(path) as f:
    size = None if storage.is_url(path) else _size_of(f)
    if size is not None and size > MAX_BYTES:
      raise _too_large(path, f"{size:,} bytes")
    blocks, total, want = [], 0, _CHUNK if size is None else size + 1
    while total <= MAX_BYTES and (block := f.read(min(want, MAX_BYTES + 1 - total))):
      blocks.append(block)
      total += len(block)
      want = _CHUNK
  if total > MAX_BYTES:
    raise _too_large(path, f"more than {MAX_BYTES:,} bytes")
  return b"".join(blocks)  # (One block, a regular file's: itself, not a copy.)


def parse_idx(data: bytes, path: str, expected_ndim: int | None = None) -> np.ndarray:
  """Parses the bytes of one IDX file (raw or gzip); `path` names it in errors."""
  if data[:2] == b"\x1f\x8b":
    data = _gunzip(data, path)
  if len(data) < 4:
    raise UserError(f"IDX file {path} is truncated ({len(data)} bytes, no header); "
                    "re-download or replace the file")
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != _UINT8 or ndim == 0:
    raise UserError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()}, expected "
                    "00000801 for labels or 00000803 for images); re-download or replace the file")
  if expected_ndim is not None and ndim != expected_ndim:
    shape = {3: "[N, {}, {}]".format(*datasets.IMAGE_SHAPE[:2]), 1: "[N]"}.get(expected_ndim)
    raise UserError(f"{path} has {ndim} dimension(s), expected {expected_ndim}"
                    + (f" ({shape})" if shape else "") + "; "
                    + ("are the images and labels files swapped?" if {ndim, expected_ndim} == {1, 3}
                       else "the file is corrupt or from another data set: use Fashion-MNIST's "
                            "(or MNIST's) IDX files"))
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise UserError(f"IDX file {path} is truncated inside its header; re-download or replace it")
  shape = struct.unpack(f">{ndim}I", data[4:header_len])
  expected = math.prod(shape)  # Python ints: a header's product can pass 2**63.
  payload = len(data) - header_len
  if payload != expected:
    raise UserError(f"IDX file {path} holds {payload} bytes of data but its header {shape} "
                    f"needs {expected}; the file is truncated or corrupt, re-download it")
  return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def _gunzip(data: bytes, path: str) -> bytes:
  """gzip.decompress (members one after another, zero padding), refusing more than MAX_BYTES of
  output; through GzipFile, whose time grows with the file (a loop of decompressobj copied the
  rest of the file at each member: a 1 MB file of empty members took minutes)."""
  out, total = [], 0
  try:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
      while block := f.read(min(_BLOCK, MAX_BYTES + 1 - total)):
        out.append(block)
        total += len(block)
        if total > MAX_BYTES:
          raise UserError(f"cannot read IDX file {path}: it inflates to more than "
                          f"{MAX_BYTES >> 20} MiB, more than any IDX file of these data sets "
                          "hold; replace the file")
  except EOFError as e:
    raise UserError(f"cannot read IDX file {path}: its gzip data is cut short; "
                    "re-download or replace the file") from e
  except (OSError, zlib.error) as e:  # (gzip.BadGzipFile: an OSError; a wrong CRC, ...)
    # The data starts as gzip: "not gzip" is what follows a member.
    why = ("trailing garbage after its gzip data" if str(e).startswith("Not a gzipped file")
           else e)
    raise UserError(f"cannot read IDX file {path}: {why}; re-download or replace the file") from e
  return b"".join(out)


def write_idx(path: str, array: np.ndarray, compress: bool | None = None) -> None:
  """Writes a uint8 array as an IDX file (gzip when the name ends in .gz)."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = struct.pack(">HBB", 0, _UINT8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  compress = path.endswith(".gz") if compress is None else compress
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def _find(folder: str, name: str, found: dict[str, str | None]) -> str | None:
  """The file `name` (raw, else .gz) in `folder`, given `found` (storage.kinds of both names)."""
  raw, packed = found[name], found[name + ".gz"]
  if raw == "file" and packed == "file":  # (Their contents compared: _check_one_version.)
    logging.info("both %s and %s.gz are in %s: reading %s (the raw file is read when both are)",
                 name, name, folder, name)
  for candidate, what in ((name, raw), (name + ".gz", packed)):
    if what == "file":
      return storage.join(folder, candidate)
  if "folder" in (raw, packed):
    path = storage.join(folder, name if raw == "folder" else name + ".gz")
    raise UserError(f"{path} is a folder, not an IDX file; move it away and put the file "
                    f"{name} (raw or .gz) in {folder} in its place")
  return None


def _gz_holds(packed: str, array: np.ndarray) -> bool:
  """Whether the .gz `packed` holds `array` (an IDX file's, header and all). Without inflating it
  where its gzip trailer (the CRC-32 and size mod 2**32 of what its last member inflates to) and
  the first bytes it inflates to are the array's and its header: the trailer alone proves only
  that the last member inflates to the data, not that nothing comes before it (a member P first:
  P's bytes + the data), nor that the whole inflates. The header settles the first for any .gz
  that reads as an IDX file: one more member's bytes first and the same header, it would hold more
  than its header says. Not the second: a .gz that cannot be read (damaged in the middle; the data
  twice over, `gzip -c >>`) whose start and trailer are the data's is "the same", not ignored --
  no other version either way, and it can only make its partner's difference an error rather than
  a warning. Any other .gz (several members, padding, other data) is inflated whole and compared.
  A UserError where it cannot be read."""
  header = struct.pack(">HBB", 0, _UINT8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  data = np.ascontiguousarray(array)
  size = (len(header) + data.nbytes) % 2**32
  start, tail = _reading(packed, lambda path: _start_and_trailer(path, len(header)))
  if start == header and tail == struct.pack(
      "<II", zlib.crc32(data, zlib.crc32(header)), size):
    return True
  return np.array_equal(read_idx(packed), array)


def _start_and_trailer(path: str, n: int) -> tuple[bytes | None, bytes]:
  """The first `n` bytes the gzip file inflates to (None where they cannot be inflated) and its
  last 8 bytes (all of it where shorter): ranged reads in a bucket. (tf.io.gfile's seek returns
  None, not the position: told by tell().)"""
  with _open(path) as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(f.tell() - 8, 0))
    tail = f.read(8)
    f.seek(0)
    try:
      with gzip.GzipFile(fileobj=f, mode="rb") as z:
        start = z.read(n)
    except (OSError, EOFError, zlib.error):  # (Told by inflating it whole: read_idx's error.)
      start = None
  return start, tail


_IGNORED = "%s.gz in %s is ignored (%s, the raw file beside it, is read): "


def _check_one_version(folder: str, found: dict[str, str | None], read: dict,
                       compared: set) -> None:
  """Where a raw file was read beside a .gz of the same name (its name in `compared`: not one
  ignored as another user's), whether the two hold the same data (`gunzip -k`; a .gz that cannot
  be read is ignored, a warning): if not, an error where its
  partner's data is in the .gz form too (only .gz, or raw and .gz the same: the partner may be the
  .gz's version), else a warning (the partner read is a raw file no .gz matches: the pair is the
  raw files, as where both were replaced). `read`: name -> the array read for it."""
  form = {}  # name -> "raw", "gz" (the one form read), "same" or "differ".
  for name, array in read.items():
    form[name] = "raw" if found[name] == "file" else "gz"
    if name not in compared:
      continue
    packed = storage.join(folder, name + ".gz")
    try:
      form[name] = "same" if _gz_holds(packed, array) else "differ"
    except UserError as e:
      logging.warning(_IGNORED + "%s", name, folder, name, e)
  for name, other in (tuple(read), tuple(read)[::-1]):
    if form[name] != "differ":
      continue
    if form[other] in ("gz", "same"):
      partner = (f"{other} is there only as {other}.gz" if form[other] == "gz"
                 else f"{other} and {other}.gz hold the same data")
      raise UserError(f"{name} and {name}.gz in IDX folder {folder!r} differ, and {partner}: "
                      f"which {name} belongs with it is not known; remove the one of {name} and "
                      f"{name}.gz that is not the version you want")
    logging.warning("%s and %s.gz in %s differ: %s is read (the raw file is read when both are); "
                    "remove the one that is not the version you want", name, name, folder, name)


def _refuse_broken_link(folder: str, name: str) -> None:
  """A link named `name` (or .gz) in a local `folder` whose target is gone: a UserError that says
  so (it was "missing", which `ls` contradicts)."""
  if storage.is_url(folder):
    return
  for candidate in (name, name + ".gz"):
    link = os.path.join(folder, candidate)
    if os.path.islink(link):
      raise UserError(f"{link} is a link to {os.readlink(link)!r}, which does not exist; point "
                      f"the link at the file, or put the file {name} (raw or .gz) in its place")


def _open_to_others(folder: str, files) -> str | None:
  """Why another user could have written a file read from the local IDX `folder`, else None: a
  folder on its way (as named or as resolved) or the file every user may write, or -- in such a
  folder with the sticky bit (/tmp) -- an entry on the way (the file, a link, the IDX folder
  itself) neither this user's nor root's: another user could have made /tmp/fashion_mnist first.
  As for a --workdir, $FASHION_JAX_TRUST_WORKDIR=1 trusts it; a bucket's access is its IAM policy."""
  if storage.is_url(folder) or os.environ.get(storage.TRUST_ENV) == "1":
    return None
  for path in files:
    real = os.path.realpath(path)
    for chain in (os.path.abspath(path), real):
      if why := put_by_others(chain):
        return why
    if os.stat(real).st_mode & stat.S_IWOTH and not read_only(real):
      return f"{real} is writable by every user"
  return None


def _trusted_gz(folder: str, name: str) -> bool:
  """Whether the .gz beside the raw file `name` read may be compared with it (its data deciding
  between a warning and an error): not where another user could have written it, nor where it
  cannot be looked at -- then ignored with a warning, the raw file read alone, as one that cannot
  be read (only the files read are refused)."""
  packed = storage.join(folder, name + ".gz")
  try:
    why = _open_to_others(folder, [packed])
    why = why and f"{why}, so anyone could have put it there ({storage.TRUST_ENV}=1 trusts it)"
  except OSError as e:  # Gone since it was found, say.
    why = f"cannot look at it ({e.strerror})"
  if why:
    logging.warning(_IGNORED + "%s", name, folder, name, why)
  return not why


def load_split(folder: str, split: str, num_classes: int = 10,
               named_by: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images [N, H, W, 1] uint8, labels [N] int32) of one split of an IDX folder.
  `named_by`: the environment variable that named the folder (errors name it, not idx_dir)."""
  if split not in FILES:
    raise UserError(f"unknown split {split!r}; IDX folders hold {sorted(FILES)}")
  if storage.is_url(folder):
    folder = storage.resolve(folder, f"${named_by}" if named_by else "the IDX folder")
  what = storage.kind(folder)  # One look (gs://: one request, and "cannot reach" said as such).
  if what != "folder":
    if named_by:
      raise UserError(f"{named_by}={folder!r} is not a folder ({'a file' if what else 'nothing'} "
                      "is there); point it at the folder holding the four Fashion-MNIST IDX "
                      "files, or unset it")
    what = "is a file, not a folder" if what else "does not exist"
    raise UserError(f"IDX folder {folder!r} {what}; set --config.idx_dir to the folder "
                    "holding the four Fashion-MNIST IDX files, or to '' to use tensorflow-datasets")
  images_name, labels_name = FILES[split]
  found = _kinds(folder, [n + gz for n in FILES[split] for gz in ("", ".gz")])
  paths = {}
  for name in (images_name, labels_name):
    path = _find(folder, name, found)
    if path is None:
      _refuse_broken_link(folder, name)
      raise UserError(f"{name}[.gz] is missing from IDX folder {folder!r}; the {split} split is "
                      f"{images_name} and {labels_name} (raw or .gz; training reads both splits)")
    paths[name] = path
  try:
    unsafe = _open_to_others(folder, paths.values())
  except OSError as e:  # Gone since it was found, or a folder on the way not searchable.
    raise UserError(f"cannot read IDX folder {folder} ({e.strerror}); make it readable by "
                    "you") from e
  if unsafe:
    raise UserError(f"IDX files in {folder} are not read: {unsafe}, so anyone could have put the "
                    "images or labels there; copy the files into a folder only you can write "
                    f"(or chmod o-w what is named), or set {storage.TRUST_ENV}=1 if nobody else "
                    "can reach it (a mount that shows everything as 0777: WSL's /mnt/c, CIFS)")
  compared = {n for n in paths
              if found[n] == found[n + ".gz"] == "file" and _trusted_gz(folder, n)}
  images = read_idx(paths[images_name], expected_ndim=3)
  labels = read_idx(paths[labels_name], expected_ndim=1)
  _check_one_version(folder, found, {images_name: images, labels_name: labels}, compared)
  return checked_split(images, labels, paths[images_name], paths[labels_name], num_classes)


def _kinds(folder: str, names: list[str]) -> dict[str, str | None]:
  """storage.kinds of `names` (each raw name before its .gz), but a .gz beside its raw file that
  is no file or folder (a FIFO, a socket) is ignored with a warning, as one that cannot be read:
  it ended the run, though the raw file is what is read."""
  if storage.is_url(folder):
    return storage.kinds(folder, names)
  found = {}
  for name in names:
    try:
      found[name] = storage.kind(storage.join(folder, name))
    except UserError as e:
      if not (name.endswith(".gz") and found.get(name[:-len(".gz")]) == "file"):
        raise
      logging.warning(_IGNORED + "%s", name[:-len(".gz")], folder, name[:-len(".gz")], e)
      found[name] = None
  return found


def checked_split(images: np.ndarray, labels: np.ndarray, images_path: str, labels_path: str,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, H, W, 1] uint8, labels [N] int32) from one split's parsed files, checked to
  belong together; the paths name the files in errors."""
  if images.shape[1:] != datasets.IMAGE_SHAPE[:2]:
    raise UserError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, not "
                    f"{datasets.IMAGE_SHAPE[0]}x{datasets.IMAGE_SHAPE[1]}; the file is from another "
                    "data set: use Fashion-MNIST's (or MNIST's) IDX files")
  if images.shape[0] == 0:
    raise UserError(f"{images_path} holds no images; the file is empty or cut short: "
                    "re-download or replace it")
  if images.shape[0] != labels.shape[0]:
    raise UserError(f"{images_path} has {images.shape[0]} images but "
                    f"{labels_path} has {labels.shape[0]} labels; the files do not belong "
                    "together")
  if labels.size and labels.max() >= num_classes:
    raise UserError(f"{labels_path} holds label {int(labels.max())}, outside 0..{num_classes - 1}; "
                    "the file is corrupt or from another data set: re-download or replace it")
  return images[..., None], labels.astype(np.int32)
