"""Where a run lives: a local folder, or a Cloud Storage folder (gs://bucket/path).

The run's own files (config.json, metrics.jsonl, the evaluation report) go through these few
functions; Orbax and TensorStore write checkpoints to gs:// themselves, tensorboardX its event
files. Cloud paths go through etils.epath and gcsfs (`pip install 'fashion_jax[gcs]'`), also where
TensorFlow is installed (`use_gcsfs`); TensorFlow's file system only where gcsfs is missing.
Cloud Storage has no folders, no append and no rename: a folder exists once an object is under
it, an append rewrites the object (the metrics writer buffers, see metric_writers.py), a move
copies then deletes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import urllib.parse
import uuid

from fashion_jax.support import network, paths
from fashion_jax.support.errors import UserError
from fashion_jax.support.errors import available as _found  # Whether a module is importable.

CLOUD_SCHEMES = ("gs",)
# =1: a workdir another user owns or all may write is used (training) or served from.
TRUST_ENV = "FASHION_JAX_TRUST_WORKDIR"


def writable_by_all(paths) -> str | None:
  """The first of the local `paths` (that exist) every user may write, else None; None too with
  $FASHION_JAX_TRUST_WORKDIR=1 (a mount that shows every folder as 0777: WSL's /mnt/c, CIFS)."""
  for path in ([] if os.environ.get(TRUST_ENV) == "1" else paths):
    try:
      if not is_url(path) and os.stat(path).st_mode & stat.S_IWOTH:
        return path
    except OSError:  # Missing, or a folder on the way not searchable: said when it is read.
      pass
  return None


def is_url(path: str) -> bool:
  return "://" in str(path)


def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def use_gcsfs() -> None:
  """Makes etils.epath reach Cloud Storage through gcsfs wherever gcsfs is installed, not
  through TensorFlow's file system (Colab's GPU/CPU runtimes have both): a second client no test
  can point at an emulator, with a 5-second status cache `forget_listings` cannot drop. A user's
  EPATH_USE_TF wins. epath decides at its first path of any kind: every command calls this
  first (`cli.parse_flags`); `resolve` too (for library callers: set EPATH_USE_TF=false first)."""
  if "EPATH_USE_TF" not in os.environ and _found("gcsfs"):
    os.environ["EPATH_USE_TF"] = "false"


def _cloud_backend_missing() -> bool:
  """Whether a gs:// run cannot write here: etils.epath needs TensorFlow's file system or gcsfs,
  tensorboardX google-cloud-storage (without it the run would fail at its first logged value)."""
  use_tf = os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")
  return (not ((use_tf and _found("tensorflow")) or _found("gcsfs"))
          or not _found("google.cloud.storage"))


def resolve(path: str, flag: str) -> str:
  """A local path made absolute, or a gs:// URL as given (without a trailing slash).

  Other schemes (s3://, ...) and a gs:// URL without a file system for it are UserErrors
  naming `flag`, raised before anything is created (never a local folder named "s3:").
  """
  if not str(path).strip():  # abspath("") is the current folder: never where a run goes unasked.
    raise UserError(f"{flag} is empty; pass a folder (or gs://bucket/path)")
  if not is_url(path):
    return os.path.abspath(os.path.expanduser(path))
  scheme, _, rest = str(path).partition("://")
  if scheme not in CLOUD_SCHEMES or not rest.strip("/"):
    raise UserError(f"{flag}={path!r}: {scheme}:// folders are not supported (gs://bucket/path "
                    "is); pass a local folder, or mount the storage and pass its mount point")
  use_gcsfs()
  if _cloud_backend_missing():
    raise UserError(f"{flag}={path!r} needs gcsfs (or TensorFlow) and google-cloud-storage to "
                    "write to Cloud Storage: pip install 'fashion_jax[gcs]'")
  return f"{scheme}://{rest.rstrip('/')}"


def join(path: str, *parts: str) -> str:
  return "/".join([path.rstrip("/"), *parts]) if is_url(path) else os.path.join(path, *parts)


def _ask_cloud(path: str, question: str) -> bool:
  """`exists`/`is_dir`/`is_file` of a gs:// path; a client error (no network, a bad bucket or
  credentials: gcsfs's aiohttp errors, after its retries) is one line, not a traceback."""
  _check_reachable(path)  # Offline: seconds, not a minute of gcsfs's retries (a gs:// workdir).
  try:
    return getattr(_epath(path), question)()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the cloud clients' own errors)
    raise _unreachable(path, e) from e


def _unreachable(path: str, e: Exception) -> UserError:
  first = (str(e).strip().splitlines() or [""])[0][:200]
  return UserError(f"cannot reach {path} ({type(e).__name__}{': ' + first if first else ''}); "
                   "check the network, the bucket's name and your credentials (gcloud auth "
                   "application-default login)")


_REACHED = set()  # The hosts _check_reachable found.
REACH_TIMEOUT_S = 10.0  # Cloud Storage's name lookup.


def _check_reachable(path: str) -> None:
  """Fails within REACH_TIMEOUT_S where the name of gcsfs's host (emulator, else storage.<universe>)
  has no address: offline, gcsfs sought credentials for 15 s, then retried each request for 34 s.
  Only the name (a dead address is gcsfs's to skip); not behind a proxy or an fsspec endpoint."""
  try:
    from fsspec.config import conf  # pylint: disable=g-import-not-at-top  (gcsfs's dependency)
  except ImportError:  # TensorFlow's file system.
    return
  host = os.environ.get("STORAGE_EMULATOR_HOST") or "default"  # (Empty: gcsfs's default too.)
  host = (urllib.parse.urlparse(host if "://" in host else f"http://{host}") if host != "default"
          else urllib.parse.urlparse("https://storage." + os.environ.get(
              "GOOGLE_CLOUD_UNIVERSE_DOMAIN", "googleapis.com")))
  try:  # (ValueError: a port that is no number or out of range, a name IDNA cannot encode.)
    address = (host.hostname, host.port or (443 if host.scheme == "https" else 80))
    if (address in _REACHED  # (Once a process.)
        or any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"))
        or conf.get("gcs", {}).keys() & {"endpoint_url", "session_kwargs"}):
      return
    network.look_up(*address, REACH_TIMEOUT_S)
  except (OSError, ValueError) as e:
    why = (f"no answer in {REACH_TIMEOUT_S:g} s" if isinstance(e, TimeoutError)
           else getattr(e, "strerror", None) or e)  # (A ValueError has no strerror.)
    raise UserError(f"cannot reach {path}: {host.netloc}: {why} (no network?); "
                    "check the network, or use a local copy") from e
  _REACHED.add(address)


def _fsspec(path: str):
  """The fsspec file system (gcsfs) of the gs:// `path`, else None (TensorFlow's)."""
  backend = getattr(_epath(path), "_backend", None)
  return backend.fs(path) if hasattr(backend, "fs") else None


def kind(path: str) -> str | None:
  """"folder", "file" or None (nothing there): one look, which tells "not there" from "cannot
  reach" (a UserError; gcsfs's isdir and isfile answer False to a client error), after checking
  that Cloud Storage answers at all (offline: seconds, not a minute of retries)."""
  if not is_url(path):
    try:
      mode = os.stat(path).st_mode
      if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # A FIFO's read would wait for ever.
        raise UserError(f"{path} is not a file or folder (a FIFO, socket or device); remove it")
      return "folder" if stat.S_ISDIR(mode) else "file"
    except (FileNotFoundError, NotADirectoryError):
      return None
    except OSError as e:
      raise UserError(f"cannot look at {path} ({e.strerror}); make it readable by you") from e
  _check_reachable(path)
  try:
    if (fs := _fsspec(path)) is not None:
      return "folder" if fs.info(path).get("type") == "directory" else "file"
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except  (the cloud clients' own errors)
    raise _unreachable(path, e) from e
  return ("folder" if isdir(path) else "file") if exists(path) else None


def kinds(folder: str, names) -> dict[str, str | None]:
  """`kind` of each of `names` in the folder `folder`; in a bucket, from one listing."""
  if not is_url(folder) or (fs := _fsspec(folder)) is None:
    return {name: kind(join(folder, name)) for name in names}
  try:
    listed = {i["name"].rstrip("/").rsplit("/", 1)[-1]: i["type"] for i in fs.ls(folder, True)}
  except Exception as e:  # pylint: disable=broad-except  (the cloud clients' own errors)
    raise _unreachable(folder, e) from e
  return {n: {None: None, "directory": "folder"}.get(listed.get(n), "file") for n in names}


def exists(path: str) -> bool:
  return _ask_cloud(path, "exists") if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _ask_cloud(path, "is_dir") if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _ask_cloud(path, "is_file") if is_url(path) else os.path.isfile(path)


def read_text(path: str, errors: str = "strict") -> str:
  """The file as text (UTF-8; `errors="replace"` to read one that may hold stray bytes)."""
  return read_bytes(path).decode(errors=errors)


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return _epath(path).read_bytes()
  try:
    with open(path, "rb") as f:
      return f.read()
  except IsADirectoryError as e:
    raise _folder_in_the_way(path) from e


def unreadable(path: str, e: OSError) -> UserError:
  """The one line for a run's file or folder this user cannot read: permissions (make it
  readable), else what the system said (a file gone, an I/O error, a network folder away)."""
  fix = ("make it readable by you, or pass the --workdir of a run you can read"
         if isinstance(e, PermissionError) else
         "check that it is there and its storage is reachable, then re-run")
  return UserError(f"cannot read {path} ({e.strerror or e}); {fix}")


def _folder_in_the_way(path: str) -> UserError:
  return UserError(f"{path} is a folder where fashion_jax keeps a file; move it away (or use "
                   "another --workdir)")


_FULL = (errno.ENOSPC, errno.EDQUOT)
_RESUMES = ("free some space (or use another --workdir) and re-run the same command: it resumes "
            "from the last checkpoint, which is intact")


def out_of_space(path: str, e: OSError, fix: str = _RESUMES) -> UserError | None:
  """The one line for a write that found the disk (or the user's quota) full, else None. `fix`:
  what to do (by default a training run's: re-run to resume)."""
  if getattr(e, "errno", None) not in _FULL:
    return None
  return UserError(f"no space left where {path} is written ({e.strerror}); {fix}")


def write_text(path: str, text: str, full_fix: str = _RESUMES) -> None:
  write_bytes(path, text.encode(), full_fix)  # UTF-8.


def written_in_place(path: str) -> bool:
  """Whether `write_bytes` appends to `path` where it is instead of replacing it: a path under
  /dev/ or /proc/ (/dev/null, /dev/stdout: as root a replace turned /dev/null into a regular file
  for every process, and a redirected stdout lost what was printed before), or a FIFO or
  character device itself (not through a link, which is replaced like any other)."""
  if is_url(path):
    return False
  absolute = os.path.abspath(path)
  if absolute.startswith(("/dev/", "/proc/")):
    return True
  try:
    mode = os.lstat(path).st_mode
  except OSError:
    return False
  return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def write_bytes(path: str, data: bytes, full_fix: str = _RESUMES) -> None:
  """Writes the whole file at once: readers see the old or the new content, never a part.

  A link is replaced, not written through (its target could be another user's file, planted);
  devices and FIFOs are appended to (`written_in_place`). `full_fix`: see out_of_space.
  """
  if is_url(path):
    _epath(path).write_bytes(data)  # One object upload: atomic.
    return
  if os.path.isdir(path):
    raise _folder_in_the_way(path)
  if written_in_place(path):
    try:
      with open(path, "ab") as f:
        f.write(data)
      return
    except OSError as e:
      raise out_of_space(path, e, full_fix) or e
  # A short name beside it (a long file name plus a suffix could pass the file system's limit);
  # open(), not mkstemp: the umask's permissions.
  tmp = os.path.join(os.path.dirname(path), f".fashion_jax-{uuid.uuid4().hex[:16]}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()  # On disk before the rename: after a crash (XFS, ext4 data=writeback) the file
      os.fsync(f.fileno())  # was empty (config.json; metrics.jsonl cut back, all lines lost).
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and (full := out_of_space(path, e, full_fix)):
      raise full from e
    raise


def append_text(path: str, text: str) -> None:
  if is_url(path):  # No append in Cloud Storage (gcsfs's "a" silently overwrites).
    write_text(path, (read_text(path) if exists(path) else "") + text)
    return
  try:
    with open(path, "a") as f:
      f.write(text)
  except OSError as e:
    full = out_of_space(path, e)
    if full is None:
      raise
    raise full from e


def ensure_writable_dir(path: str, flag: str) -> str:
  """`resolve`d `path`, created if needed and proved writable (a probe file written and removed:
  on Cloud Storage that checks the bucket and the credentials); else a UserError naming `flag`."""
  path = resolve(path, flag)
  if (file := None if is_url(path) else paths.file_on_the_way(path)) is not None:
    raise UserError(f"{flag} {path!r} is a file, not a folder; pass a folder (new or existing)"
                    if file == path else f"{file!r} is a file, not a folder: choose another "
                    f"{flag} ({path!r} would be inside it)")
  try:
    if is_url(path):
      probe = _epath(join(path, f".write_test_{uuid.uuid4().hex}"))
      probe.write_text("")
      probe.unlink()
    else:
      os.makedirs(path, exist_ok=True)
      # A unique name (pids collide across containers sharing a workdir).
      descriptor, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)
      os.close(descriptor)
      os.remove(probe)
  except Exception as e:  # pylint: disable=broad-except  (OSError; the cloud clients' own)
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0][:200] if text
                                              else type(e).__name__)
    raise UserError(f"{flag} {path!r} is not writable ({reason}); pass a {flag} you can "
                    "write to" + (" (check the bucket's name and your credentials: gcloud auth "
                                  "application-default login)" if is_url(path) else "")) from e
  return path


