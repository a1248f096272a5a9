"""``eegkd inspect PATH``: one JSON object about a recording or a cohort (``data.inspect``);
unreadable input is one line ``error: <file>: <problem>`` and exit status 1."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Sequence

from eegkd_jax import files
from eegkd_jax.cli import common

USAGE = "[flags] PATH   (an EDF/EDF+ or EESM17 .set file, a BIDS subject or root, an EDF cohort)"
SUMMARY = "inspect: look at a recording or cohort: channels, rates, duration, stages (JSON)"


@functools.cache
def define_flags():
    from absl import flags

    flags.DEFINE_string("hypnogram", "auto",
                        'EDF only: "auto" (the *-Hypnogram.edf paired with a *-PSG.edf), '
                        '"none", or the hypnogram file.')
    flags.DEFINE_integer("indent", None, "Pretty-print the JSON with this indent.")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from eegkd_jax.data import inspect
    from eegkd_jax.data.recording import DataError

    flag_values = define_flags()
    common.warnings_only()
    path = argv[1]
    hypnogram = {"auto": "auto", "none": None}.get(flag_values.hypnogram.lower(),
                                                   flag_values.hypnogram)
    import mne

    mne.set_log_level("ERROR")  # MNE logs to stdout, which must hold only our JSON
    # The readers' warnings (a cohort's nights) as inspect FILE prints its own: "warning: ...".
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("warning: %(message)s"))
    to_stderr.setLevel(logging.WARNING)
    absl_logger = logging.getLogger("absl")
    propagate, absl_logger.propagate = absl_logger.propagate, False
    absl_logger.addHandler(to_stderr)
    try:
        summary = inspect.inspect_path(path, hypnogram=hypnogram)
    except DataError as e:
        common.fail(str(e))
    except (OSError, ValueError) as e:  # anything a reader did not wrap still names the path
        common.fail(f"{path}: {type(e).__name__}: {e}")
    finally:  # main may run inside another program (the tests): leave its logging be
        absl_logger.removeHandler(to_stderr)
        absl_logger.propagate = propagate
    for warning in summary.get("warnings", ()):  # on the screen too, not only in the JSON
        print(f"warning: {summary['path']}: {warning}", file=sys.stderr)
    try:
        text = json.dumps(summary, indent=flag_values.indent, default=files.json_default)
        print(text, flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")


def run(args: Sequence[str], prog: str = "eegkd inspect") -> None:
    common.run_absl(prog, args, define_flags, main, usage=USAGE, summary=SUMMARY,
                    positional="path")
