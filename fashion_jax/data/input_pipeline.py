"""Input pipeline: IDX files, tensorflow-datasets or a verified download -> shuffled, batched.

Where the data comes from (`source`): `config.idx_dir` if set; else the folder
named by `$FASHION_JAX_IDX_DIR` (set it once, and the README's main command
runs offline); else tensorflow-datasets where TensorFlow is installed; else
(Colab's TPU runtime) the four files tfds uses, downloaded once and verified
against tfds's checksums (`fashion_jax.data.download`). The logs say which.

All sources produce the same in-memory arrays (images uint8 [N, 28, 28, 1],
labels int32 [N]); everything downstream is shared. Fashion-MNIST is 47 MB, so
it is held in memory and batched with numpy: no per-example Python work, and
the train order is a pure function of (seed, epoch) -- a run resumed at step
s sees exactly the batches an uninterrupted run would.

Multi-host: every process computes the same global order and takes its own
contiguous slice of each global batch, so the global batch (and the result)
does not depend on how many processes share the work.

Pixels stay uint8 until they reach the device (a quarter of the bytes to
move); the train and eval steps scale them to [0, 1]. There is no explicit
prefetch thread: JAX dispatch is asynchronous, so the host gathers batch s+1
while the device runs step s.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import hashlib
import functools
import importlib.util
import logging as logging_std
import os
import stat

import numpy as np

from fashion_jax.data import download
from fashion_jax.data import idx
from fashion_jax.support.errors import UserError
from fashion_jax.support import backends, paths, storage

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [N, H, W, 1]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return int(self.labels.shape[0])


IDX_ENV = "FASHION_JAX_IDX_DIR"  # A Fashion-MNIST IDX folder to use when config.idx_dir is "".


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a run's data comes from; `describe()` is what the logs and config.json say."""
  kind: str  # "idx" | "tfds" | "download"
  location: str  # IDX folder, tfds data_dir ("" = tfds's default) or download folder.
  origin: str  # Why this source: "config.idx_dir", "$FASHION_JAX_IDX_DIR", ...

  def describe(self) -> str:
    if self.kind == "idx":
      return f"IDX folder {self.location} ({self.origin})"
    if self.kind == "tfds":
      return f"tensorflow-datasets, data_dir {self.location or 'default'} ({self.origin})"
    return (f"the four files tfds uses, verified against its recorded SHA-256, cached in "
            f"{self.location} ({self.origin})")


def tensorflow_available() -> bool:
  """Whether tfds's own path can run: it needs TensorFlow (see fashion_jax/data/download.py)."""
  return all(importlib.util.find_spec(m) is not None
             for m in ("tensorflow", "tensorflow_datasets"))


class _DropLoggedExceptions(logging_std.Filter):
  def filter(self, record):
    return not (record.levelno >= logging_std.ERROR and record.exc_info)


