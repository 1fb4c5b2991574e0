"""What a checkpoint that fails to restore means: damage to move aside, or an error that moves
nothing (permissions, storage); and whether a resume would change the run (its fingerprint)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import threading

import jax
import numpy as np

from fashion_jax.support import storage
from fashion_jax.support.errors import UserError


# Fingerprint entries added after checkpoints had fingerprints: a checkpoint without one resumes.
_LATER_ENTRIES = ("train_data",)
# Entries no --config flag sets: the data and the run's length.
_NOT_FLAGS = ("train_examples", "total_steps", "train_data")


def check_description(where: str, stored: dict, description: dict, serving: bool = False) -> None:
  """Raises UserError where the checkpoint at `where` (`stored`: the JSON saved with it) holds
  another model, shape or run than `description`'s. `serving`: the config is the run's own
  config.json (predict/evaluate/export take no --config), so the hint is to put back the one the
  run was trained with, not a training flag."""
  fix = ("the run's config.json no longer matches its checkpoints: put back the config.json it "
         "was trained with" if serving else "use a new --workdir")
  if stored.get("model") != description["model"]:
    raise UserError(
        f"checkpoint {where} is of model {stored.get('model')!r} but the config asks for "
        f"{description['model']!r}; " +
        (fix if serving else f"{fix}, or --config.model={stored.get('model')}"))
  if stored.get("param_shapes") != description["param_shapes"]:
    differ = sorted(k for k in set(stored.get("param_shapes", {})) | set(description["param_shapes"])
                    if stored.get("param_shapes", {}).get(k) != description["param_shapes"].get(k))
    first = differ[0] if differ else "?"
    raise UserError(
        f"checkpoint {where} has parameter shapes that do not match the configured "
        f"{description['model']!r} model ({len(differ)} differ, e.g. {first}: checkpoint "
        f"{stored.get('param_shapes', {}).get(first)} vs config "
        f"{description['param_shapes'].get(first)}); " +
        (fix if serving else f"{fix} or the config it was trained with"))
  check_fingerprint(where, stored.get("fingerprint"), description.get("fingerprint"))


def check_fingerprint(where: str, stored: dict | None, wanted: dict | None) -> None:
  """A resume that would change the run's data order, schedule or model: UserError."""
  if stored is None or wanted is None:  # Written before fingerprints existed, or serving.
    return
  wanted = {k: v for k, v in wanted.items() if k in stored or k not in _LATER_ENTRIES}
  if stored.get("lr_schedule") == "onecycle" == wanted.get("lr_schedule"):  # Its warm-up is its
    stored, wanted = ({k: v for k, v in d.items() if k != "warmup_steps"}  # own: warmup_steps
                      for d in (stored, wanted))  # changes nothing there.
  differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
  if not differ:
    return
  show = lambda d, k: json.dumps(d.get(k)) if k in d else "(none)"
  was = ", ".join(f"{k}={show(stored, k)}" for k in differ)
  now = ", ".join(f"{k}={show(wanted, k)}" for k in differ)
  flags = " ".join(f"--config.{k}={show(stored, k)}" for k in differ if k not in _NOT_FLAGS)
  data = (" (train_data: a digest of the train split in its order, which differs between "
          "sources: tensorflow-datasets orders the examples unlike the IDX files; config.json's "
          "_derived.data_source names the source it was trained from: an IDX folder or the "
          "download's cache is --config.idx_dir=FOLDER, tensorflow-datasets needs TensorFlow "
          "and tfds installed)"
          if "train_data" in differ else "")
  raise UserError(
      f"checkpoint {where} was trained with {was}, but the config gives {now}{data}: resuming "
      "would change the run's data order, schedule or model; use a new --workdir"
      + (f", or pass {flags}" if flags else " (or the data and length it was trained with)"))


