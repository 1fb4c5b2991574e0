"""The `python -m fashion_jax.benchmark` command.

Its code and usage: fashion_jax/benchmarking/benchmark.py.
"""

from fashion_jax.support import errors
from fashion_jax.support import runtime

if __name__ == "__main__":  # First: Ctrl-C at any point ends it with one line, exit 130, at once.
  # Nothing is saved before the end (one atomic write of --output). As a KeyboardInterrupt it met
  # JAX's import (swallowed: the benchmark ran on to exit 0, or an ImportError, exit 1) and an XLA
  # compile (a segfault at exit, -11). The --loop's training holds Ctrl-C while it runs.
  runtime.end_at_once_on_interrupt(errors.INTERRUPTED, errors.EXIT_INTERRUPTED)

# pylint: disable=wrong-import-position
from absl import flags

from fashion_jax import cli

with cli.interrupt_is_one_line():  # Imported elsewhere (tests): Ctrl-C while JAX imports, one line.
  from fashion_jax.benchmarking import benchmark

__doc__ = benchmark.__doc__  # What --help prints.

if __name__ == "__main__":
  benchmark.define_flags()
  flags.adopt_module_key_flags(benchmark)  # --help lists them, not only --helpfull.
  runtime.reexec_with_tuned_malloc("fashion_jax.benchmark", hold_interrupt=True)
  cli.run(benchmark.main)