@functools.cache
def tfds_import_error() -> str | None:
  """None when tensorflow_datasets imports whole; else why it does not, in one line.

  tfds catches any error while importing its own modules, logs it with a traceback and leaves
  a module without its API (`tfds.builder` missing). The versions Colab lists for its GPU and
  CPU runtimes (Aug 2026) are such a case: tensorflow-metadata 1.21.0's generated code needs
  protobuf >= 6.31.1 (it declares >= 4.25.2), and they hold 5.29.6.
  Their traceback is left out here; the reason goes into the data source's one line.
  """
  absl_logger = logging_std.getLogger("absl")  # tfds logs through absl.
  quiet = _DropLoggedExceptions()
  absl_logger.addFilter(quiet)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if hasattr(tfds, "builder"):
      return None
    from tensorflow_datasets import public_api  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except  (whatever tfds's own import raises)
    first_sentence = str(e).splitlines()[0].split(". ")[0] if str(e) else ""
    return f"{type(e).__name__}: {first_sentence}"
  finally:
    absl_logger.removeFilter(quiet)
  return "its module has no `builder`"


def absolute(path: str) -> str:
  """A local path made absolute ("" and gs:// URLs as given): config.json records it, and
  `evaluate --workdir=RUN` reads it from whatever folder it runs in."""
  return path if not path or storage.is_url(path) else os.path.abspath(os.path.expanduser(path))


def source(config) -> Source:
  """Picks the data source: config.idx_dir; else $FASHION_JAX_IDX_DIR (Fashion-MNIST, and no
  config.data_dir given); else tensorflow-datasets where TensorFlow is installed (and tfds
  imports); else the verified download.

  Local paths come back `absolute` (the run's config.json records them: a relative one named
  nothing where evaluate ran); `config` is not changed."""
  if config.idx_dir:
    return Source("idx", absolute(config.idx_dir), "config.idx_dir")
  env = os.environ.get(IDX_ENV, "")
  if env and config.dataset == "fashion_mnist" and not config.data_dir:
    return Source("idx", absolute(env), f"${IDX_ENV}")
  why = "no TensorFlow here"
  if tensorflow_available():
    broken = tfds_import_error()
    if broken is None:
      return Source("tfds", absolute(config.data_dir), "TensorFlow is installed")
    why = f"tensorflow-datasets cannot be imported here: {broken}"
  return Source("download", absolute(download.default_folder(config.dataset, config.data_dir)),
                why)


def load(config, split: str, data_source: Source | None = None) -> Split:
  """Loads a whole split from `source(config)` (or the given source)."""
  data_source = data_source or source(config)
  if data_source.kind == "idx":  # Errors name the variable that named the folder, if one did.
    images, labels = idx.load_split(data_source.location, split, named_by=(
        IDX_ENV if data_source.origin.startswith("$") else None))
  else:
    try:
      if data_source.kind == "tfds":
        images, labels = _load_tfds(config.dataset, split, data_source.location or None)
      else:
        if storage.is_url(data_source.location):  # (os.path's joins had made a folder "gs:".)
          raise UserError(
              f"data_dir {config.data_dir} is in a bucket, which tensorflow-datasets reads but "
              f"the download does not ({data_source.origin}); put the four IDX files in the "
              "bucket and pass --config.idx_dir=gs://BUCKET/FOLDER, or give a local data_dir")
        folder = download.fetch(config.dataset, data_source.location)
        images, labels = download.load_split(config.dataset, folder, split)
    except UserError as e:  # $FASHION_JAX_IDX_DIR is not read with a data_dir: not suggested.
      if not config.data_dir or download.OFFLINE_HINT not in str(e):
        raise
      raise UserError(str(e).replace(download.OFFLINE_HINT, download.FLAG_HINT)) from e
  return Split(np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int32))


