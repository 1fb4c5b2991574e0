"""The export's --output folder: what may be replaced, and a swap that loses nothing.

The export is built in a hidden folder beside --output (inside it where the parent cannot take a
sibling), then moved in with one rename (or entry by entry, inside); a failure puts back what
was there. A gs:// --output is built locally and uploaded (storage.replace_folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import time

from fashion_jax.support import faults
from fashion_jax.support import paths
from fashion_jax.support import runtime
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

METADATA_NAME = "fashion_jax_export.json"
README_NAME = "README.md"


def check_output(output: str, overwrite: bool) -> str:
  """The absolute --output, after refusing anything that would lose data.

  A non-empty folder is refused unless --overwrite; even then only a
  previous export (it has our metadata file) is replaced, never an arbitrary
  folder someone pointed --output at by mistake.
  """
  if not output:
    raise UserError("--output is empty; pass the folder to write the SavedModel to")
  path = storage.resolve(output, "--output")  # gs://bucket/path too: where Vertex AI reads models.
  if storage.is_url(path) and "/" not in path.split("://", 1)[1]:
    raise UserError(f"--output={path} is a whole bucket; pass a folder in it, e.g. "
                    f"--output={path}/fashion_jax_model")
  if not storage.is_url(path):
    # A link to the export folder (models/current -> v3): the export replaces v3's contents and
    # the link stays (it had replaced the link by a folder and left v3 as it was, or failed).
    path = os.path.realpath(path)
    if why := _open_to_others(os.path.join(os.getcwd(), os.path.expanduser(output)), path):
      raise UserError(f"--output {output!r} is not written: {why}, so another user could change "
                      "the export there before it is loaded back to be checked (a SavedModel's "
                      "graph runs with your rights) or served; pass an --output in a folder of "
                      f"your own, or set {storage.TRUST_ENV}=1 if you trust the folder's owner (a "
                      "teammate's group folder on a shared /scratch, a container's bind mount) or "
                      "it is a mount that shows every folder as 0777 or as another user's (WSL's "
                      "/mnt/c, CIFS, a Kubernetes emptyDir)")
  if storage.exists(path) and not storage.isdir(path):
    raise UserError(f"--output {path!r} is a file; pass a folder (new or empty)")
  above = path
  while not storage.is_url(path) and not os.path.lexists(above):  # Said after the conversion,
    above = os.path.dirname(above)  # "cannot write to 'x.png' (File exists)".
  if above != path and not os.path.isdir(above):
    raise UserError(f"--output {path!r} cannot be made: {above!r} is a file, not a folder; "
                    "pass an --output in a folder")
  if storage.isdir(path) and has_content(path):
    if not overwrite:
      raise UserError(f"--output {path!r} is not empty; pass --overwrite to replace the export "
                      "in it, or a new folder")
    if not storage.exists(storage.join(path, METADATA_NAME)):
      raise UserError(f"--output {path!r} is not empty and holds no fashion_jax export "
                      f"({METADATA_NAME} missing); refusing to replace it even with --overwrite; "
                      "pass a new or empty folder")
    foreign = _foreign_files(path)
    if foreign:
      raise UserError(f"--output {path!r} holds files the export did not write "
                      f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                      "refusing to replace it even with --overwrite; move them out, or pass a "
                      "new folder")
  return path


def _open_to_others(typed: str, path: str) -> str | None:
  """Why another user could write where the local --output `typed` (absolute, as typed: not
  normalised; resolved: `path`) puts the export (its stage beside it or in it, which is loaded
  back to be checked), else None: `_put_by_others` on the way `typed` names and on `path`, or the
  nearest folder of `path` that exists, where the export is staged, being one every user may
  write without the sticky bit."""
  if os.environ.get(storage.TRUST_ENV) == "1":
    return None
  for way in (typed, path):
    if why := _put_by_others(way):
      return why
  entry = path
  while not os.path.lexists(entry):
    entry = os.path.dirname(entry)
  try:
    mode = os.stat(entry).st_mode
  except OSError:  # A folder on the way not searchable: said when the export is staged.
    return None
  if (stat.S_ISDIR(mode) and mode & stat.S_IWOTH and not mode & stat.S_ISVTX
      and not paths.read_only(entry)):
    return f"the folder {os.path.realpath(entry)} is writable by every user"
  return None


def _put_by_others(way: str) -> str | None:
  """Why another user could change an existing entry on the absolute `way`, else None: each
  name in turn, up to the first missing one, in the folder the kernel finds it in (a `..` after a
  link is its target's parent: abspath's `a/link/../b` is `a/b`, and the link was never looked
  at). A folder on the way every user may write without the sticky bit (anyone can rename what
  is in it away and put theirs), or in one with the sticky bit (/tmp, /scratch) an entry that is
  neither this user's nor root's, wherever it is on the way: the --output itself, a link (their
  /tmp/fj_savedmodel, or a link to their folder) or a folder above it (their /tmp/models, in
  which they can rename the export away and put theirs), as the workdir checks refuse
  (paths.put_by_others); FASHION_JAX_TRUST_WORKDIR=1 for a teammate's. A folder on a read-only
  mount is passed. A folder that cannot be looked at ends it (said when the export is staged)."""
  typed = "/"
  for name in way.split("/"):
    if name in ("", ".", ".."):
      typed = os.path.join(typed, name) if name == ".." else typed  # Where realpath finds it.
      continue
    where, typed = os.path.realpath(typed), os.path.join(typed, name)
    try:
      info = os.lstat(os.path.join(where, name))
      mode = 0 if paths.read_only(where) else os.stat(where).st_mode
    except OSError:  # Missing: nothing further on the way exists.
      return None
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
      return f"the folder {where} is writable by every user"
    if mode & stat.S_IWOTH and info.st_uid not in (os.getuid(), 0):
      theirs = f"another user (uid {info.st_uid})"
      if stat.S_ISLNK(info.st_mode):
        return f"{typed} is a link {theirs} made in {where}, a folder every user may write"
      return f"{typed} belongs to {theirs} in {where}, a folder every user may write"
  return None


# Where the folder's parent cannot take a sibling (a mount point, a parent you cannot write to),
# the export is staged inside the folder itself, under these names.
_INSIDE = (".fashion_jax-export-", ".fashion_jax-old-")


def _kept(path: str) -> tuple[str, ...]:
  """Entries of a local folder that an export neither counts nor moves: what it stages there,
  and a file system's lost+found at a mount point (an ext4 volume's root)."""
  return _INSIDE + (("lost+found",) if os.path.ismount(path) else ())


def has_content(path: str) -> bool:
  """storage.has_content, less `_kept` entries (local folders)."""
  if storage.is_url(path):
    return storage.has_content(path)
  kept = _kept(path)
  return any(not name.startswith(kept) for name in os.listdir(path))


# What an export writes at its top level: exports made before the metadata listed their files.
_EXPORT_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets",
                             METADATA_NAME, README_NAME})


def relative_files(folder: str) -> list[str]:
  prefix = folder.rstrip("/") + "/"
  return sorted(f[len(prefix):] if f.startswith(prefix) else f
                for f in storage.files_under(folder))


def _foreign_files(path: str) -> list[str]:
  """The files under an export folder that the export did not write (its metadata's `files`)."""
  try:
    listed = json.loads(storage.read_text(storage.join(path, METADATA_NAME))).get("files")
  except (OSError, ValueError, AttributeError):
    listed = None
  kept = () if storage.is_url(path) else _kept(path)
  files = [f for f in relative_files(path) if not f.startswith(kept)]
  if isinstance(listed, list):
    return [f for f in files if f not in set(listed)]
  return [f for f in files if f.split("/", 1)[0] not in _EXPORT_ENTRIES]


STALE_S = 3600  # An export takes seconds to minutes; its staging folder changes meanwhile.


class Stage:
  """The folder an export is built in (`folder`), and its move into --output (`move_in`)."""

  def __init__(self, folder: str):
    self.folder, self.moving, self.stopped = folder, False, False
    self.scratch: list[str] = []  # Other temporary folders a SIGTERM removes too.

  def move_in(self, path: str) -> None:
    """move_into_place, a SIGTERM meanwhile held until it is done (stopped halfway, the move
    left --output empty, the previous export in a folder beside it)."""
    self.moving = not storage.is_url(path)  # (Not over an upload: it may take minutes.)
    faults.maybe_signal("export_moving")  # Tests: SIGTERM while the export is moved in.
    move_into_place(self.folder, path)


@contextlib.contextmanager
def staged(path: str):
  """A Stage: a new folder to build the export for `path` in (local; a gs:// one is uploaded
  from it), beside it, so that one rename swaps it in, or inside it where that cannot be (a
  mount point cannot be renamed; a parent you cannot write to takes no sibling). Removed on
  leaving, on an error, and on SIGTERM (`timeout`, a scheduler's stop: one line, exit 143;
  Python's default ended the process at once and left it hidden beside --output). Not as an
  exception: one raised inside JAX's or TensorFlow's callbacks can be swallowed."""
  parent = None if storage.is_url(path) else os.path.dirname(path)
  inside = bool(parent) and os.path.isdir(path) and (os.path.ismount(path) or
                                                     not os.access(parent, os.W_OK))
  prefix = _INSIDE[0] if inside else f".{os.path.basename(path)}.export-"
  where = (path if inside else parent) or tempfile.gettempdir()  # gs://: staged locally.
  try:
    if parent:
      os.makedirs(parent, exist_ok=True)
    remove_stale(where, prefix)
    stage = Stage(tempfile.mkdtemp(prefix=prefix, dir=where))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage.folder, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private.
  except OSError as e:
    raise UserError(f"cannot write to {where!r} ({e.strerror}); pass an --output you can write "
                    "to") from e

  def stop(signum, frame):
    del signum, frame
    if stage.moving:
      stage.stopped = True
      return
    for folder in (stage.folder, *stage.scratch):
      shutil.rmtree(folder, ignore_errors=True)
    runtime.say_at_once("fashion_jax: error: stopped by SIGTERM before the export was in place; "
                        "--output is as it was: run the export again")  # (Never sys.stderr's
    # own write, which the handler may have interrupted: a RuntimeError, no exit.)
    os._exit(128 + signal.SIGTERM)  # pylint: disable=protected-access

  try:
    previous = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # Not the main thread (a library caller's): the default stays.
    previous = None
  try:
    yield stage
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    if os.path.isdir(stage.folder):
      shutil.rmtree(stage.folder, ignore_errors=True)
    if stage.stopped:  # Held over the move: now as it would have been before the export.
      os.kill(os.getpid(), signal.SIGTERM)


def remove_stale(folder: str, prefix: str) -> None:
  """Removes this user's staging folders (`prefix`...) in `folder` left by exports (or
  evaluations) that were killed (SIGKILL, a crash) and unchanged for STALE_S: they had stayed
  hidden beside --output (in --output_dir)."""
  with contextlib.suppress(OSError):
    for name in os.listdir(folder):
      entry = os.path.join(folder, name)
      info = os.lstat(entry)
      if (name.startswith(prefix) and info.st_uid == os.getuid() and os.path.isdir(entry) and
          not os.path.islink(entry) and time.time() - info.st_mtime > STALE_S):
        shutil.rmtree(entry, ignore_errors=True)


def move_into_place(staging: str, path: str) -> None:
  """Replaces `path` by `staging` (same parent), keeping the old export until the new one is in.

  A gs:// `path` is uploaded beside itself first, then swapped in (storage.replace_folder)."""
  if storage.is_url(path):
    try:
      storage.replace_folder(staging, path)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the upload: network, permissions)
      text = str(e).splitlines()[0] if str(e) else ""
      raise UserError(f"could not upload the export to {path} ({type(e).__name__}: {text}); it "
                      "is unchanged: check the bucket and your credentials, then re-run") from e
    return
  try:
    if os.path.dirname(staging) == path:
      _swap_contents(staging, path)
      return
    old, emptied = None, False
    if os.path.isdir(path):
      if os.listdir(path):
        old = _aside(path, os.getpid())
        os.rename(path, old)
      else:
        os.rmdir(path)
        emptied = True
    try:
      os.rename(staging, path)
    except OSError as e:
      try:  # Put back what was there: the previous export, or the empty folder.
        if old:
          os.rename(old, path)
        elif emptied:
          os.mkdir(path)
      except OSError as again:
        raise _not_put_back(path, e, again, old) from e
      raise
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    raise UserError(f"could not move the export into {path} ({e.strerror or e}); what was there "
                    "is unchanged: pass an --output you can write to") from e
  _sweep_old(path)