def restore_target(where: str, stored, wanted):
  """What to read the checkpoint at `where` into: the abstract train state `wanted`, or, where the
  state saved there (`stored`: Orbax's metadata of it) lacks top-level entries that hold no array
  in `wanted` (a field added since, None or {} in this run: ema_batch_stats in checkpoints from
  before the fingerprint), a dict of the entries it has, to put back into `wanted`. A UserError
  where the arrays differ (another optimizer, ema_decay or version)."""
  if stored is None:  # (No metadata to compare: read as it is.)
    return wanted
  stored_keys, wanted_keys = _tree_paths(stored), _tree_paths(wanted)
  names = [f.name for f in dataclasses.fields(wanted)] if dataclasses.is_dataclass(wanted) else []
  extra_entries = set(stored.keys()) - set(names) if names else set()
  if stored_keys != wanted_keys or extra_entries:
    missing = sorted(wanted_keys - stored_keys)
    extra = sorted((stored_keys - wanted_keys) or extra_entries)
    raise UserError(
        f"checkpoint {where} does not fit the configured train state (missing "
        f"{missing[:2]}, unexpected {extra[:2]}); was it written with another optimizer or "
        "ema_decay, or by another fashion_jax version? Use a new --workdir or the config it was "
        "trained with")
  if not names or all(name in stored.keys() for name in names):
    return wanted
  return {name: getattr(wanted, name) for name in names if name in stored.keys()}


