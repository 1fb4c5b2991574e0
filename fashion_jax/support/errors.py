"""The one exception type for mistakes a user can fix (bad config, data, workdir...)."""

import importlib.util
import os
import tempfile


class UserError(Exception):
  """A problem with the user's input. The message names it and says what to do.

  Entry points print it as one line and exit non-zero, without a traceback.
  """


def local_path(path: str, flag: str) -> str:
  """`path` made absolute; a URL (gs://, s3://...) is a UserError naming `flag`.

  Cloud workdirs are not supported yet: config.json, metrics.jsonl and the
  event files are written with local file APIs, which would create a local
  folder named "gs:" and train into it. Refused before anything runs.
  """
  if "://" in path:
    scheme = path.split("://", 1)[0]
    raise UserError(f"{flag}={path!r}: {scheme}:// folders are not supported yet (fashion_jax "
                    f"would write into a local folder named '{scheme}:'); pass a local folder, or "
                    "mount the bucket (e.g. gcsfuse) and pass its mount point")
  return os.path.abspath(os.path.expanduser(path))


def ensure_writable_dir(path: str, flag: str) -> str:
  """Creates `path` if needed and proves it is writable; else a UserError naming `flag`."""
  path = local_path(path, flag)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path!r} is a file, not a folder; pass a folder (new or existing)")
  try:
    os.makedirs(path, exist_ok=True)
    # A unique name (pids collide across containers sharing a workdir).
    descriptor, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)
    os.close(descriptor)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{flag} {path!r} is not writable ({e.strerror}); pass a {flag} you can "
                    "write to") from e
  return path


def remove_if_empty(path: str) -> None:
  """Removes the folder `path` if it is empty (another process may have written into it)."""
  try:
    os.rmdir(path)
  except OSError:
    pass


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