def _aside(path: str, pid: int | str) -> str:
  """Where an export sets the previous one at `path` aside: a hidden name of fashion_jax's own
  beside it (`path.old-PID` was one a user's own backup could have: the sweep removed it), no
  longer than its staging folder's (a name that fits that must fit this)."""
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.fj-old-{pid}")


def _sweep_old(path: str) -> None:
  """Removes the folders an earlier export set aside (`_aside`) and left (killed between its two
  renames, or while removing the previous export): exports (the metadata file), this user's, PID
  a process number (not past pid_max) of none running, set aside over a minute ago (another
  export's is there for microseconds). Once the new export is in place."""
  parent = os.path.dirname(path) or "."
  prefix = os.path.basename(_aside(path, ""))
  try:
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
      pid_max = int(f.read())
  except (OSError, ValueError):
    pid_max = 4_194_304  # Linux's largest.
  with contextlib.suppress(OSError):
    for name in os.listdir(parent):
      pid = name[len(prefix):]
      if not (name.startswith(prefix) and pid.isascii() and pid.isdigit()
              and 0 < int(pid) <= pid_max):
        continue
      try:
        os.kill(int(pid), 0)
        continue  # Its process is still there (or another with its number): left alone.
      except ProcessLookupError:
        pass
      except (PermissionError, OverflowError):
        continue
      leftover = os.path.join(parent, name)
      info = os.lstat(leftover)  # (Renamed aside: its ctime is when.)
      if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
          and time.time() - info.st_ctime > 60
          and os.path.isfile(os.path.join(leftover, METADATA_NAME))):
        shutil.rmtree(leftover, ignore_errors=True)


