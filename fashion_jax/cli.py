"""Command-line plumbing shared by the entry points (main, benchmark, ...)."""

import ast
import logging as logging_std
import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS


_MODEL_KWARG = re.compile(r"^--config\.model_kwargs\.(\w+)=(.*)$", re.S)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # A bare word: a string.


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line (exit 2).

  `--config.model_kwargs.KEY=VALUE` may name keys the config file does not
  set (model_kwargs is open-ended: depth/width for "wrn", dropout_rate...);
  the model then checks them when the config is validated.
  """
  model_kwargs = {}
  rest = []
  for arg in argv:
    match = _MODEL_KWARG.match(arg)
    if match:
      model_kwargs[match.group(1)] = _literal(match.group(2))
    else:
      rest.append(arg)
  saved_argv = sys.argv
  if model_kwargs:  # ml_collections also reads the overrides from sys.argv itself.
    sys.argv = [a for a in sys.argv if not _MODEL_KWARG.match(a)]
  try:
    remaining = FLAGS(rest)
    sys.argv = saved_argv
    if model_kwargs and "config" in FLAGS:
      with FLAGS.config.model_kwargs.unlocked():
        FLAGS.config.model_kwargs.update(model_kwargs)
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.argv = saved_argv
    text = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    unknown = re.search(r"'(\w+)'", text) if isinstance(e, (AttributeError, KeyError)) else None
    if unknown:
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
