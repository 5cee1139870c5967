"""User-facing errors: a bad config, a bad path, a dataset that does not fit.

The CLI turns a ``UserError`` into one line on stderr and exit code 2, never a
traceback. Library code raises it for mistakes a user can fix.
"""


class UserError(ValueError):
  """A mistake in the user's input, with a message that names the fix."""
