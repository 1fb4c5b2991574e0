"""Where fashion_jax keeps what it builds or downloads once per machine (no JAX import here)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FASHION_JAX_CACHE_DIR"


def cache_root() -> Path:
  """`$FASHION_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/fashion_jax`, else `~/.cache/fashion_jax`."""
  root = os.environ.get(CACHE_ENV)
  if not root:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fashion_jax"
  return Path(root)
