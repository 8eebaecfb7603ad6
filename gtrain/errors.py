"""The one error type for user mistakes.

Anything a user can fix (a bad recipe key, a missing dataset, a wrong checkpoint)
raises `UserError` with a single line that says what is wrong, where, and how to fix
it. The CLI prints that line and exits with code 2; nothing else prints it.
"""


class UserError(Exception):
    """A mistake the user can fix; its message is shown as-is, without a traceback."""

    exit_code = 2
