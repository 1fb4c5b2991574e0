"""Command-line plumbing shared by the entry points (main, benchmark, ...)."""

import logging as logging_std
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line (exit 2).

  `model_kwargs` (open-ended: depth/width for "wrn", dropout_rate...) is set
  whole, as ml_collections parses a dict literal:
  `--config.model_kwargs='{"depth": 16, "width": 4}'`; a key the config file
  already lists can also be set alone (`--config.model_kwargs.depth=16`). The
  model checks the keys when the config is validated.
  """
  try:
    rest = FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    unknown = (re.search(r"'([\w.]+)'", text)
               if isinstance(e, (AttributeError, KeyError, flags.Error)) else None)
    kwarg = next((a.split("=", 1)[0][len("--config.model_kwargs."):] for a in argv
                  if a.startswith("--config.model_kwargs.")), None)
    config_given = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    if (unknown and unknown.group(1).startswith("config.") and not config_given
        and "config" in FLAGS):
      message = (f"--config is missing (needed by --{unknown.group(1)}=...): pass a config "
                 "file, e.g. --config=configs/default.py")
    elif kwarg and unknown and kwarg in unknown.group(1):
      message = (f"config.model_kwargs has no key {kwarg!r} in this config file; set the whole "
                 f"dict instead: --config.model_kwargs='{{\"{kwarg}\": VALUE, ...}}'")
    elif unknown and isinstance(e, (AttributeError, KeyError)):
      guess = re.search(r'Did you mean "(\w+)"', text)
      message = (f"unknown config key {unknown.group(1)!r}"
                 + (f"; did you mean {guess.group(1)!r}?" if guess else "")
                 + "; the keys are listed in fashion_jax/default_config.py")
    else:
      message = text.strip()
    program = os.path.basename(sys.argv[0]) if sys.argv else "fashion_jax"
    fail(f"{message}\nRun with --helpfull for the flags of {program}.")
  if "config" in FLAGS and FLAGS["config"].present:
    try:  # ml_collections defers a config file it could not read to the first attribute read.
      getattr(FLAGS.config, "keys")
    except OSError as e:
      reason = re.search(r"\[Errno \d+\] ([^:\n]+)", str(e))
      path = config_flags.get_config_filename(FLAGS["config"])
      fail(f"--config={path}: cannot read the config file "
           f"({reason.group(1) if reason else str(e).splitlines()[0]}); pass a config file, "
           "e.g. --config=configs/default.py")
  return rest


def fail(message: str, code: int = 2):
  """Prints `fashion_jax: error: MESSAGE` on stderr (once: not also as a log line) and exits."""
  print(f"fashion_jax: error: {message}", file=sys.stderr)
  sys.exit(code)


class QuietLibraries(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname
