"""fashion_jax: fast, resumable JAX/Flax training of Fashion-MNIST classifiers."""

import os as _os
import time as _time

__version__ = "0.1.0"

# An entry point that re-executes itself (see runtime.py) passes its start on.
_PROCESS_START = float(_os.environ.get("FASHION_JAX_PROCESS_START", _time.time()))


def process_start_time() -> float:
  return _PROCESS_START


def seconds_since_start() -> float:
  """Wall seconds since the process started (this package's first import, in practice)."""
  return _time.time() - _PROCESS_START
