"""fashion_jax: fast, resumable JAX/Flax training of Fashion-MNIST classifiers."""

import time as _time

__version__ = "0.1.0"

_PROCESS_START = _time.time()


def seconds_since_start() -> float:
  """Wall seconds since this package was first imported (process start, in practice)."""
  return _time.time() - _PROCESS_START