def _load_tfds(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (heavy, optional)
  backends.tensorflow_shares_the_gpu()  # tfds reads through TensorFlow.
  # One preparation at a time: processes sharing a data_dir (a multi-process job) would
  # otherwise download and write the same files at once.
  # (A gs:// data_dir: locked in the local cache; `exclusive` made a folder named ./gs:/bucket.)
  local = data_dir if data_dir and not storage.is_url(data_dir) else paths.cache_root()
  lock = os.path.join(local, f".fashion_jax-tfds-{name}.lock")

  def check(builder) -> None:
    if why := _open_to_others(str(builder.data_dir)):
      raise UserError(f"tensorflow-datasets' {name} in {builder.data_dir} is not read: {why}, "
                      "so anyone could have put its images or labels there; set "
                      "--config.data_dir to a folder only you can write (or chmod o-w what is "
                      f"named), or set {storage.TRUST_ENV}=1 if nobody else can reach it")
  try:
    with paths.exclusive(lock):
      builder = tfds.builder(name, data_dir=data_dir)
      check(builder)
      if not builder.is_prepared():
        # tfds retries an unreachable download for minutes; fail in seconds instead.
        download.check_reachable(name)
      dataset = tfds.load(name, split=split, data_dir=data_dir)
      check(builder)  # Again, before a record is read: what tfds made where another user could
      # have put folders first (under a sticky /tmp) between the first check and its writes.
    parts = list(tfds.as_numpy(dataset.batch(10_000)))
  except UserError:
    raise
  except Exception as e:  # tfds raises many types: network, checksum, missing files.
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise UserError(
        f"could not load {name!r} ({split}) from tensorflow-datasets: {type(e).__name__}: "
        f"{first_line}; without network access pass {download.IDX_FLAG_HINT}") from e
  images = np.concatenate([p["image"] for p in parts]).astype(np.uint8, copy=False)  # (One copy.)
  if images.ndim == 3:
    images = images[..., None]
  return images, np.concatenate([p["label"] for p in parts]).astype(np.int32)


def _open_to_others(folder: str) -> str | None:
  """Why another user could have written tfds's prepared files in the local `folder` (or will
  write them there: it need not exist yet), else None; as for an IDX folder (idx.load_split)."""
  if storage.is_url(folder) or os.environ.get(storage.TRUST_ENV) == "1":
    return None
  above = folder = os.path.abspath(folder)
  while not os.path.isdir(above) and above != "/":  # What is there (tfds makes the rest).
    above = os.path.dirname(above)
  files = [os.path.join(folder, n) for n in os.listdir(folder)] if above == folder else []
  for path in files + [above]:
    for chain in (os.path.abspath(path), os.path.realpath(path)):
      if why := paths.put_by_others(chain):
        return why
    mode = os.stat(path).st_mode
    if (mode & stat.S_IWOTH and not (path == above and mode & stat.S_ISVTX)
        and not paths.read_only(path)):
      return f"{os.path.realpath(path)} is writable by every user"
  return None


def digest(split: Split) -> str:
  """SHA-256 (16 hex digits) of a split's labels and images in their order: tells two sources
  of the same examples apart when they order them differently (tensorflow-datasets shuffles
  them when it prepares them; the IDX files do not). 30 ms for Fashion-MNIST's train split.
  The arrays' own bytes are hashed (`tobytes` copied the split's 47 MB for it)."""
  sha = hashlib.sha256(np.ascontiguousarray(split.labels, dtype=np.int32))
  sha.update(np.ascontiguousarray(split.images))
  return sha.hexdigest()[:16]


VALIDATION_SEED = 20_17_08_25  # Fixed: the same validation set whatever config.seed is.


def hold_out(split: Split, n: int) -> tuple[Split, Split | None]:
  """Splits `n` examples (a fixed random subset) off a split for validation."""
  if n <= 0:
    return split, None
  if n >= len(split):
    raise UserError(f"config.validation_size={n} leaves no training examples (of {len(split)}); "
                    "lower it")
  order = np.random.default_rng(VALIDATION_SEED).permutation(len(split))
  keep, held = np.sort(order[n:]), np.sort(order[:n])
  return (Split(split.images[keep], split.labels[keep]),
          Split(split.images[held], split.labels[held]))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The train order of one epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_index(seed: int, epoch: int, n: int, global_batch: int) -> np.ndarray:
  """The examples of every step of one epoch: int32 [steps_per_epoch, global_batch].

  Row i is step i's global batch: the epoch's order cut into batches, each sorted (a
  cache-friendlier gather of the same set); process p takes the row's p-th contiguous slice.
  The one definition of the train order, for both data placements. Sorted whole, not per
  process's slice: an example's position in the batch picks its augmentation and dropout
  draws, so per-slice sorting made them depend on the number of processes.
  """
  per_epoch = n // global_batch
  order = epoch_order(seed, epoch, n)[:per_epoch * global_batch]
  return np.sort(order.reshape(per_epoch, global_batch), axis=1).astype(np.int32)


def _check_batch(global_batch: int, process_count: int, key: str) -> None:
  """A global batch of at least one example, split evenly between the processes."""
  if global_batch <= 0:  # (0: a ZeroDivisionError; negative: a reshape's ValueError or no batch.)
    raise UserError(f"config.{key}={global_batch} is no batch size; use a positive number")
  if global_batch % process_count:
    raise UserError(f"config.{key}={global_batch} does not divide by the "
                    f"{process_count} processes; use a multiple of {process_count}")


def train_batches(split: Split, global_batch: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Endless iterator of this process's part of each global train batch.

  Incomplete final batches of an epoch are dropped (the usual choice for
  training); step s always holds the same examples whatever `start_step` was.
  A batch size out of range is refused here, not at the first batch.
  """
  _check_batch(global_batch, process_count, "batch_size")
  if global_batch > len(split):  # (No step an epoch: a ZeroDivisionError.)
    raise UserError(f"config.batch_size={global_batch} is larger than the {len(split)} "
                    "training examples; lower it")
  return _train_batches(split, global_batch, seed, start_step, process_index, process_count)


def _train_batches(split, global_batch, seed, start_step, process_index, process_count):
  local = global_batch // process_count
  per_epoch = len(split) // global_batch
  epoch, offset = divmod(start_step, per_epoch)
  while True:
    rows = epoch_index(seed, epoch, len(split), global_batch)
    for i in range(offset, per_epoch):
      index = rows[i, process_index * local:(process_index + 1) * local]
      yield {"image": split.images[index], "label": split.labels[index]}
    epoch, offset = epoch + 1, 0


def eval_batches(split: Split, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Covers every example exactly once, in order; the last batch is padded.

  Each batch carries `mask` (1 = real example, 0 = padding) so metrics count
  the real examples only.
  """
  _check_batch(global_batch, process_count, "eval_batch_size")
  local = global_batch // process_count
  n = len(split)
  for start in range(0, n, global_batch):
    lo = min(start + process_index * local, n)
    hi = min(lo + local, n)
    images, labels = split.images[lo:hi], split.labels[lo:hi]
    mask = np.ones(hi - lo, dtype=np.float32)
    pad = local - (hi - lo)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    yield {"image": images, "label": labels, "mask": mask}


def stack(batches: list[Batch]) -> Batch:
  """Stacks consecutive batches along a new leading axis (for multi-step dispatch)."""
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}
