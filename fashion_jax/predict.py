"""The `python -m fashion_jax.predict` command.

Its code and usage: fashion_jax/serving/predict.py.
"""

from absl import app

from fashion_jax import cli
from fashion_jax.serving import predict

__doc__ = predict.__doc__  # What --help prints.

if __name__ == "__main__":
  predict.define_flags()
  app.run(predict.main, flags_parser=cli.parse_flags)
