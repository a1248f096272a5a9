"""What every command shares: absl flags with one-line errors, help, config lookup, logging.

A problem with the user's input or environment (a missing workdir, an unknown or misspelt config
field, a bad config variant, a full disk, a workdir in use, a damaged checkpoint; see
``eegkd_jax.errors``) ends a command with one line on stderr, ``error: <what is wrong>``, and exit
status 1. ``--verbose`` prints the full traceback before that line. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import atexit
import functools
import logging as std_logging
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from eegkd_jax import errors

VERBOSE_HELP = ("Show the full traceback of an error and every log line (by default: warnings, and "
                "an error in one line).")
HELP_ARGS = frozenset({"-h", "-help", "--help", "--helpshort", "--helpfull", "-?"})
PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def run_absl(prog: str, args: Sequence[str], define: Callable[[], object],
             main: Callable[[list[str]], None], *, usage: str, summary: str = "",
             positional: str | None = None) -> None:
    """Runs the absl ``main`` of a command under the name ``prog``, a user's mistake reported in
    one line; ``main`` gets exactly one argument besides the flags where ``positional`` names it,
    else none. ml_collections' config flags read their ``--config.*`` overrides from sys.argv when
    they are defined, so sys.argv is set first."""
    from absl import app, flags

    def checked(argv: list[str]) -> None:
        if positional is None and len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
        if positional is not None and len(argv) != 2:
            raise app.UsageError(f"give exactly one {positional}")
        main(argv)

    sys.argv = [prog, *args]
    before = set(flags.FLAGS)
    try:
        define()  # a config flag parses its file and overrides already
    except Exception as error:  # noqa: BLE001 - config_flags raises anything the file raises
        exit_on_flag_error(error, sys.argv)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    # The command's flags are its own (absl's help lists the key flags of the module argv[0] names).
    for name in sorted(set(flags.FLAGS) - before | {"verbose"}):
        flags.FLAGS.register_key_flag_for_module(prog, flags.FLAGS[name])
    if help_requested(args):
        print(command_help(prog, usage, summary))
        raise SystemExit(0)
    app.run(report_errors(checked), argv=list(sys.argv), flags_parser=parse_flags)


def help_requested(args: Sequence[str]) -> bool:
    """Whether ``args`` ask for help (before a "--" that ends the options)."""
    args = list(args)
    options = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_ARGS for a in options)


def command_help(prog: str, usage: str, summary: str = "") -> str:
    """A command's help: its usage, what it does, and its own flags (not absl's)."""
    from absl import flags

    lines = [f"usage: {prog} {usage}", ""] + ([summary, ""] if summary else []) + ["flags:"]
    for flag in sorted(flags.FLAGS.get_key_flags_for_module(prog), key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  --{flag.name}: {' '.join(str(flag.help).split())}{default}")
    return "\n".join(lines)


def resolve_config(args: Sequence[str]) -> list[str]:
    """``--config=NAME[:variant]`` -> the packaged ``eegkd_jax/configs/NAME.py`` when NAME is no
    file here but the package ships that config; every other argument as it is."""
    out = []
    for arg in args:
        if arg.startswith("--config="):
            path, colon, variant = arg.removeprefix("--config=").partition(":")
            packaged = PACKAGED_CONFIGS / f"{path.removesuffix('.py')}.py"
            if not os.path.exists(path) and os.sep not in path and packaged.is_file():
                arg = f"--config={packaged}{colon}{variant}"
        out.append(arg)
    return out


def checkpoint_choice(value: str, flag: str) -> str | int:
    """``"best"``, ``"latest"`` or a step number, from the string of ``--<flag>``."""
    from absl import app

    if value in ("best", "latest"):
        return value
    try:
        return int(value)
    except ValueError:
        raise app.UsageError(
            f'--{flag} must be "best", "latest" or a step number, got {value!r}') from None


# --------------------------------------------------------------------------------------------------
# Logging


class _QuietOrbax(std_logging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


class _OnlyOurWarnings(std_logging.Filter):
    """For the screen: warnings and errors, except TFDS's notices that our cohort config is a
    custom one (it always is) and that a cohort not yet built has no dataset_info.json."""

    _NOTICES = ("Using custom data configuration", "has no dataset_info.json")

    def filter(self, record):
        return (record.levelno >= std_logging.WARNING
                and not any(n in record.getMessage() for n in self._NOTICES))


def quiet_orbax() -> None:
    from absl import logging

    logging.get_absl_handler().addFilter(_QuietOrbax())


def warnings_only() -> None:
    """Unless ``--verbose``: absl logs warnings only, so that the libraries' INFO lines (orbax,
    JAX) do not bury a command's answer."""
    from absl import logging

    logging.set_verbosity(logging.INFO if verbose() else logging.WARNING)


