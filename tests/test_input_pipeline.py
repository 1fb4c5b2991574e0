import contextlib
import itertools
import os
import re
import sys

import numpy as np
import pytest

from fashion_jax.data import download
from fashion_jax.data import input_pipeline
from fashion_jax.data.input_pipeline import Split
from fashion_jax.support.errors import UserError


def _split(n=100):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 28, 28, 1), np.uint8)
  return Split(images, np.arange(n, dtype=np.int32) % 10)


def _take(it, n):
  return list(itertools.islice(it, n))


def test_train_order_is_a_function_of_seed_and_epoch():
  split = _split()
  a = _take(input_pipeline.train_batches(split, 8, seed=3), 30)
  b = _take(input_pipeline.train_batches(split, 8, seed=3), 30)
  c = _take(input_pipeline.train_batches(split, 8, seed=4), 30)
  assert all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_each_epoch_is_a_permutation_without_repeats():
  split = _split(96)
  batches = _take(input_pipeline.train_batches(split, 8, seed=0), 24)  # Two epochs.
  for epoch in range(2):
    seen = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[12 * epoch:12 * (epoch + 1)]])
    assert sorted(seen.tolist()) == list(range(96))
  first = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[:12]])
  second = np.concatenate([b["image"][:, 0, 0, 0] for b in batches[12:]])
  assert not np.array_equal(first, second)  # Reshuffled each epoch.


def test_resume_sees_the_same_batches():
  split = _split(100)  # 12 steps per epoch at batch 8 (4 examples dropped per epoch).
  full = _take(input_pipeline.train_batches(split, 8, seed=1), 40)
  for start in (0, 5, 12, 13, 31):
    resumed = _take(input_pipeline.train_batches(split, 8, seed=1, start_step=start), 40 - start)
    for x, y in zip(full[start:], resumed):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_processes_split_each_global_batch():
  """The processes' parts, joined in process order, are the one-process global batch."""
  split = _split(64)
  whole = _take(input_pipeline.train_batches(split, 16, seed=2), 6)
  parts = [_take(input_pipeline.train_batches(split, 16, seed=2, process_index=p,
                                               process_count=4), 6) for p in range(4)]
  for step in range(6):  # Position by position: a position picks augmentation and dropout draws.
    for key in ("image", "label"):
      joined = np.concatenate([parts[p][step][key] for p in range(4)])
      np.testing.assert_array_equal(joined, whole[step][key])


@pytest.mark.parametrize("n,batch,processes", [(100, 32, 1), (100, 25, 1), (10, 64, 1),
                                               (101, 32, 2), (7, 4, 4)])
def test_eval_covers_every_example_exactly_once(n, batch, processes):
  split = _split(n)
  seen = []
  for p in range(processes):
    for b in input_pipeline.eval_batches(split, batch, p, processes):
      assert b["image"].shape[0] == batch // processes  # Fixed shape: one compile.
      assert b["mask"].shape == b["label"].shape
      seen.extend(b["image"][b["mask"] > 0, 0, 0, 0].tolist())
  assert sorted(seen) == list(range(n))


def test_element_specs_match_between_sources(tiny_config, monkeypatch):
  """The tfds source (mocked) and the IDX source produce identical dtypes and shapes."""
  pytest.importorskip("tensorflow", reason="tfds reads its data sets through TensorFlow")
  tfds = pytest.importorskip("tensorflow_datasets")
  if broken := input_pipeline.tfds_import_error():
    pytest.skip(f"tensorflow-datasets cannot be imported here: {broken}")
  monkeypatch.delenv(input_pipeline.IDX_ENV, raising=False)
  monkeypatch.setattr(download, "check_reachable", lambda name: None)  # mock_data downloads nothing.
  from_idx = input_pipeline.load(tiny_config, "test")
  config = tiny_config.copy_and_resolve_references()
  config.idx_dir = ""
  with tfds.testing.mock_data(num_examples=40):
    from_tfds = input_pipeline.load(config, "test")
  assert len(from_tfds) == 40
  for a, b in ((from_idx.images, from_tfds.images), (from_idx.labels, from_tfds.labels)):
    assert a.dtype == b.dtype and a.shape[1:] == b.shape[1:]
  batch_idx = next(input_pipeline.train_batches(from_idx, 8, 0))
  batch_tfds = next(input_pipeline.train_batches(from_tfds, 8, 0))
  assert {k: (v.dtype, v.shape) for k, v in batch_idx.items()} == {
      k: (v.dtype, v.shape) for k, v in batch_tfds.items()}