def _not_put_back(path: str, e: OSError, again: OSError, old: str | None) -> UserError:
  """A move into `path` failed (`e`), and so did putting back what was there (`again`)."""
  return UserError(f"could not move the export into {path} ({e.strerror or e}), nor put back "
                   f"what was there ({again.strerror or again})" +
                   (f": the previous export is in {old}" if old else ""))


def _swap_contents(staging: str, path: str) -> None:
  """Replaces what `path` holds by what `staging` (inside it) holds: the old entries into a
  folder beside `staging`, the new ones out of it, and back if a move fails."""
  kept = _kept(path)
  old = tempfile.mkdtemp(prefix=_INSIDE[1], dir=path)
  previous = [n for n in os.listdir(path) if not n.startswith(kept)]
  moved_out, moved_in = [], []
  try:
    for name in previous:
      os.rename(os.path.join(path, name), os.path.join(old, name))
      moved_out.append(name)
    for name in os.listdir(staging):
      os.rename(os.path.join(staging, name), os.path.join(path, name))
      moved_in.append(name)
  except OSError as e:
    try:
      for name in moved_in:
        os.rename(os.path.join(path, name), os.path.join(staging, name))
      for name in moved_out:
        os.rename(os.path.join(old, name), os.path.join(path, name))
      os.rmdir(old)
    except OSError as again:
      raise _not_put_back(path, e, again, old) from e
    raise
  shutil.rmtree(old, ignore_errors=True)
  os.rmdir(staging)
  remove_stale(path, _INSIDE[1])  # What an export killed while swapping left, once this is in.
