"""The one exception type for mistakes a user can fix (bad config, data, workdir...)."""

import os


class UserError(Exception):
  """A problem with the user's input. The message names it and says what to do.

  Entry points print it as one line and exit non-zero, without a traceback.
  """


def ensure_writable_dir(path: str, flag: str) -> str:
  """Creates `path` if needed and proves it is writable; else a UserError naming `flag`."""
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{flag} {path!r} is not writable ({e.strerror}); pass a {flag} you can "
                    "write to") from e
  return path