def forget_listings(path: str) -> None:
  """Makes this process list the folders of `path`'s file system afresh from now on.

  gcsfs (etils.epath's Cloud Storage client without TensorFlow) keeps every folder listing it
  has made, and forgets only what this process changes itself: what another process of the job
  changed stays unseen (process 1 still listed the checkpoint that process 0 had moved aside,
  skipped its part of saving that step again, and process 0 waited in that save for good). Call
  it after the barrier that follows such a change, or before reading again what may have been
  incomplete. Local folders keep no listings; TensorFlow's file system (used only where gcsfs is
  not installed) lists afresh each time, and keeps a file's status for 5 s at most
  (GCS_STAT_CACHE_MAX_AGE); it is not tried here: the emulator is reached through gcsfs.
  """
  if not is_url(path):
    return
  backend = getattr(_epath(path), "_backend", None)  # epath's file system for this path.
  if hasattr(backend, "fs"):  # fsspec: gcsfs.
    backend.fs(path).invalidate_cache()  # All of them: "at or under" a path is not what it does.


def put_file(local: str, path: str) -> None:
  """Copies the local file `local` to `path` (local or cloud)."""
  if is_url(path):
    _epath(path).write_bytes(_epath(local).read_bytes())
  else:
    shutil.copyfile(local, path)


