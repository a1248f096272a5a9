"""Mistakes a user can fix, and the one-line report the command-line tools give for them.

A problem with the user's input or environment (a missing workdir, an unknown or misspelt config
field, a bad config variant, a full disk, a workdir in use, a damaged checkpoint) ends a command
with one line on stderr, ``error: <what is wrong>``, and exit status 1. ``--verbose`` prints the
full traceback before that line. Anything else is a bug and keeps its traceback.

    app.run(errors.report_errors(main), flags_parser=errors.parse_flags)
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

VERBOSE_HELP = ("Show the full traceback of an error and every log line (by default: warnings, and "
                "an error in one line).")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem the user can fix; the message says what and where, in one line."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from or during, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> OSError | bool:
    """The OSError saying the disk (or quota) is full somewhere in ``error``'s chain; True when only
    a message says so (tensorstore reports it inside its own error type); else False."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
    return any("No space left on device" in str(e) for e in _chain(error))


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a problem with the input or the environment rather than a bug.

    ValueError counts: the readers (DataError) and the config checks raise it, each with a message
    naming the file or field. OSError counts: a missing or unwritable file, a full disk.
    """
    return bool(isinstance(error, (UserError, ValueError, FloatingPointError, OSError))
                or disk_full(error))


def _flat(text: str) -> str:
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
    return _flat(error)


def verbose(argv: Sequence[str] | None = None) -> bool:
    """--verbose from the parsed flags, or from the raw arguments when parsing failed."""
    from absl import flags

    if argv is not None:
        return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
    return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.verbose)


_in_cli = False  # set by parse_flags: this process is a command, not a test calling main()


def _exit(message: str, show_traceback: bool) -> None:
    if show_traceback:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    if _in_cli and not show_traceback:
        # What the interpreter prints while it shuts down after this (the writer threads of a
        # failed orbax save, never-retrieved asyncio tasks) would bury the line above.
        atexit.register(_silence_stderr)
    raise SystemExit(1)


def _silence_stderr() -> None:
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


# ------------------------------------------------------------------------------ flags and config
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)"')


def _config_field(argv: Sequence[str], key: str) -> str:
    """The ``--config.a.b=...`` argument that names the unknown field ``key``."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and key in name[len("--config."):].split("."):
            return name
    return "--config"


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
    """One line for an error raised while parsing the flags, config file and ``--config.*``
    overrides: the flag, then the root cause (a misspelt field with its suggestion, a bad variant,
    a missing config file, a value that does not parse)."""
    from absl import flags

    messages = [str(e) for e in _chain(error)]
    suggestion = next((m.group(1) for text in messages if (m := _DID_YOU_MEAN.search(text))), None)
    if isinstance(error, (KeyError, AttributeError)):
        key = str(list(_chain(error))[-1]).strip("'\"")
        flag = _config_field(argv, key)
        line = f"{flag}: the config has no field {key!r}"
        return line + (f"; did you mean {suggestion!r}?" if suggestion else "")
    root = list(_chain(error))[-1]
    root_text = (str(root).strip().splitlines() or [type(root).__name__])[-1].strip()
    if isinstance(error, flags.Error):
        head = str(error).split(": ", 1)[0] if str(error).startswith("flag --") else ""
        if head and root is not error:
            return f"{head[len('flag '):]}: {root_text}"
        return _flat(error)
    config = next((a for a in argv if a.startswith("--config=")), None)
    return f"{config}: {_flat(root_text)}" if config else _flat(root_text)


def config_value(holder) -> Any:
    """``holder.value`` of a ``config_flags`` flag. A config file that failed to load is reported
    by config_flags only here, not while parsing: it ends the program in one line."""
    value = holder.value
    try:
        value.to_dict  # a file that failed to load gives a stand-in that raises on any attribute
    except OSError as error:
        exit_on_flag_error(error, sys.argv)
    return value


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: defines ``--verbose``, parses ``argv``, and turns a bad flag or config
    (unknown or misspelt field, bad variant, missing config file) into one line and exit 1."""
    from absl import flags

    global _in_cli
    _in_cli = True
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # config_flags raises KeyError / AttributeError / OSError as well
        exit_on_flag_error(error, argv)


def exit_on_flag_error(error: BaseException, argv: Sequence[str]) -> None:
    """Ends the program with ``flag_error_line`` (``--verbose`` in ``argv``: the traceback first).
    For errors raised while flags are defined: a config file flag with a default reads its
    ``--config.*`` overrides then."""
    _exit(flag_error_line(error, argv), verbose(argv))


def report_errors(main: Callable) -> Callable:
    """Wraps an absl ``main``: a user error ends it with one line (``--verbose``: the traceback
    first) and exit status 1; other errors propagate with their traceback."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as error:
            if not is_user_error(error):
                raise
            _exit(one_line(error), verbose())

    return wrapped
