"""The `python -m fashion_jax.export` command.

Its code and usage: fashion_jax/serving/export.py.
"""

from absl import flags

from fashion_jax import cli

with cli.interrupt_is_one_line():  # Ctrl-C while JAX and the rest import: one line too.
  from fashion_jax.serving import export

__doc__ = export.__doc__  # What --help prints.

if __name__ == "__main__":
  export.define_flags()
  flags.adopt_module_key_flags(export)  # --help lists them, not only --helpfull.
  cli.run(export.main)