def test_a_relative_data_folder_is_recorded_absolute(tiny_config, tmp_path, monkeypatch):
  """configs/tiny.py's --config.idx_dir=../shared/... : config.json recorded the relative path
  (idx_dir and _derived.data_source), so `evaluate --workdir=RUN` run from another folder found
  nothing there. The source, and the config.json training writes, name the folder absolute; the
  config given is not changed (a frozen one, read-only, was refused with a traceback)."""
  import json  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from fashion_jax.serving import inference  # pylint: disable=import-outside-toplevel
  from fashion_jax.training import train  # pylint: disable=import-outside-toplevel
  data = tiny_config.idx_dir  # <tmp_path>/idx
  (tmp_path / "here").mkdir()
  monkeypatch.chdir(tmp_path / "here")
  tiny_config.idx_dir = "../idx"
  where = input_pipeline.source(ml_collections.FrozenConfigDict(tiny_config))
  assert where == input_pipeline.source(tiny_config) and tiny_config.idx_dir == "../idx"
  assert where.location == data
  assert where.describe() == f"IDX folder {data} (config.idx_dir)"
  tiny_config.num_train_steps, tiny_config.data_dir = 2, None  # (None: as "", nothing recorded.)
  train.train_and_evaluate(ml_collections.FrozenConfigDict(tiny_config), "run")
  recorded = json.loads((tmp_path / "here" / "run" / "config.json").read_text())
  assert (recorded["idx_dir"], recorded["_derived"]["data_source"]) == (data, where.describe())
  monkeypatch.chdir(tmp_path)
  tiny_config.idx_dir = ""
  monkeypatch.setenv(input_pipeline.IDX_ENV, "idx")
  where = input_pipeline.source(tiny_config)
  assert where.location == data and tiny_config.idx_dir == ""
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"_derived": {"data_source": where.describe()}}))
  monkeypatch.chdir("/")
  assert inference.recorded_idx_folder(str(run)) == (data, None)
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: True)
  monkeypatch.setattr(input_pipeline, "tfds_import_error", lambda: None)
  tiny_config.data_dir = "tfds"  # (The variable is read for no other data_dir.)
  monkeypatch.chdir(tmp_path)
  assert input_pipeline.source(tiny_config).location == str(tmp_path / "tfds")


def test_tfds_preparation_is_one_process_at_a_time(tmp_path, monkeypatch):
  """Processes sharing a tfds data_dir prepare it under one lock in that folder."""
  import types
  from fashion_jax.support import paths
  held, events = [], []

  class Builder:
    data_dir = str(tmp_path / "fashion_mnist" / "3.0.1")  # Where tfds reads the prepared files.

    def is_prepared(self):
      events.append(("is_prepared", list(held)))
      return True

  fake = types.SimpleNamespace(
      builder=lambda name, data_dir: Builder(),
      load=lambda name, split, data_dir: events.append(("load", list(held))) or _FakeDataset(),
      as_numpy=lambda dataset: [{"image": np.zeros((2, 28, 28, 1), np.uint8),
                                 "label": np.array([3, 4])}])
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  real = paths.exclusive

  @contextlib.contextmanager
  def recording(lock_file):
    with real(lock_file):
      held.append(str(lock_file))
      yield
      held.pop()

  monkeypatch.setattr(paths, "exclusive", recording)
  images, labels = input_pipeline._load_tfds("fashion_mnist", "train", str(tmp_path))
  lock = str(tmp_path / ".fashion_jax-tfds-fashion_mnist.lock")
  assert events == [("is_prepared", [lock]), ("load", [lock])]
  assert images.shape == (2, 28, 28, 1) and labels.tolist() == [3, 4]


def _fake_tfds(monkeypatch, prepared_dir: str, on_load=lambda: None):
  import types
  class Builder:
    data_dir = prepared_dir

    def is_prepared(self):
      return True

  fake = types.SimpleNamespace(
      builder=lambda name, data_dir: Builder(),
      load=lambda name, split, data_dir: on_load() or _FakeDataset(),
      as_numpy=lambda dataset: [{"image": np.zeros((2, 28, 28, 1), np.uint8),
                                 "label": np.array([3, 4])}])
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_a_cloud_tfds_data_dir_is_locked_in_the_local_cache(tmp_path, monkeypatch):
  """data_dir=gs://bucket/tfds: the preparation lock was made through os.path.abspath, a local
  folder ./gs:/bucket/tfds in the current folder; it is in the user's cache instead."""
  from fashion_jax.support import paths
  locks = []
  real = paths.exclusive
  monkeypatch.setattr(paths, "exclusive", lambda lock_file: locks.append(lock_file) or
                      real(lock_file))
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  _fake_tfds(monkeypatch, "gs://bucket/tfds/fashion_mnist/3.0.1")
  input_pipeline._load_tfds("fashion_mnist", "train", "gs://bucket/tfds")
  assert locks == [str(tmp_path / "cache" / ".fashion_jax-tfds-fashion_mnist.lock")], locks
  assert not (tmp_path / "gs:").exists()


