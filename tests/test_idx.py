import gzip
import logging
import os
import subprocess
import struct
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest

from fashion_jax.data import idx
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError
from tests.conftest import write_idx_folder


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_round_trip(tmp_path, name):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = str(tmp_path / name)
  idx.write_idx(path, array)
  np.testing.assert_array_equal(idx.read_idx(path, expected_ndim=3), array)


@pytest.mark.parametrize("gz", [True, False])
def test_load_split(tmp_path, gz):
  folder = write_idx_folder(str(tmp_path), n_train=30, n_test=7, gz=gz)
  images, labels = idx.load_split(folder, "test")
  assert images.shape == (7, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (7,) and labels.dtype == np.int32
  suffix = ".gz" if gz else ""  # What was written, in its order (not only its shape and range).
  np.testing.assert_array_equal(
      images[..., 0], idx.read_idx(os.path.join(folder, idx.FILES["test"][0] + suffix)))
  np.testing.assert_array_equal(
      labels, idx.read_idx(os.path.join(folder, idx.FILES["test"][1] + suffix)))


def test_missing_folder(tmp_path):
  with pytest.raises(UserError, match="does not exist.*idx_dir"):
    idx.load_split(str(tmp_path / "nope"), "train")
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(UserError, match="is a file, not a folder.*idx_dir"):
    idx.load_split(str(tmp_path / "a_file"), "train")


def test_missing_file(tmp_path):
  folder = write_idx_folder(str(tmp_path))
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*missing") as e:
    idx.load_split(folder, "test")
  # Names the split's pair (what evaluate, which reads only the test split, needs).
  assert "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte" in str(e.value)
  assert "train-images" not in str(e.value)


def test_a_link_to_nothing_is_named_a_broken_link_not_missing(tmp_path):
  """A link whose file was moved away was reported 'missing from IDX folder', though `ls` lists
  it."""
  folder = write_idx_folder(str(tmp_path / "idx"))
  link = os.path.join(folder, "t10k-labels-idx1-ubyte.gz")
  os.remove(link)
  os.symlink(str(tmp_path / "moved" / "t10k-labels-idx1-ubyte.gz"), link)
  with pytest.raises(UserError, match=f"^{link} is a link to '.*moved.*', which does not exist; "
                     "point the link at the file, or put the file t10k-labels-idx1-ubyte "):
    idx.load_split(folder, "test")


def test_truncated_file(tmp_path):
  folder = write_idx_folder(str(tmp_path), gz=False)
  path = os.path.join(folder, "train-images-idx3-ubyte")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-100])
  with pytest.raises(UserError, match="truncated or corrupt"):
    idx.load_split(folder, "train")


def test_corrupt_gzip(tmp_path):
  folder = write_idx_folder(str(tmp_path), gz=True)
  path = os.path.join(folder, "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(UserError, match="cannot read IDX file"):
    idx.load_split(folder, "train")


@pytest.mark.parametrize("damage", ["deflate", "crc"])
def test_gzip_damaged_in_the_middle(tmp_path, damage):
  # Not truncated, but bad deflate data (zlib.error, not an OSError) or a wrong CRC
  # (gzip.BadGzipFile): both are the file's one-line "cannot read" error, not a traceback.
  path = str(tmp_path / "train-images-idx3-ubyte.gz")
  images = np.random.default_rng(0).integers(0, 4, size=(40, 28, 28)).astype(np.uint8)
  idx.write_idx(path, images)
  with open(path, "rb") as f:
    data = f.read()
  if damage == "deflate":
    middle = len(data) // 2
    data = data[:middle] + b"\x00" * 16 + data[middle + 16:]
  else:  # The trailer: CRC-32, then the uncompressed size.
    data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]
  with open(path, "wb") as f:
    f.write(data)
  expected = zlib.error if damage == "deflate" else gzip.BadGzipFile
  with pytest.raises(expected):  # The damage does what this test is about.
    gzip.decompress(data)
  with pytest.raises(UserError, match="cannot read IDX file .*re-download or replace the file") as e:
    idx.read_idx(path, expected_ndim=3)
  assert path in str(e.value) and "\n" not in str(e.value)


