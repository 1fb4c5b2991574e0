"""Command-line plumbing shared by the entry points (main, benchmark, ...)."""

import logging as logging_std
import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS


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
    program = os.path.basename(sys.argv[0]) if sys.argv else "fashion_jax"
    print(f"fashion_jax: error: {message}\nRun with --helpfull for the flags of {program}.",
          file=sys.stderr)
    sys.exit(2)


class QuietLibraries(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname
