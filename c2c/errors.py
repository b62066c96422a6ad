"""The one exception type entry scripts turn into a one-line message and exit code 2."""


class UserInputError(ValueError):
    """Bad input the user can fix: the message names the problem and the fix."""
