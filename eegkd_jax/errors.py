"""Mistakes a user can fix, told apart from bugs; the commands report them in one line
(``eegkd_jax.cli.common``)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem the user can fix; the message says what and where, in one line."""


def chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from or during, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> OSError | bool:
    """The OSError saying the disk (or quota) is full somewhere in ``error``'s chain; True when only
    a message says so (tensorstore reports it inside its own error type); else False."""
    for e in chain(error):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
    return any("No space left on device" in str(e) for e in chain(error))


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a problem with the input or the environment rather than a bug.

    ValueError counts: the readers (DataError) and the config checks raise it, each with a message
    naming the file or field. OSError counts: a missing or unwritable file, a full disk.
    """
    return bool(isinstance(error, (UserError, ValueError, FloatingPointError, OSError))
                or disk_full(error))


def flat(text) -> str:
    return " ".join(str(text).split())


def one_line(error: BaseException) -> str:
    """The message of a user error on one line."""
    full = disk_full(error)
    if full:
        what = "no space left on device"
        if isinstance(full, OSError):
            what = (full.strerror or what)[0].lower() + (full.strerror or what)[1:]
            what = f"{full.filename}: {what}" if full.filename else what
        return f"{what}; free some space and run the command again (a training run resumes " \
               "from its last checkpoint)"
    if isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError)) \
            and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return flat(error)
