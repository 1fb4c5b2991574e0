"""The one exception type for mistakes a user can fix (bad config, data, workdir...)."""

import importlib.util


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C ended.
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output left (`predict ... | head`).
INTERRUPTED = ("interrupted before it finished; what it had saved stays (a training run resumes "
               "from its latest checkpoint when re-run)")


class UserError(Exception):
  """A problem with the user's input. The message names it and says what to do.

  Entry points print it as one line and exit non-zero, without a traceback.
  """


def available(module: str) -> bool:
  """Whether `module` can be imported (without importing it)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # A module blocked in sys.modules (None), or broken.
    return False


def require(module: str, package: str, extra: str, what: str) -> None:
  """A UserError naming the extra to install if `module` (of `package`) is not importable."""
  if not available(module):
    raise UserError(f"{what} needs {package}, which is not installed here; install it with "
                    f"pip install 'fashion_jax[{extra}]' (or pip install {package})")
