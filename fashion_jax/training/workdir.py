"""What a --workdir must be before a run trains into it: fashion_jax's own, writable, and not
in use by another run. Checked before anything in it changes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat

from absl import logging

from fashion_jax.support import metric_writers
from fashion_jax.support import multihost
from fashion_jax.support import storage
from fashion_jax.support.errors import UserError

LOCK_NAME = ".fashion_jax.lock"
TRUST_ENV = storage.TRUST_ENV  # =1: a workdir another user owns or all may write is used.


def refuse_others(workdir: str) -> None:
  """Refuses a local --workdir (or its checkpoints/) that another user owns or that every user
  may write: training resumes from the checkpoints it finds, so a folder planted in /tmp (the
  README's /tmp/fj) was resumed silently. Refuses a config.json or metrics.jsonl that is no
  regular file (a FIFO blocked the run, beyond the reach of a signal)."""
  if storage.is_url(workdir) or os.environ.get(TRUST_ENV) == "1":  # A bucket's access is its
    return  # IAM policy; a mount may show every folder as another user's or as mode 0777.
  for path in (workdir, os.path.join(workdir, "checkpoints")):
    try:
      info = os.stat(path)
    except FileNotFoundError:
      continue
    if info.st_uid != os.getuid():
      raise UserError(f"{path} belongs to another user (uid {info.st_uid}): a run there would "
                      "resume from checkpoints that user wrote; use a --workdir of your own, or "
                      f"set {TRUST_ENV}=1 if the folder is yours (a mount that shows another "
                      "owner: NFS root_squash, a container's bind mount)")
    if info.st_mode & stat.S_IWOTH:
      raise UserError(f"{path} is writable by every user: anyone could put a checkpoint there "
                      f"that training would resume from; chmod o-w {path}, use another "
                      f"--workdir, or set {TRUST_ENV}=1 if nobody else can reach it (a mount "
                      "that shows every folder as 0777: WSL's /mnt/c, CIFS)")
  for name in ("config.json", "metrics.jsonl"):  # (The lock file is opened without following.)
    path = os.path.join(workdir, name)
    try:
      info = os.lstat(path)
    except FileNotFoundError:
      continue
    if not stat.S_ISREG(info.st_mode):
      what = "a link" if stat.S_ISLNK(info.st_mode) else "a folder or special file"
      raise UserError(f"{path} is not a regular file ({what}); remove it, or use another "
                      "--workdir")


def refuse_foreign_or_unwritable(workdir: str) -> None:
  """Refuses a --workdir whose config.json or metrics.jsonl fashion_jax did not write (training
  there replaced the one and emptied the other), or whose folders or metrics file of an earlier
  run cannot be written (the first save failed after a 5-minute wait, with tracebacks)."""
  refuse_others(workdir)
  path = storage.join(workdir, "config.json")
  if storage.exists(path):
    try:
      ours = "_derived" in json.loads(storage.read_text(path, errors="replace"))
    except (ValueError, TypeError):
      ours = False
    if not ours:
      raise UserError(f"--workdir {workdir} holds a config.json that fashion_jax did not write "
                      "(training would replace it); pass a new folder, or a run's workdir (if it "
                      "is this run's own, cut short by a crash, delete it)")
  if not storage.is_url(workdir):  # A folder of an earlier run, e.g. copied read-only.
    for name, kind in (("checkpoints", os.W_OK | os.X_OK), ("tensorboard", os.W_OK | os.X_OK),
                       ("metrics.jsonl", os.W_OK)):
      path = os.path.join(workdir, name)
      if os.path.exists(path) and not os.access(path, kind):
        raise UserError(f"{path} is not writable; make it writable (chmod -R u+w {path}), or "
                        "pass another --workdir")
  line = metric_writers.foreign_line(workdir)
  if line is not None:
    raise UserError(f"--workdir {workdir} holds a metrics.jsonl with lines fashion_jax did not "
                    f"write (e.g. {line[:60]!r}; training would drop them); pass a new folder, "
                    "or a run's workdir")


@contextlib.contextmanager
def lock(workdir: str, is_lead: bool):
  """One training run at a time in a local --workdir: the lead process holds an flock on
  <workdir>/.fashion_jax.lock (the OS drops it however the process ends, SIGKILL included), and a
  second run into the folder is refused on every process alike. Two runs had both trained,
  each writing checkpoints and metrics lines over the other's. Cloud Storage has no locks; where
  the lock cannot be taken (no flock, a lock file that cannot be opened) the run goes on
  unlocked, with a warning. A lock holds on one machine: a run on another machine sharing the
  folder (NFS, gcsfuse) may not see it."""
  handle, refusal = None, None
  if is_lead and not storage.is_url(workdir):
    path = os.path.join(workdir, LOCK_NAME)
    try:
      # Never through a link (a planted one made the lock truncate the file it points at).
      handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o644), "r+", encoding="utf-8")
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      handle.seek(0)
      handle.truncate()
      handle.write(f"{os.getpid()}\n")
      handle.flush()
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip()
      handle.close()
      handle = None
      refusal = (f"another run{f' (pid {holder})' if holder.isdigit() else ''} is training into "
                 f"--workdir {workdir}; wait for it to end, or use another --workdir")
    except OSError as e:  # Every process still meets below; this one runs unlocked, unless
      if handle is not None:  # the disk (or quota) is full: then every process stops with it.
        with contextlib.suppress(OSError):  # (Its close writes the pid again: full again.)
          handle.close()
        handle = None
      if full := storage.out_of_space(path, e, "free some space (or use another --workdir) "
                                      "and re-run the same command"):
        refusal = str(full)
      else:
        logging.warning("cannot lock %s (%s): a second run into this folder would not be "
                        "noticed", path, e)
  refusals = multihost.gather("workdir_lock", refusal)
  try:
    if refusals:
      raise UserError(refusals[min(refusals)])
    yield
  finally:
    if handle is not None:
      handle.close()
