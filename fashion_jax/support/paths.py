"""Where fashion_jax keeps what it builds or downloads once per machine (no JAX import here)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from fashion_jax.support.errors import UserError

CACHE_ENV = "FASHION_JAX_CACHE_DIR"


def turned_off(name: str) -> bool:
  """Whether the environment variable `name` turns a feature off: 0, false, no or off, in any
  case (FASHION_JAX_NATIVE, FASHION_JAX_COMPILE_CACHE: a user who wrote =false had it on)."""
  return os.environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


class NoCacheFolder(UserError, RuntimeError):
  """No cache folder to name: no home folder (HOME unset for a uid without a passwd entry, as a
  container's arbitrary user) and neither FASHION_JAX_CACHE_DIR nor XDG_CACHE_HOME set."""


def cache_root() -> Path:
  """`$FASHION_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/fashion_jax`, else `~/.cache/fashion_jax`.
  A relative XDG_CACHE_HOME is ignored, as the XDG spec says (it named a folder under whatever
  the current one was). NoCacheFolder where there is none (Path.home()'s RuntimeError had come
  out of a download or a compile cache as a traceback)."""
  root = os.environ.get(CACHE_ENV)
  if root:
    return Path(root)
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  if os.path.isabs(xdg):
    return Path(xdg) / "fashion_jax"
  try:
    return Path.home() / ".cache" / "fashion_jax"
  except RuntimeError as e:
    raise NoCacheFolder(f"no folder to cache in: {e} (HOME is not set); set {CACHE_ENV}=FOLDER, "
                        "a folder of your own") from e


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, waiting: str | None = None):
  """Holds an exclusive lock on `lock_file` (created if needed): one holder at a time among
  the processes of this machine, and of the machines sharing a file system with locks (NFSv4).
  Yields whether the lock is held; `waiting`: logged before waiting for another holder.

  Where the lock file cannot be created (a read-only folder, which nobody can be writing
  either) it runs unlocked; so it does where the lock file is a symbolic link, which is
  never followed (one planted in a shared folder could point at another user's file), or not a
  file (a FIFO planted there had blocked the open for ever).
  Another user's lock file is locked read-only (flock needs no write access); where the file
  system has no locks (ENOLCK: some NFS and FUSE mounts) it runs unlocked, with a warning.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # (A FIFO put there blocked the open.)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
    try:
      fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    except PermissionError:
      fd = os.open(lock_file, os.O_RDONLY | flags)
    f = os.fdopen(fd, "rb")  # pylint: disable=consider-using-with
  except OSError:
    yield False
    return
  if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # Not a lock file: nothing to lock.
    f.close()
    yield False
    return
  with f:  # Released when the file closes.
    try:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if waiting else 0))
      except BlockingIOError:  # (Only with LOCK_NB.)
        logging.info("%s", waiting)
        fcntl.flock(f, fcntl.LOCK_EX)
      held = True
    except OSError as e:
      logging.warning("cannot lock %s (%s): going on without the lock", lock_file, e.strerror or e)
      held = False
    yield held


def private(path: str | os.PathLike, root: str | os.PathLike) -> bool:
  """Whether `path` and every folder from `root` down to it are this user's alone (or root's).

  Owned by the user (or by root, who owns the system anyway: a cache built into a Docker image
  as root, run as another user), no symlink, not writable by group or others: nobody else can
  have put (or can swap in) code or data to load there. Anything else is not used.
  """
  owners, root, current = (os.getuid(), 0), Path(root), Path(path)
  while True:
    try:
      info = os.lstat(current)
    except OSError:
      return False
    if stat.S_ISLNK(info.st_mode) or info.st_uid not in owners or info.st_mode & 0o022:
      return False
    if current == root or current.parent == current:
      return True
    current = current.parent


def make_private_dir(path: str | os.PathLike, root: str | os.PathLike) -> bool:
  """Creates `path` (and the folders above it) as this user's alone (mode 0700, whatever the
  umask); whether it is now writable and `private` down from `root`. Root creates nothing below
  a folder of another user's but a sticky one (/tmp): in a user's cache (sudo keeping HOME) it
  had made folders of its own, which that user's runs could never use again. Another user
  creates folders only where the folder's modes let them (a group's shared folder; OpenShift's
  arbitrary uid in its group-writable home), as before."""
  path = Path(path)
  try:
    missing = [d for d in (path, *path.parents) if not d.exists()]
    existing = os.lstat(next(d for d in (path, *path.parents) if d.exists()))
    if (missing and os.getuid() == 0 and existing.st_uid != 0
        and not existing.st_mode & stat.S_ISVTX):
      return False
    for folder in reversed(missing):
      folder.mkdir(exist_ok=True)
      os.chmod(folder, 0o700)
    return os.access(path, os.W_OK) and private(path, root)
  except OSError:
    return False


def read_only(path: str) -> bool:
  """Whether `path` is on a read-only mount (squashfs, a read-only bind of a 0777 folder): nobody
  can write it, whatever its modes say."""
  return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def put_by_others(path: str) -> str | None:
  """Why another user could have put the entry `path` (absolute, maybe through links) or a
  folder above it where it is, else None: a folder on the way every user may write (anyone can
  rename what is in it away and put theirs), or -- in such a folder with the sticky bit (/tmp) --
  an entry on the way neither this user's nor root's (another user made /tmp/fashion_mnist or
  /tmp/fj first). Folders are named as resolved; one on a read-only mount is passed (nobody can
  write it, whatever its modes say). Each link met on the way to `path` is such an entry too
  (another user's /tmp/hop in mine -> /tmp/hop -> data: they can point it elsewhere). Raises
  OSError where a folder cannot be looked at."""
  for start in (*_links_on_the_way(path), path):
    entry = start
    while (parent := os.path.dirname(entry)) != entry:
      where = os.path.realpath(parent)
      mode = 0 if read_only(where) else os.stat(where).st_mode
      if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return f"the folder {where} is writable by every user"
      if mode & stat.S_IWOTH and (owner := os.lstat(entry).st_uid) not in (os.getuid(), 0):
        return (f"{entry} belongs to another user (uid {owner}) in {where}, a folder every user "
                "may write")
      entry = parent
  return None


def _links_on_the_way(path: str) -> list[str]:
  """The links met resolving the absolute `path` one name at a time, each named where it is (its
  folder resolved), up to a missing name."""
  current, parts, links = "/", [p for p in path.split("/") if p not in ("", ".")], []
  while parts and len(links) <= 40:
    part = parts.pop(0)
    if part == "..":
      current = os.path.dirname(current)
      continue
    candidate = os.path.join(current, part)
    try:
      if not os.path.islink(candidate):
        current = candidate
        continue
      target = os.readlink(candidate)
    except OSError:
      break
    links.append(candidate)
    parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    current = "/" if target.startswith("/") else current
  return links


def file_on_the_way(path: str) -> str | None:
  """The file (no folder) at the local absolute `path`, or at the nearest entry above it that
  exists, where a folder `path` cannot be made for it; else None."""
  above = path
  while not os.path.lexists(above) and os.path.dirname(above) != above:
    above = os.path.dirname(above)
  return above if os.path.exists(above) and not os.path.isdir(above) else None


def others_could_write(folder: str) -> tuple[str, str | None]:
  """(`folder` resolved, why another user could have written the data in it, else None): the
  folder, a file in it, a link on the way to either (each hop) or a folder holding one not this
  user's or root's, or writable by a group other than the user's own or by every user (unless on
  a read-only mount; a folder on the way with the sticky bit, /tmp, passes: nobody else can
  rename what is this user's in it); a link in it leading nowhere (another user could make its
  target). Read the folder resolved: nobody else can change where it leads."""
  top, why = _resolved(os.path.abspath(folder))
  if why or (why := None if os.path.isdir(top) else f"{top} is not a folder"):
    return top, why
  if why := _writable_by_others(top):
    return top, why
  for name in sorted(os.listdir(top)):
    path, why = _resolved(os.path.join(top, name))
    if not why and not os.path.exists(path):
      why = f"{os.path.join(top, name)} is a link to {path}, which does not exist"
    if why or (os.path.isfile(path) and (why := _writable_by_others(path))):
      return top, why
  return top, None


def _resolved(path: str) -> tuple[str, str | None]:
  """The absolute `path` resolved one name at a time, and why another user could change where it
  leads (see others_could_write), else None; a missing name ends it (the caller looks)."""
  current, parts, hops = "/", [p for p in path.split("/") if p not in ("", ".")], 0
  while parts:
    part = parts.pop(0)
    if part == "..":
      current = os.path.dirname(current)
      continue
    if why := _writable_by_others(current, sticky_passes=True):
      return current, why
    candidate = os.path.join(current, part)
    try:
      info = os.lstat(candidate)
    except FileNotFoundError:
      return os.path.join(candidate, *parts), None
    if info.st_uid not in (os.getuid(), 0):
      return candidate, f"{candidate} belongs to another user (uid {info.st_uid})"
    if not stat.S_ISLNK(info.st_mode):
      current = candidate
      continue
    hops, target = hops + 1, os.readlink(candidate)
    if hops > 40:
      return candidate, f"{candidate}: too many links"
    parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    current = "/" if target.startswith("/") else current
  return current, None


def _writable_by_others(path: str, sticky_passes: bool = False) -> str | None:
  info = os.stat(path)
  if info.st_uid not in (os.getuid(), 0):
    return f"{path} belongs to another user (uid {info.st_uid})"
  if sticky_passes and info.st_mode & stat.S_ISVTX or read_only(path):
    return None
  if info.st_mode & stat.S_IWOTH:
    return f"{path} is writable by every user"
  if info.st_mode & stat.S_IWGRP and not _own_group(info.st_gid):
    return f"{path} is writable by the group {_group_name(info.st_gid)}"
  return None


def _own_group(gid: int) -> bool:
  """Whether `gid` is this user's own group (a user private group, Debian's and Ubuntu's default,
  whose umask 002 makes folders 0775): named as the user, the user's primary, no other member."""
  try:
    import grp, pwd  # pylint: disable=import-outside-toplevel,multiple-imports  (POSIX only)
    user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(gid)
  except (ImportError, KeyError):
    return False
  return (gid == user.pw_gid and group.gr_name == user.pw_name
          and set(group.gr_mem) <= {user.pw_name}
          and not any(p.pw_gid == gid and p.pw_uid != user.pw_uid for p in pwd.getpwall()))


def _group_name(gid: int) -> str:
  try:
    import grp  # pylint: disable=import-outside-toplevel  (POSIX only)
    return grp.getgrgid(gid).gr_name
  except (ImportError, KeyError):
    return str(gid)
