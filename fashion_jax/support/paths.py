"""Where fashion_jax keeps what it builds or downloads once per machine (no JAX import here)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

CACHE_ENV = "FASHION_JAX_CACHE_DIR"


def cache_root() -> Path:
  """`$FASHION_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/fashion_jax`, else `~/.cache/fashion_jax`."""
  root = os.environ.get(CACHE_ENV)
  if not root:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion_jax"
  return Path(root)


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike):
  """Holds an exclusive lock on `lock_file` (created if needed): one holder at a time among
  the processes of this machine, and of the machines sharing a file system with locks (NFSv4).

  Where the lock file cannot be created (a read-only folder, which nobody can be writing
  either) it runs unlocked.
  """
  try:
    os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
    f = open(lock_file, "a")  # pylint: disable=consider-using-with
  except OSError:
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)  # Released when the file closes.
    yield
