"""The one exception type for mistakes a user can fix (bad config, data, workdir...)."""


class UserError(Exception):
  """A problem with the user's input. The message names it and says what to do.

  Entry points print it as one line and exit non-zero, without a traceback.
  """