def test_bad_magic(tmp_path):
  path = str(tmp_path / "x-idx3-ubyte")
  with open(path, "wb") as f:
    f.write(b"\x12\x34\x08\x03" + b"\x00" * 20)
  with pytest.raises(UserError, match="not a uint8 IDX file"):
    idx.read_idx(path)


def test_a_saved_web_page_is_refused_with_what_to_do(tmp_path):
  """A download that saved the server's error page: the line said only which magic numbers were
  expected, not what to do about it."""
  path = str(tmp_path / "train-images-idx3-ubyte.gz")
  with open(path, "wb") as f:
    f.write(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
  with pytest.raises(UserError, match=r"^\S+train-images-idx3-ubyte.gz is not a uint8 IDX file "
                     r"\(magic 3c21444f, .*\); re-download or replace the file$"):
    idx.read_idx(path, expected_ndim=3)


def test_swapped_files(tmp_path):
  folder = write_idx_folder(str(tmp_path), gz=False)
  a = os.path.join(folder, "train-images-idx3-ubyte")
  b = os.path.join(folder, "train-labels-idx1-ubyte")
  os.rename(a, a + ".tmp")
  os.rename(b, a)
  os.rename(a + ".tmp", b)
  with pytest.raises(UserError, match="swapped"):
    idx.load_split(folder, "train")


def test_count_mismatch(tmp_path):
  folder = write_idx_folder(str(tmp_path), n_train=20, gz=False)
  idx.write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.zeros(19, np.uint8))
  with pytest.raises(UserError, match="20 images but .* 19 labels"):
    idx.load_split(folder, "train")


def test_images_of_another_size_are_refused(tmp_path):
  """32x32 images (another data set) had passed, and failed later in the model with a traceback."""
  folder = write_idx_folder(str(tmp_path), n_train=20, gz=False)
  idx.write_idx(os.path.join(folder, "train-images-idx3-ubyte"), np.zeros((20, 32, 32), np.uint8))
  with pytest.raises(UserError, match="holds 32x32 images, not 28x28"):
    idx.load_split(folder, "train")


def test_a_split_without_images_is_refused(tmp_path):
  """A valid header counting 0 images: training had failed with a traceback, evaluate reported
  0.00 % of 0 images."""
  folder = write_idx_folder(str(tmp_path), n_train=20, gz=False)
  idx.write_idx(os.path.join(folder, "t10k-images-idx3-ubyte"), np.zeros((0, 28, 28), np.uint8))
  idx.write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte"), np.zeros(0, np.uint8))
  with pytest.raises(UserError, match="holds no images"):
    idx.load_split(folder, "test")


def test_label_out_of_range(tmp_path):
  folder = write_idx_folder(str(tmp_path), n_train=20, gz=False)
  idx.write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), np.full(20, 12, np.uint8))
  with pytest.raises(UserError, match="label 12, outside 0..9; .*: re-download or replace it$"):
    idx.load_split(folder, "train")


def test_gzip_detected_by_content_not_name(tmp_path):
  array = np.ones((3, 2), np.uint8)
  path = str(tmp_path / "raw-name-idx2-ubyte")
  idx.write_idx(path, array, compress=True)
  with gzip.open(path) as f:
    assert f.read(4) == b"\x00\x00\x08\x02"
  np.testing.assert_array_equal(idx.read_idx(path), array)


def test_a_header_whose_size_overflows_int64_is_one_line(tmp_path):
  """(2**31, 2**31, 4) "needed" 0 bytes in int64 and passed the size check: a reshape traceback."""
  path = str(tmp_path / "train-images-idx3-ubyte")
  with open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 4))
  with pytest.raises(UserError, match=rf"holds 0 bytes of data but its header .* needs {2**64}; "):
    idx.read_idx(path, expected_ndim=3)


def test_a_gzip_that_inflates_past_any_idx_file_is_refused(tmp_path, monkeypatch):
  path = str(tmp_path / "t10k-images-idx3-ubyte.gz")
  idx.write_idx(path, np.zeros((100, 28, 28), np.uint8))  # 78,416 bytes inflated, ~100 deflated.
  monkeypatch.setattr(idx, "MAX_BYTES", 78_415)
  with pytest.raises(UserError, match=r"inflates to more than 0 MiB"):
    idx.read_idx(path)
  monkeypatch.setattr(idx, "MAX_BYTES", 78_416)
  assert idx.read_idx(path).shape == (100, 28, 28)


