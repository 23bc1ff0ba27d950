"""User-facing errors: one clear line, no traceback.

Anything a user can fix (a recipe key, a dataset row, a missing checkpoint, a dead server) raises a
subclass of `UserError`; the CLI prints `error: <message>` and exits with status 2.
"""


class UserError(Exception):
    """A problem the user can fix; its message is shown as one line without a traceback."""


class RecipeError(UserError):
    """A recipe (YAML or command-line override) is invalid."""


class DataError(UserError):
    """A dataset file or row is malformed."""


class RolloutError(UserError):
    """A rollout engine or server failed, timed out, or is unreachable."""
