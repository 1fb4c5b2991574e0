"""The `python -m fashion_jax.benchmark` command.

Its code and usage: fashion_jax/benchmarking/benchmark.py.
"""

from absl import flags

from fashion_jax import cli
from fashion_jax.support import runtime

with cli.interrupt_is_one_line():  # Ctrl-C while JAX and the rest import: one line too.
  from fashion_jax.benchmarking import benchmark

__doc__ = benchmark.__doc__  # What --help prints.

if __name__ == "__main__":
  benchmark.define_flags()
  flags.adopt_module_key_flags(benchmark)  # --help lists them, not only --helpfull.
  runtime.reexec_with_tuned_malloc("fashion_jax.benchmark")
  cli.run(benchmark.main)