def _tree_paths(tree) -> set[str]:
  """Leaf paths as "a/b/0/c", the same for dataclass/NamedTuple trees and Orbax's dict metadata."""
  return {leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class DigestMismatch(ValueError):
  """A restored array whose bits differ from what was saved: damage (`is_damage`)."""


def leaf_path(key_path) -> str:
  """A leaf's path as "a/b/0/c": the same for the saved dataclass/NamedTuple state and the dicts
  serving reads it back as."""
  return "/".join(re.findall(r"\w+", jax.tree_util.keystr(key_path)))


def _words(leaf) -> np.ndarray:
  """A leaf's bits as a flat uint32 vector (1- and 2-byte types widened, 8-byte ones split), from
  this process's copy (checkpointed arrays are replicated: every process holds all of it)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)  # (A replicated array's local copy is the whole array.)
  a = np.asarray(leaf).reshape(-1)
  if a.dtype == np.bool_:
    return a.astype(np.uint32)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[a.dtype.itemsize]
  return np.ascontiguousarray(a).view(unsigned).astype(np.uint32, copy=False)


def _leaf_digest(leaf) -> str:
  """16 hex digits: two wrapping uint32 sums, of the words times odd weights (any change confined
  to one word changes it) and of the words mixed (32 more, independent bits)."""
  w = _words(leaf)
  i = np.arange(w.size, dtype=np.uint32)
  weighted = (w * (2 * i + 1)).sum(dtype=np.uint32)
  mixed = ((w ^ (w >> 13)) * np.uint32(0x9E3779B1) + i).sum(dtype=np.uint32)
  return f"{int(weighted):08x}{int(mixed):08x}"


def digest(tree) -> dict[str, str]:
  """{leaf path: 16 hex digits} of a state's exact bits, saved with each checkpoint and checked
  after each restore: Orbax checksums its index, not the arrays, so a flipped byte in an array
  file was restored as it was (a run resumed from it, serving answered with it, exit 0). On the
  host, in NumPy (~1 ms for the default CNN's state; a jitted version took a second to compile
  at the first save); arrays replicated over the processes, as checkpoints are, give every
  process the same."""
  return {leaf_path(path): _leaf_digest(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_digest(where: str, stored: dict | None, tree, under: tuple[str, ...] = ()) -> None:
  """Raises DigestMismatch where `tree`'s arrays (those under the `under` top-level keys, all if none)
  differ from the digest `stored` with the checkpoint (None: saved before digests; unchecked)."""
  if not stored:
    return
  for path, value in digest(tree).items():
    if path in stored and (not under or path.split("/")[0] in under) and stored[path] != value:
      raise DigestMismatch(f"checkpoint {where}: the array {path} differs from what was saved "
                           "(its digest); the file holding it changed after it was written")


def unreadable_metrics(directory: str) -> UserError | None:
  """Why Orbax could not open `directory`, where a step's saved metrics are unreadable: Orbax
  reads each step's metrics/metrics as it opens the folder, and one damaged or unreadable file
  was a traceback in training, predict, evaluate and export alike. Not moved aside: without
  its metrics a checkpoint stops competing for "best" and goes when it is no longer among the
  newest, so that is left for the user to decide."""
  try:
    files = [f for f in storage.files_under(directory) if f.endswith("/metrics/metrics")]
  except Exception:  # pylint: disable=broad-except  (then the original error says it)
    return None
  for path in sorted(files):
    try:
      json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
      why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
      return UserError(f"{path}, the saved evaluation of checkpoint {path.split('/')[-3]}, cannot be "
                       f"read ({why}); the checkpoint itself may be intact: restore the file, or "
                       "delete its metrics folder (the checkpoint then no longer competes for "
                       "best, and goes once it is not among the newest), and re-run")
  return None


def blocked(folder: str) -> str | None:
  """What in a local checkpoint folder this process may not read (`PermissionError: ...`), or None.

  Orbax reports an unreadable `state` folder as a pytree structure error (it swallows the
  PermissionError and returns no metadata): damage, by its text. Moving it aside then lost the
  run's progress over a permission, which moves nothing everywhere else.
  """
  if storage.is_url(folder):  # Cloud Storage says PERMISSION_DENIED: never damage.
    return None
  problems = []
  for root, _, files in os.walk(folder, onerror=problems.append):
    for name in files:
      try:
        with open(os.path.join(root, name), "rb"):
          pass
      except OSError as e:
        problems.append(e)
  for e in problems:
    if isinstance(e, PermissionError):
      return f"{type(e).__name__}: {e.strerror}: {e.filename}"
  return None


# How tensorstore/Orbax report a checkpoint that is damaged for good (files truncated,
# missing, or unparsable) -- and the status codes of a failure that may pass (storage
# unavailable, quota, permissions), which never count as damage.
_DAMAGE = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
           "pytree structure", "Error reading", "Error opening", "corrupt", "truncat", "checksum")
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
              "ABORTED", "CANCELLED", "UNAUTHENTICATED")


def chain(error: BaseException) -> list[BaseException]:
  """The error and what caused it (Orbax wraps tensorstore's errors in a plain Exception)."""
  chain = []
  while error is not None and error not in chain and len(chain) < 8:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def is_damage(error: BaseException) -> bool:
  """Whether a failed read means the checkpoint's files are damaged (not a passing I/O error)."""
  damage = False
  for link in chain(error):
    text = str(link)
    if any(code in text for code in _TRANSIENT):
      return False
    if isinstance(link, (FileNotFoundError, json.JSONDecodeError, KeyError, EOFError,
                         DigestMismatch)):
      damage = True
    elif isinstance(link, OSError):  # EIO, EACCES, ENOSPC, timeouts: the storage, not the files.
      return False
    elif isinstance(link, ValueError) and any(sign in text for sign in _DAMAGE):
      damage = True
  return damage


# How an asynchronous save that found the disk (or the user's quota) full reports it: TensorStore's
# error text, or an OSError with ENOSPC/EDQUOT, in the chain of what Orbax raises.
_FULL_SIGNS = ("No space left on device", "os_error_code='28'", "Disk quota exceeded",
               "os_error_code='122'")


def out_of_space(error: BaseException) -> bool:
  return any(getattr(link, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
             or any(s in str(link) for s in _FULL_SIGNS)
             for link in chain(error))


class QuietOutOfSpace(logging.Filter):
  """Orbax's own error lines with tracebacks (~470 lines for the tiny config) where a save found
  the disk full: the error itself comes back out of the next save or wait, as one line."""

  def filter(self, record):
    if record.levelno < logging.ERROR or "/orbax/" not in record.pathname.replace(os.sep, "/"):
      return True
    text = record.getMessage()
    return not (any(s in text for s in _FULL_SIGNS)
                or (record.exc_info and record.exc_info[1] is not None
                    and out_of_space(record.exc_info[1])))


def orbax_threads_since(before: set) -> list:
  """Orbax's threads started since `before` (what `threading.enumerate()` gave then)."""
  return [t for t in set(threading.enumerate()) - before if type(t).__module__.startswith("orbax.")]


def finish_threads(threads, timeout: float = 60.0) -> None:
  """Waits for `threads` (Orbax's, started by opening a training run's checkpoints: its removal
  of temporary folders), at most `timeout` s each. Left running, one met the exiting interpreter
  and printed a traceback under the command's last line ('cannot schedule new futures after
  shutdown'). Thread.join itself: Orbax's would raise the thread's error (or a TimeoutError) in
  place of the one being reported; Orbax logs that error, and raises it out of the next save."""
  for thread in threads:
    threading.Thread.join(thread, timeout)
