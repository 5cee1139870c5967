"""User-facing errors: a bad config, a bad path, a dataset that does not fit.

The CLI turns a ``UserError`` into one line on stderr and exit code 2, never a
traceback. Library code raises it for mistakes a user can fix. A
``NoSpaceError`` (the disk filled up during a save) is not the user's input
but is just as fixable: one line and exit code 1, the previous checkpoint
intact.
"""


class UserError(ValueError):
  """A mistake in the user's input, with a message that names the fix."""


class NoSpaceError(RuntimeError):
  """The disk filled up while writing; the message says what was lost."""