def test_what_tfds_prepared_is_checked_again_before_it_is_read(tmp_path, monkeypatch):
  """The data_dir was checked before tfds prepared it only: a folder another user made there
  in between (under a sticky /tmp, say), with files anyone may write, was read."""
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  prepared = tmp_path / "tfds" / "fashion_mnist" / "3.0.1"

  def prepare():  # What another user's folder looks like by the time tfds is done.
    prepared.mkdir(parents=True)
    (prepared / "fashion_mnist-train.tfrecord").write_bytes(b"")
    os.chmod(prepared / "fashion_mnist-train.tfrecord", 0o666)

  _fake_tfds(monkeypatch, str(prepared), prepare)
  with pytest.raises(UserError, match="fashion_mnist-train.tfrecord is writable by every user"):
    input_pipeline._load_tfds("fashion_mnist", "train", str(tmp_path / "tfds"))


class _FakeDataset:
  def batch(self, n):
    return self


def test_a_cloud_idx_folder_without_gcsfs_is_one_line(tiny_config, monkeypatch):
  """$FASHION_JAX_IDX_DIR=gs://... where gcsfs is not installed (Colab's TPU runtime without
  the gcs extra): epath's ImportError was a traceback."""
  from fashion_jax.support import storage  # pylint: disable=import-outside-toplevel
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(input_pipeline.IDX_ENV, "gs://bucket/fashion_mnist")
  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setattr(storage, "_found", lambda module: module != "gcsfs")
  tiny_config.idx_dir = ""
  with pytest.raises(UserError, match=r"\$FASHION_JAX_IDX_DIR='gs://bucket/fashion_mnist' "
                     r"needs gcsfs .*fashion_jax\[gcs\]"):
    input_pipeline.load(tiny_config, "train")


@pytest.mark.parametrize("batch,processes,message", [
    (0, 1, "batch_size=0 is no batch size; use a positive number"),
    (-8, 1, "batch_size=-8 is no batch size"),
    (101, 1, "batch_size=101 is larger than the 100 training examples; lower it"),
    (10, 4, "batch_size=10 does not divide by the 4 processes")])
def test_a_train_batch_size_out_of_range_is_one_line(batch, processes, message):
  """Refused when the iterator is made: 0 or more than the split had been a ZeroDivisionError at
  the first batch, a negative size a reshape's ValueError."""
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match=message):
    input_pipeline.train_batches(_split(100), batch, seed=0, process_count=processes)


@pytest.mark.parametrize("batch", [0, -8])
def test_an_eval_batch_size_below_one_is_one_line(batch):
  """0 had been range()'s ValueError, a negative size no batch at all (nothing evaluated)."""
  from fashion_jax.support.errors import UserError  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match=f"eval_batch_size={batch} is no batch size"):
    list(input_pipeline.eval_batches(_split(100), batch))


