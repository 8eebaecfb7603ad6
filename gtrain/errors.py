"""The one error type for user mistakes, the helpers its messages are made with, and
`printable`, through which every untrusted string passes on its way to a terminal.

Anything a user can fix (a bad recipe key, a missing dataset, a wrong checkpoint)
raises `UserError` with a single line that says what is wrong, where, and how to fix
it. The CLI prints that line and exits with code 2; nothing else prints it.
"""

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix; its message is shown as-is, without a traceback."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"did you mean A or B?" with the choices spelt closest to `word` (in any case), else
    "valid: ..." with all of them."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(by_lower[c] for c in close) + "?"
    return "valid: " + ", ".join(sorted(by_lower.values()))


def error_line(error: BaseException, *, last: bool = False, with_type: bool = False, limit: int = 200) -> str:
    """An exception's message as one line: its first non-empty line, or with `last` its last
    (a DataLoader worker's error carries the worker's traceback and ends with its message),
    cut to `limit` characters; the exception's type name when it has no message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = (lines[-1] if last else lines[0])[:limit]
    return f"{type(error).__name__}: {line}" if with_type else line


def unreadable_file(error: OSError, kept: str | None = None) -> UserError:
    """An OSError met on a data or output file (unreadable, corrupt, a full disk) as one
    line: the error's last line, which names the file (a DataLoader worker's error ends
    with it), then the fix, then what the failure left intact (`kept`, e.g. "nothing in
    runs/exp1 was damaged"), so that no one deletes a run or a study to recover."""
    message = f"{error_line(error, last=True)}; fix or remove that file"
    return UserError(f"{message}; {kept}" if kept else message)


def printable(text: object) -> str:
    """`text` with every character a terminal would act on or hide shown as its escape:
    control characters (ESC starts a terminal command), format characters (right-to-left
    overrides), line and paragraph separators. For class names, folder names, paths and
    the messages built from them: they come from other people's files and disks.
    Files gtrain writes keep the real strings."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