def log_to_file(workdir, name: str) -> pathlib.Path | None:
    """Unless ``--verbose``: every log record (the config, our INFO lines, TFDS's and orbax's) goes
    to ``<workdir>/<name>.log`` and the screen keeps the warnings, the progress bars and the
    summary. Returns the log file (None with ``--verbose``)."""
    from absl import logging

    if verbose():
        return None
    path = pathlib.Path(workdir) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = std_logging.FileHandler(path)
    to_file.setFormatter(logging.PythonFormatter())
    std_logging.getLogger().addHandler(to_file)
    logging.get_absl_handler().addFilter(_OnlyOurWarnings())
    return path


def quiet_native_logs(args: Sequence[str]) -> None:
    """Unless ``--verbose`` is among ``args``: TensorFlow's C++ notices off (set before TensorFlow
    is imported)."""
    if not verbose(list(args)):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # TensorFlow only reads data here, so its oneDNN math kernels (and their notice) are unused.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# --------------------------------------------------------------------------------------------------
# Errors in one line


def verbose(argv: Sequence[str] | None = None) -> bool:
    """--verbose from the parsed flags, or from the raw arguments when parsing failed."""
    from absl import flags

    if argv is not None:
        return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
    return "verbose" in flags.FLAGS and flags.FLAGS.is_parsed() and bool(flags.FLAGS.verbose)


_in_cli = False  # set by parse_flags: this process is a command, not a test calling main()


def fail(message: str, show_traceback: bool | None = None) -> None:
    """Ends the command: ``error: <message>`` on stderr, exit status 1 (the traceback first with
    ``--verbose``)."""
    show_traceback = verbose() if show_traceback is None else show_traceback
    if show_traceback:
        traceback.print_exc()
    print(f"error: {message}".replace("\n", " "), file=sys.stderr, flush=True)
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

    chain = list(errors.chain(error))
    suggestion = next((m.group(1) for e in chain if (m := _DID_YOU_MEAN.search(str(e)))), None)
    if isinstance(error, (KeyError, AttributeError)):
        key = str(chain[-1]).strip("'\"")
        line = f"{_config_field(argv, key)}: the config has no field {key!r}"
        return line + (f"; did you mean {suggestion!r}?" if suggestion else "")
    root = chain[-1]
    root_text = (str(root).strip().splitlines() or [type(root).__name__])[-1].strip()
    if isinstance(error, flags.Error):
        head = str(error).split(": ", 1)[0] if str(error).startswith("flag --") else ""
        if head and root is not error:
            return f"{head[len('flag '):]}: {root_text}"
        return errors.flat(error)
    config = next((a for a in argv if a.startswith("--config=")), None)
    return f"{config}: {errors.flat(root_text)}" if config else errors.flat(root_text)


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
    fail(flag_error_line(error, argv), verbose(argv))


def report_errors(main: Callable) -> Callable:
    """Wraps an absl ``main``: a user error ends it with one line (``--verbose``: the traceback
    first) and exit status 1; other errors propagate with their traceback."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as error:
            if not errors.is_user_error(error):
                raise
            fail(errors.one_line(error))

    return wrapped