def test_the_digest_hashes_the_split_without_copying_it():
  """The same 16 digits as before (checkpoints hold them), without a copy of the images: tobytes
  had copied the whole train split (47 MB) to hash it."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import tracemalloc  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  split = Split(rng.integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8),
                rng.integers(0, 10, 2000).astype(np.int32))
  expected = hashlib.sha256(split.labels.tobytes() + split.images.tobytes()).hexdigest()[:16]
  tracemalloc.start()
  try:
    digest = input_pipeline.digest(split)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert digest == expected
  assert peak < split.images.nbytes // 10, peak


def test_tfds_images_are_copied_once(tmp_path, monkeypatch):
  """Joining tfds's batches copies the images once; astype(np.uint8) had copied them again."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  parts = [{"image": np.ones((500, 28, 28, 1), np.uint8), "label": np.zeros(500, np.int64)}
           for _ in range(4)]

  class Builder:
    data_dir = str(tmp_path / "fashion_mnist" / "3.0.1")  # Where tfds reads the prepared files.

    def is_prepared(self):
      return True

  fake = types.SimpleNamespace(builder=lambda name, data_dir: Builder(),
                               load=lambda name, split, data_dir: _FakeDataset(),
                               as_numpy=lambda dataset: parts)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  # Not measured: importing TensorFlow (where installed) to keep it off the GPU; it counted 188 MB
  # when this test ran first in its process.
  monkeypatch.setattr(input_pipeline.backends, "tensorflow_shares_the_gpu", lambda: None)
  tracemalloc.start()
  try:
    images, _ = input_pipeline._load_tfds("fashion_mnist", "train", str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert images.shape == (2000, 28, 28, 1) and images.dtype == np.uint8
  assert peak < 1.5 * images.nbytes, (peak, images.nbytes)


def test_offline_with_a_data_dir_does_not_suggest_the_variable_it_ignores(tiny_config, tmp_path,
                                                                          monkeypatch):
  """Offline with --config.data_dir, training said "(or set FASHION_JAX_IDX_DIR=FOLDER once)";
  with a data_dir that variable is not read, and the same error came back after setting it."""
  monkeypatch.setenv(download.URL_ENV, f"file://{tmp_path}/nowhere/")  # Nothing to download.
  monkeypatch.setenv("FASHION_JAX_CACHE_DIR", str(tmp_path / "cache"))
  config = tiny_config.copy_and_resolve_references()
  config.idx_dir = ""
  for data_dir, suggested in ((str(tmp_path / "data"), False), ("", True)):
    config.data_dir = data_dir
    where = input_pipeline.Source("download", download.default_folder("fashion_mnist", data_dir),
                                  "test")
    with pytest.raises(UserError, match="could not download fashion_mnist .*--config.idx_dir=") as e:
      input_pipeline.load(config, "test", where)
    assert ("FASHION_JAX_IDX_DIR" in str(e.value)) == suggested


def test_a_bucket_data_dir_without_tensorflow_is_one_line_and_makes_no_local_folder(
    tiny_config, tmp_path, monkeypatch):
  """--config.data_dir=gs://... where tfds cannot run (Colab's TPU runtime): the download's
  os.path joins made ./gs:/bucket/data/fashion_mnist/idx and would have cached the files there."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(input_pipeline, "tensorflow_available", lambda: False)
  config = tiny_config.copy_and_resolve_references()
  config.idx_dir, config.data_dir = "", "gs://bucket/data"
  where = input_pipeline.source(config)
  assert (where.kind, where.location) == ("download", "gs://bucket/data/fashion_mnist/idx")
  with pytest.raises(UserError, match=r"^data_dir gs://bucket/data is in a bucket, which "
                     r"tensorflow-datasets reads but the download does not \(no TensorFlow "
                     r"here\); put the four IDX files in the bucket and pass "
                     r"--config.idx_dir=gs://BUCKET/FOLDER, or give a local data_dir$"):
    input_pipeline.load(config, "train")
  assert not os.path.lexists(tmp_path / "gs:")


def test_a_tfds_data_dir_every_user_may_write_is_not_read(tiny_config, tmp_path, monkeypatch):
  """tensorflow-datasets read (and prepared) its data in a --config.data_dir every user may write,
  where anyone could have put other images or labels; an IDX folder so open was refused."""
  pytest.importorskip("tensorflow", reason="tfds reads its data sets through TensorFlow")
  pytest.importorskip("tensorflow_datasets")
  if broken := input_pipeline.tfds_import_error():
    pytest.skip(f"tensorflow-datasets cannot be imported here: {broken}")

  def reached(name):
    raise UserError("reached the download")

  monkeypatch.setattr(download, "check_reachable", reached)
  monkeypatch.delenv("FASHION_JAX_TRUST_WORKDIR", raising=False)
  config = tiny_config.copy_and_resolve_references()
  config.idx_dir = ""
  shared, own = tmp_path / "shared", tmp_path / "own"
  for folder, mode in ((shared, 0o777), (own, 0o755)):
    folder.mkdir()
    folder.chmod(mode)
  for data_dir, says in ((shared, f"{shared} is writable by every user"),
                         (shared / "a" / "b", f"{shared} is writable by every user"),
                         (own, "reached the download"), (own / "new", "reached the download")):
    config.data_dir = str(data_dir)
    with pytest.raises(UserError, match="^" + re.escape(says)
                       if says.startswith("reached") else re.escape(says)):
      input_pipeline.load(config, "test", input_pipeline.Source("tfds", str(data_dir), "test"))
  monkeypatch.setenv("FASHION_JAX_TRUST_WORKDIR", "1")  # A mount showing all as 0777 (WSL).
  config.data_dir = str(shared)
  with pytest.raises(UserError, match="^reached the download"):
    input_pipeline.load(config, "test", input_pipeline.Source("tfds", str(shared), "test"))