@pytest.mark.parametrize("gz", [False, True])
def test_a_file_larger_than_any_idx_file_is_refused_before_it_is_read(tmp_path, monkeypatch, gz):
  """A raw file had no cap: read whole into memory (a 50 GB file pointed at by mistake), then
  compared with its header; the .gz's cap was on its inflated size only. Its size is looked at
  before anything is read (the message gives it exactly)."""
  path = str(tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")))
  idx.write_idx(path, np.random.default_rng(0).integers(0, 256, (100, 28, 28), np.uint8))
  size = os.path.getsize(path)
  monkeypatch.setattr(idx, "MAX_BYTES", size - 1)
  with pytest.raises(UserError) as e:
    idx.read_idx(path, expected_ndim=3)
  assert str(e.value) == (f"cannot read IDX file {path}: it is {size:,} bytes, more than any IDX "
                          f"file of these data sets ({size - 1:,} bytes at most); replace the file")
  monkeypatch.setattr(idx, "MAX_BYTES", size + 100_000)
  assert idx.read_idx(path, expected_ndim=3).shape == (100, 28, 28)


def test_a_stream_without_a_size_is_read_up_to_the_cap_only(tmp_path, monkeypatch):
  """What fstat cannot size (a pipe, /dev/zero, a file still growing) is read no further than the
  cap: /dev/zero had been read until memory ran out."""
  path = str(tmp_path / "t10k-labels-idx1-ubyte")
  os.mkfifo(path)
  data = struct.pack(">HBBI", 0, 8, 1, 1000) + bytes(1000)
  # A daemon: where read_idx never opens the FIFO, the writer stays blocked in open() and the
  # test fails (the join's timeout) instead of the interpreter hanging at exit.
  writer = threading.Thread(target=lambda: open(path, "wb").write(data), daemon=True)  # pylint: disable=consider-using-with
  writer.start()
  monkeypatch.setattr(idx, "MAX_BYTES", 500)
  try:
    with pytest.raises(UserError, match=rf"^cannot read IDX file {path}: it is more than 500 bytes, "
                                        r"more than any IDX file of these data sets"):
      idx.read_idx(path)
  finally:
    writer.join(timeout=10)
  assert not writer.is_alive()


def test_reading_a_small_file_does_not_reserve_the_cap(tmp_path):
  """Each read asked for MAX_BYTES + 1 (1 GiB) at once, which a buffered file allocates before
  reading: a 5 KB labels file was a MemoryError under a 1.1 GB address-space limit (`ulimit -v`),
  and the raw-vs-.gz comparison did it again. Here with both forms of each file (`gunzip -k`),
  under a limit of what the process already maps plus 512 MiB."""
  folder = write_idx_folder(str(tmp_path / "idx"), n_train=20, n_test=10)
  for name in idx.FILES["test"]:
    with gzip.open(os.path.join(folder, name + ".gz")) as f:
      unpacked = f.read()
    with open(os.path.join(folder, name), "wb") as out:
      out.write(unpacked)
  script = textwrap.dedent(f"""
      import resource
      from fashion_jax.data import idx
      with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
      resource.setrlimit(resource.RLIMIT_AS, (mapped + (512 << 20), resource.RLIM_INFINITY))
      assert len(idx.read_idx({folder!r} + "/t10k-labels-idx1-ubyte.gz")) == 10
      assert len(idx.load_split({folder!r}, "test")[1]) == 10
      print("read")""")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        check=False, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.stdout.strip() == "read", proc.stderr[-2000:]


def test_gzip_members_one_after_another_and_zero_padding_are_read(tmp_path):
  """What gzip.decompress reads (`cat a.gz b.gz`, a padded tape block) still reads."""
  array = np.random.default_rng(0).integers(0, 255, size=(30, 28, 28)).astype(np.uint8)
  raw = struct.pack(">HBB3I", 0, 8, 3, *array.shape) + array.tobytes()
  path = str(tmp_path / "x-idx3-ubyte.gz")
  with open(path, "wb") as f:
    f.write(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0" * 512)
  np.testing.assert_array_equal(idx.read_idx(path), array)
  with open(path, "ab") as f:
    f.write(b"junk")
  with pytest.raises(UserError, match="trailing garbage after its gzip data"):
    idx.read_idx(path)


def test_a_gzip_of_many_empty_members_is_read_in_time_linear_in_its_size(tmp_path):
  """A 1 MB .gz of 50,000 empty members took over a minute (each member's decompressobj copied
  the rest of the file; the 26 MB of a train file so made, days): now well under a second."""
  path = str(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with open(path, "wb") as f:
    f.write(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 3) + b"\1\2\3")
            + gzip.compress(b"") * 50_000)
  start = time.monotonic()
  assert idx.read_idx(path, expected_ndim=1).tolist() == [1, 2, 3]
  assert time.monotonic() - start < 15


def _unpack(folder, *names):
  """`gunzip -k` of `names` in `folder`."""
  for name in names:
    with gzip.open(os.path.join(folder, name + ".gz")) as f, open(os.path.join(folder, name),
                                                                  "wb") as out:
      out.write(f.read())


def test_which_of_a_raw_and_a_gz_file_is_read_is_logged(tmp_path, caplog):
  """Both present: the raw one is read (README; see test_download's
  test_only_the_verified_bytes_are_read for why the raw one wins), and where the two do not hold
  the same data (not a `gunzip -k`) of both files of the pair (a new version of each), a warning
  says so for each."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  _unpack(folder, *idx.FILES["test"])
  caplog.set_level(logging.INFO)
  want = idx.load_split(folder, "test")
  said = lambda: [(r.levelname, r.getMessage()) for r in caplog.records if ".gz" in r.getMessage()]
  assert said() == [("INFO", f"both {name} and {name}.gz are in {folder}: reading {name} "
                             "(the raw file is read when both are)") for name in idx.FILES["test"]]
  caplog.clear()
  images, labels = (os.path.join(folder, name) for name in idx.FILES["test"])
  idx.write_idx(images, np.zeros((10, 28, 28), np.uint8))
  idx.write_idx(labels, (want[1] + 1) % 10)
  got = idx.load_split(folder, "test")
  assert got[0].max() == 0
  np.testing.assert_array_equal(got[1], (want[1] + 1) % 10)
  assert said()[2:] == [("WARNING", f"{name} and {name}.gz in {folder} differ: {name} is read (the "
                                    "raw file is read when both are); remove the one that is not "
                                    "the version you want") for name in idx.FILES["test"]]
  assert [level for level, _ in said()] == ["INFO", "INFO", "WARNING", "WARNING"]


def test_a_gunzip_k_copy_is_told_by_the_gzip_trailer_not_by_inflating_the_gz(tmp_path,
                                                                            monkeypatch):
  """Both forms of each file (`gunzip -k`): every load inflated the .gz files too, to compare
  them (10x the time of reading the raw files; a bucket's .gz downloaded in every process). The
  gzip trailer's CRC-32 and size say it; only a .gz whose trailer does not match (several members,
  padding, other data) is inflated, and one of several members with the same data is the same."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  _unpack(folder, *idx.FILES["test"])
  inflated = []
  real = idx._gunzip  # pylint: disable=protected-access
  monkeypatch.setattr(idx, "_gunzip", lambda data, path: inflated.append(path) or real(data, path))
  assert len(idx.load_split(folder, "test")[1]) == 10
  assert inflated == []
  labels = os.path.join(folder, idx.FILES["test"][1])
  with open(labels, "rb") as f:
    data = f.read()
  with open(labels + ".gz", "wb") as f:  # Two members, then padding: the trailer is zeros.
    f.write(gzip.compress(data[:5]) + gzip.compress(data[5:]) + bytes(100))
  assert len(idx.load_split(folder, "test")[1]) == 10  # The same data: read (no error, below).
  assert inflated == [labels + ".gz"]
  idx.write_idx(os.path.join(folder, idx.FILES["test"][0]), np.zeros((10, 28, 28), np.uint8))
  with pytest.raises(UserError, match="t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte.gz hold "
                                      "the same data"):
    idx.load_split(folder, "test")


class _GFileLike:
  """A file as tf.io.gfile.GFile (epath's where gcsfs is absent, or EPATH_USE_TF) has it: its
  seek returns None, not the new position."""

  def __init__(self, f):
    self._f = f

  def seek(self, *args):
    self._f.seek(*args)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def test_a_gz_read_through_tensorflow_is_compared_by_its_trailer(tmp_path, monkeypatch, caplog):
  """Its seek returning None, the trailer's read raised TypeError (in a bucket: "cannot read IDX
  file ...: check the bucket and your credentials"): every .gz beside its raw file was ignored
  with a warning, and raw files of two versions were read without the error."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  _unpack(folder, *idx.FILES["test"])
  real = idx._open  # pylint: disable=protected-access
  monkeypatch.setattr(idx, "_open", lambda path: _GFileLike(real(path)))
  inflated = []
  real_gunzip = idx._gunzip  # pylint: disable=protected-access
  monkeypatch.setattr(idx, "_gunzip", lambda data, p: inflated.append(p) or real_gunzip(data, p))
  caplog.set_level(logging.WARNING)
  assert len(idx.load_split(folder, "test")[1]) == 10
  assert caplog.records == [] and inflated == []
  idx.write_idx(os.path.join(folder, idx.FILES["test"][0]), np.zeros((10, 28, 28), np.uint8))
  with pytest.raises(UserError, match="t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte.gz hold "
                                      "the same data"):
    idx.load_split(folder, "test")


def test_a_gz_whose_last_member_alone_is_the_raw_file_is_not_the_same_data(tmp_path):
  """Its trailer (the last member's CRC-32 and size) alone had it "the same data": a member first
  (here a labels header counting the bytes of the raw file after it) reads as another IDX file,
  its partner's only as .gz, and the raw labels were read with a .gz pair's images silently."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  name = idx.FILES["test"][1]
  _unpack(folder, name)
  with open(os.path.join(folder, name), "rb") as f:
    data = f.read()
  prefix = struct.pack(">HBBI", 0, 8, 1, len(data))
  with open(os.path.join(folder, name + ".gz"), "wb") as f:
    f.write(gzip.compress(prefix) + gzip.compress(data))
  assert idx.read_idx(os.path.join(folder, name + ".gz")).shape == (len(data),)  # Another IDX.
  with pytest.raises(UserError, match=f"{name} and {name}.gz in IDX folder .* differ, and "
                                      "t10k-images-idx3-ubyte is there only as "):
    idx.load_split(folder, "test")


@pytest.mark.parametrize("partner", ["gz", "both"])
@pytest.mark.parametrize("raw", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_a_raw_file_is_not_read_with_the_other_version_of_its_pair(tmp_path, raw, partner):
  """A raw file beside a different .gz of the same name, its pair's other file only .gz: the raw
  one was read with the other .gz file, perhaps another version's (the same count: images and
  labels silently shuffled). Its partner raw too but the same data as its .gz (`gunzip -k`) had
  been only a warning, though the same data was read: refused alike. A `gunzip -k` of one file
  (the same data) still reads."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  other = [n for n in idx.FILES["test"] if n != raw][0]
  _unpack(folder, raw, *([other] if partner == "both" else []))
  want = idx.load_split(folder, "test")
  if "images" in raw:
    idx.write_idx(os.path.join(folder, raw), np.zeros((10, 28, 28), np.uint8))
  else:
    idx.write_idx(os.path.join(folder, raw), (want[1] + 1) % 10)
  with pytest.raises(UserError) as e:
    idx.load_split(folder, "test")
  assert str(e.value) == (
      f"{raw} and {raw}.gz in IDX folder {folder!r} differ, and "
      + (f"{other} is there only as {other}.gz" if partner == "gz" else
         f"{other} and {other}.gz hold the same data")
      + f": which {raw} belongs with it is not known; remove the one of {raw} and "
      f"{raw}.gz that is not the version you want")
  os.rename(os.path.join(folder, raw + ".gz"), os.path.join(folder, raw + ".old.gz"))
  assert idx.load_split(folder, "test")[0].shape == (10, 28, 28, 1)  # One version: read.


@pytest.mark.parametrize("damage", ["truncated", "a web page"])
def test_a_gz_that_cannot_be_read_beside_its_raw_file_is_ignored_with_a_warning(tmp_path, caplog,
                                                                                damage):
  """A truncated (or not IDX) .gz beside the raw file that is read was called "different",
  and, its partner only .gz, a UserError stopped a run whose files were fine."""
  folder = write_idx_folder(str(tmp_path), n_test=10)
  name = "t10k-images-idx3-ubyte"
  _unpack(folder, name)
  packed = os.path.join(folder, name + ".gz")
  if damage == "truncated":
    with open(packed, "rb") as f:
      data = f.read()
    with open(packed, "wb") as f:
      f.write(data[:len(data) // 2])
  else:
    with open(packed, "wb") as f:
      f.write(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")
  caplog.set_level(logging.INFO)
  assert len(idx.load_split(folder, "test")[1]) == 10
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warned) == 1 and warned[0].startswith(
      f"{name}.gz in {folder} is ignored ({name}, the raw file beside it, is read): "), warned
  assert (f"cannot read IDX file {packed}: its gzip data is cut short" if damage == "truncated"
          else f"{packed} is not a uint8 IDX file") in warned[0]


def test_a_gz_another_user_could_have_written_is_ignored_not_compared(tmp_path, monkeypatch,
                                                                     caplog):
  """The .gz beside a raw file is read to compare them; one every user may write had refused the
  whole load (36d10ee), though only the raw file is read and an unreadable .gz is ignored: ignored
  alike, with a warning naming it and why, its data then deciding nothing (a different one is no
  error here); the files read are still refused."""
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  folder = write_idx_folder(str(tmp_path / "idx"), n_train=20, n_test=10)
  _unpack(folder, *idx.FILES["test"])
  name = "t10k-labels-idx1-ubyte"
  packed = os.path.join(folder, name + ".gz")
  idx.write_idx(packed, np.zeros(10, np.uint8))  # Another version, its partner the same data.
  os.chmod(packed, 0o666)
  caplog.set_level(logging.WARNING)
  assert len(idx.load_split(folder, "test")[1]) == 10
  assert [r.getMessage() for r in caplog.records] == [
      f"{name}.gz in {folder} is ignored ({name}, the raw file beside it, is read): {packed} is "
      f"writable by every user, so anyone could have put it there ({storage.TRUST_ENV}=1 trusts "
      "it)"]
  monkeypatch.setenv(storage.TRUST_ENV, "1")  # Trusted: compared, and the other version refused.
  with pytest.raises(UserError, match=f"{name} and {name}.gz in IDX folder .* differ"):
    idx.load_split(folder, "test")
  monkeypatch.delenv(storage.TRUST_ENV)
  os.chmod(os.path.join(folder, name), 0o666)  # The file read: refused.
  with pytest.raises(UserError, match=f"IDX files in {folder} are not read: "
                                      f"{os.path.join(folder, name)} is writable by every user"):
    idx.load_split(folder, "test")


def test_a_wrong_number_of_dimensions_names_the_shape_expected(tmp_path):
  """A 4-D images file was asked whether the images and labels files were swapped."""
  folder = write_idx_folder(str(tmp_path), n_train=20, gz=False)
  idx.write_idx(os.path.join(folder, "train-images-idx3-ubyte"),
                np.zeros((20, 28, 28, 1), np.uint8))
  with pytest.raises(UserError, match=r"has 4 dimension\(s\), expected 3 \(\[N, 28, 28\]\); the "
                                      "file is corrupt or from another data set") as e:
    idx.load_split(folder, "train")
  assert "swapped" not in str(e.value)


def test_a_folder_named_like_an_idx_file_is_said_to_be_one(tmp_path):
  """It was reported as a missing file."""
  folder = write_idx_folder(str(tmp_path))
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  os.mkdir(os.path.join(folder, "t10k-labels-idx1-ubyte"))
  with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte is a folder, not an IDX file; move "
                                      "it away") as e:
    idx.load_split(folder, "test")
  assert "missing" not in str(e.value)


def _other_users(path, monkeypatch):
  """Makes `path` another user's: chown as root; else its stat seen with another uid."""
  if os.geteuid() == 0:
    os.chown(path, 4321, 4321, follow_symlinks=False)
    return
  for name in ("stat", "lstat"):
    real = getattr(os, name)

    def seen(p, *args, _real=real, **kwargs):
      info = _real(p, *args, **kwargs)
      if isinstance(p, (str, os.PathLike)) and os.path.abspath(p) == os.path.abspath(path):
        info = os.stat_result((*info[:4], 4321, *info[5:]))
      return info
    monkeypatch.setattr(os, name, seen)


@pytest.mark.parametrize("folder_mode, file_mode, others, says", [
    (0o777, 0o644, False, "the folder {folder} is writable by every user"),
    (0o755, 0o666, False, "{file} is writable by every user"),
    (0o1777, 0o644, True, "{file} belongs to another user .* a folder every user may write"),
    (0o1777, 0o644, False, None),  # /tmp's case, the files one's own: nobody else can swap them.
    (0o755, 0o644, True, None),  # A teammate's folder only they can write.
])
def test_an_idx_folder_anyone_may_write_is_refused(tmp_path, monkeypatch, folder_mode, file_mode,
                                                     others, says):
  """A folder (or files) every user may write was read silently, where a --workdir's is refused.
  Judged by the mode bits and owners, not by access(): as root, too."""
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  folder = write_idx_folder(str(tmp_path / "pub"), n_train=20, n_test=10)
  file = os.path.join(folder, "t10k-labels-idx1-ubyte.gz")
  os.chmod(file, file_mode)
  if others:
    _other_users(file, monkeypatch)
  os.chmod(folder, folder_mode)
  if says is None:
    assert len(idx.load_split(folder, "test")[1]) == 10
    return
  with pytest.raises(UserError, match=f"IDX files in {folder} are not read: "
                     + says.format(folder=folder, file=file) + ".*copy the files into a folder "
                     r"only you can write \(or chmod o-w what is named\), or set "
                     "FASHION_JAX_TRUST_WORKDIR=1"):
    idx.load_split(folder, "test")
  monkeypatch.setenv(storage.TRUST_ENV, "1")
  assert len(idx.load_split(folder, "test")[1]) == 10


def test_an_idx_folder_another_user_made_in_tmp_is_refused(tmp_path, monkeypatch):
  """A folder another user made in a folder every user may write (/tmp/fashion_mnist, made first
  by someone else, 0755, their files) was read as the data: only the files' own folder was
  judged."""
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  shared = tmp_path / "tmp"
  shared.mkdir()
  folder = write_idx_folder(str(shared / "fashion_mnist"), n_train=20, n_test=10)
  os.chmod(shared, 0o1777)
  assert len(idx.load_split(folder, "test")[1]) == 10  # One's own: read.
  _other_users(folder, monkeypatch)
  with pytest.raises(UserError, match=f"IDX files in {folder} are not read: {folder} belongs to "
                     f"another user .* in {shared}, a folder every user may write"):
    idx.load_split(folder, "test")
  monkeypatch.setenv(storage.TRUST_ENV, "1")
  assert len(idx.load_split(folder, "test")[1]) == 10


def test_a_fifo_named_like_an_idx_file_is_refused_not_read(tmp_path):
  """A FIFO was taken for a file: the read waited for a writer for ever."""
  folder = write_idx_folder(str(tmp_path / "idx"), n_train=20, n_test=10)
  os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  os.mkfifo(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is not a file or folder"):
    idx.load_split(folder, "test")


def test_a_fifo_named_like_a_gz_beside_its_raw_file_is_ignored_with_a_warning(tmp_path, caplog):
  """As a .gz beside its raw file that cannot be read: the raw file is read (it ended the run,
  found by a review)."""
  folder = write_idx_folder(str(tmp_path / "idx"), n_train=20, n_test=10)
  packed = os.path.join(folder, "t10k-labels-idx1-ubyte.gz")
  with gzip.open(packed) as f, open(packed[:-len(".gz")], "wb") as raw:
    raw.write(f.read())
  os.remove(packed)
  os.mkfifo(packed)
  with caplog.at_level(logging.WARNING):
    labels = idx.load_split(folder, "test")[1]
  assert len(labels) == 10
  assert any(f"t10k-labels-idx1-ubyte.gz in {folder} is ignored (t10k-labels-idx1-ubyte, the raw "
             f"file beside it, is read): {packed} is not a file or folder" in r.getMessage()
             for r in caplog.records), caplog.text


def test_a_read_only_mount_is_not_refused_for_its_modes(tmp_path, monkeypatch):
  """A read-only bind mount (squashfs, an ISO) of a 0777 folder: nobody can write it, but its
  modes had it refused as writable by every user."""
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  folder = write_idx_folder(str(tmp_path / "pub"), n_train=20, n_test=10)
  os.chmod(folder, 0o777)
  mounted = tmp_path / "ro"
  mounted.mkdir()
  bind = subprocess.run(["mount", "--bind", "-o", "ro", folder, str(mounted)],
                        capture_output=True, text=True, check=False)
  if bind.returncode:
    pytest.skip(f"cannot bind-mount here ({bind.stderr.strip()[:100]}; CI runs as root)")
  try:
    subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=True)
    assert os.statvfs(mounted).f_flag & os.ST_RDONLY
    assert len(idx.load_split(str(mounted), "test")[1]) == 10
    with pytest.raises(UserError, match="is writable by every user"):
      idx.load_split(folder, "test")  # The same folder, writable.
    shared = tmp_path / "tmp"  # Links to the read-only files, in another user's folder in a
    planted = shared / "fashion_mnist"  # sticky one: the mount did not make them trusted.
    planted.mkdir(parents=True)
    for name in os.listdir(mounted):
      os.symlink(mounted / name, planted / name)
    os.chmod(shared, 0o1777)
    assert len(idx.load_split(str(planted), "test")[1]) == 10  # One's own: read.
    _other_users(str(planted), monkeypatch)
    with pytest.raises(UserError, match=f"{planted} belongs to another user"):
      idx.load_split(str(planted), "test")
  finally:
    subprocess.run(["umount", "-l", str(mounted)], check=False)


def test_an_idx_folder_reached_through_a_link_is_judged_where_it_is(tmp_path, monkeypatch):
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  folder = write_idx_folder(str(tmp_path / "pub"), n_train=20, n_test=10)
  os.chmod(folder, 0o777)
  os.symlink(folder, tmp_path / "link")
  with pytest.raises(UserError, match=f"the folder {folder} is writable by every user"):
    idx.load_split(str(tmp_path / "link"), "test")
  private = tmp_path / "private"  # A link to each file, from a folder of one's own.
  private.mkdir()
  for name in os.listdir(folder):
    os.symlink(os.path.join(folder, name), private / name)
  with pytest.raises(UserError, match=f"the folder {folder} is writable by every user"):
    idx.load_split(str(private), "test")


def test_a_link_on_the_way_that_another_user_may_repoint_is_refused(tmp_path, monkeypatch):
  """mine -> /tmp/hop (another user's, in a sticky folder every user may write) -> my data: the
  path as named and as resolved were judged, not the hop between, which its owner may point at
  their own files at any time."""
  monkeypatch.delenv(storage.TRUST_ENV, raising=False)
  folder = write_idx_folder(str(tmp_path / "mine" / "idx"), n_train=20, n_test=10)
  shared = tmp_path / "tmp"
  shared.mkdir()
  os.chmod(shared, 0o1777)
  os.symlink(folder, shared / "hop")
  os.symlink(shared / "hop", tmp_path / "mine" / "data")
  named = str(tmp_path / "mine" / "data")
  assert len(idx.load_split(named, "test")[1]) == 10  # The hop one's own: read.
  _other_users(str(shared / "hop"), monkeypatch)
  try:  # Most distributions: the kernel itself does not follow it (as root, the link chown'd).
    kernel = os.geteuid() == 0 and open("/proc/sys/fs/protected_symlinks").read().strip() == "1"
  except OSError:
    kernel = False
  says = "Permission denied" if kernel else f"{shared / 'hop'} belongs to another user .* in {shared}"
  with pytest.raises(UserError, match=says):
    idx.load_split(named, "test")
  if not kernel:
    monkeypatch.setenv(storage.TRUST_ENV, "1")
    assert len(idx.load_split(named, "test")[1]) == 10


def test_the_real_data_set_still_loads(real_idx_dir):
  assert len(idx.load_split(real_idx_dir, "test")[1]) == 10_000
