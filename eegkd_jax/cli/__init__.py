"""The ``eegkd`` command: one small module per command in this package, found by name.

    eegkd train --config=online_kd --workdir=runs/online_kd
    eegkd eval --workdir=runs/online_kd
    eegkd predict --checkpoint=runs/online_kd night.edf
    eegkd study --workdir=runs/loso --reduced
    eegkd inspect night.edf
    eegkd export --checkpoint=runs/online_kd --format=litert
    eegkd hypnogram-stats --sleep_edf=DIR --eesm17=DIR

``eegkd <command> --help`` lists a command's flags (absl: ``--name=value`` or ``--name value``;
``--config.field=value`` overrides for train and study). ``--config`` takes a config file, or the
name of one shipped inside the package (``--config=online_kd:tiny``), so that an installed
``eegkd`` works from any directory. ``python train.py`` and ``python eval.py`` run the same code as
``eegkd train`` and ``eegkd eval``. Each command module has ``run(args, prog)``; the library it
calls defines no flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, str] = {
    "train": "train a mode (supervised, offline KD, online KD, transfer) from a config",
    "eval": "score a trained run on its held-out subjects: report.json, report.md, figures",
    "predict": "stage a new recording (EDF/EDF+, EESM17 .set) with a trained run",
    "study": "the paper's leave-one-subject-out comparison of all methods, resumable",
    "inspect": "look at a recording or cohort: channels, rates, duration, stages (JSON)",
    "export": "write a trained network as one LiteRT or ONNX file for on-device scoring",
    "hypnogram-stats": "how far simulated (or any) hypnograms are from real scorings (JSON)",
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: eegkd <command> [options]   (eegkd <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def command(name: str):
    """The module of command ``name`` (``eegkd_jax.cli.<name>``, dashes as underscores)."""
    return importlib.import_module(f"eegkd_jax.cli.{name.replace('-', '_')}")


def main(argv: Sequence[str] | None = None) -> int:
    """``eegkd <command> [options]``; returns the exit status, or exits with it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    command(name).run(rest, prog=f"eegkd {name}")
    return 0
