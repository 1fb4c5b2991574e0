"""Command-line plumbing shared by the entry points (main, benchmark, ...)."""

import logging as logging_std
import os
import re
import sys

from absl import flags

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
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    unknown = (re.search(r"'([\w.]+)'", text)
               if isinstance(e, (AttributeError, KeyError, flags.Error)) else None)
    kwarg = next((a.split("=", 1)[0][len("--config.model_kwargs."):] for a in argv
                  if a.startswith("--config.model_kwargs.")), None)
    if kwarg and unknown and kwarg in unknown.group(1):
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
    print(f"fashion_jax: error: {message}\nRun with --helpfull for the flags of {program}.",
          file=sys.stderr)
    sys.exit(2)


class QuietLibraries(logging_std.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; warnings still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname
