"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a wrong path, an unknown task, a model
type without an adapter, a corrupt data file). The CLI prints its message on one line and exits
with code 2; no traceback. The message must name the fix. A :class:`CheckFailed` is an artifact
that failed a check before it was written (nothing is left behind): one line, exit code 1.
"""


class UserError(Exception):
    """An error caused by the user's input; its message says how to fix it."""


class CheckFailed(Exception):
    """A check on an artifact failed before it was written: the CLI prints one line and exits 1."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (its class name when empty), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