def has_content(path: str) -> bool:
  """Whether the folder `path` holds anything (one listing, not a walk of all below it)."""
  if is_url(path):
    return next(iter(_epath(path).iterdir()), None) is not None
  return bool(os.listdir(path))


def remove_if_empty(path: str) -> None:
  """Removes the folder `path` if it is empty (a cloud "folder" with no object does not exist)."""
  if is_url(path):
    return
  try:
    os.rmdir(path)
  except OSError:
    pass


def move(source: str, target: str) -> None:
  """Moves the folder `source` to `target` (whose parent is created).

  Locally a rename: one that fails moves nothing (shutil.move's copy-then-delete fallback left
  two copies where the folder could not be deleted); across file systems, copy then delete.
  """
  if not is_url(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
      os.rename(source, target)
    except OSError as e:
      if e.errno != errno.EXDEV:
        raise
      shutil.move(source, target)
    return
  src = _epath(source)
  for item in files_under(source):
    destination = _epath(join(target, item[len(str(src)):].lstrip("/")))
    destination.parent.mkdir(parents=True, exist_ok=True)
    _epath(item).copy(destination)
  src.rmtree()


def replace_folder(local: str, path: str) -> None:
  """Puts the local folder `local` at the cloud folder `path`, replacing what is there.

  Uploaded beside it first (`path`.partial-ID); only then is the old content moved aside
  (`path`.old-ID), the new moved in, and the old deleted. An upload that fails leaves `path` as
  it was (and removes its part); a failure after it loses nothing (the error names both folders).
  """
  tag = uuid.uuid4().hex[:8]
  partial, old = f"{path}.partial-{tag}", None
  try:
    for folder, _, names in os.walk(local):
      for name in names:
        relative = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
        put_file(os.path.join(folder, name), join(partial, relative))
  except BaseException:
    try:
      _epath(partial).rmtree()  # What was uploaded (if anything: no objects, no folder).
    except Exception:  # pylint: disable=broad-except  (the upload's error is the one to see)
      pass
    raise
  try:
    if isdir(path):
      old = f"{path}.old-{tag}"
      move(path, old)
    move(partial, path)
  except Exception as e:  # pylint: disable=broad-except  (a cloud client's own errors too)
    raise UserError(f"replacing {path} stopped half-way ({type(e).__name__}: {e}); the new "
                    f"content is in {partial}" + (f", the previous in {old}" if old else "")
                    + ": move it into place by hand, or re-run") from e
  if old:
    _epath(old).rmtree()


def files_under(path: str) -> list[str]:
  """Every file below the folder `path`, walked one level at a time (epath refuses "**" on gs://:
  one listing per folder is what it costs anyway)."""
  found = []
  for item in _epath(path).iterdir():
    if item.is_dir():
      found += files_under(str(item))
    else:
      found.append(str(item))
  return found
