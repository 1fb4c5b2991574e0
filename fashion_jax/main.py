r"""Trains and evaluates a Fashion-MNIST classifier.

  python -m fashion_jax.main --config=configs/default.py --workdir=/tmp/fj \
      [--config.idx_dir=FOLDER] [--config.KEY=VALUE ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import logging as logging_std
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import fashion_jax  # Records the process start time first.

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line (exit 2)."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    unknown = re.search(r"'(\w+)'", text) if isinstance(e, (AttributeError, KeyError)) else None
    if unknown:
      guess = re.search(r'Did you mean "(\w+)"', text)
      message = (f"unknown config key {unknown.group(1)!r}"
                 + (f"; did you mean {guess.group(1)!r}?" if guess else "")
                 + "; the keys are listed in configs/default.py")
    else:
      message = text.strip()
    print(f"fashion_jax: error: {message}\nUsage: python -m fashion_jax.main "
          "--config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]", file=sys.stderr)
    sys.exit(2)


class _QuietLibraries(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import train  # pylint: disable=g-import-not-at-top
  from fashion_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  logging.info("fashion_jax %s, JAX %s, backend %s, process %d of %d", fashion_jax.__version__,
               jax.__version__, jax.default_backend(), jax.process_index(), jax.process_count())
  logging.info("devices: %s (local %d)", jax.devices(), jax.local_device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    logging.error("%s", e)
    print(f"fashion_jax: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
