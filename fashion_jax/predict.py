"""The `python -m fashion_jax.predict` command.

Its code and usage: fashion_jax/serving/predict.py.
"""

from absl import flags

from fashion_jax import cli

with cli.interrupt_is_one_line():  # Ctrl-C while JAX and the rest import: one line too.
  from fashion_jax.serving import predict

__doc__ = predict.__doc__  # What --help prints.

if __name__ == "__main__":
  predict.define_flags()
  flags.adopt_module_key_flags(predict)  # --help lists them, not only --helpfull.
  cli.run(predict.main)
