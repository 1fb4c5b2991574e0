"""The `python -m fashion_jax.evaluate` command.

Its code and usage: fashion_jax/serving/evaluate.py.
"""

from absl import flags

from fashion_jax import cli
from fashion_jax.support import runtime

with cli.interrupt_is_one_line():  # Ctrl-C while JAX and the rest import: one line too.
  from fashion_jax.serving import evaluate

__doc__ = evaluate.__doc__  # What --help prints.

if __name__ == "__main__":
  evaluate.define_flags()
  flags.adopt_module_key_flags(evaluate)  # --help lists them, not only --helpfull.
  runtime.reexec_with_tuned_malloc("fashion_jax.evaluate")
  cli.run(evaluate.main)
