"""Look at a recording or a cohort before training on it.

    python -m eegkd_jax.data.inspect PATH

PATH may be an EESM17 ``*_eeg.set`` file, a BIDS subject directory (``sub-XXX``), a BIDS root, an
``*-PSG.edf`` (paired with its hypnogram in the same directory), an ``*-Hypnogram.edf`` alone, or a
directory of Sleep-EDF pairs. Prints one JSON object: format, subjects, sampling rate, channel names,
duration, and epochs per stage (totals, and per recording). Duration is that of the signal the
reader returns: for EESM17 the scored span from Lights Off, for EDF from the first scored epoch to
the end of the file. Every recording is read in full through
the same readers training uses, one at a time, so a file that inspects cleanly also loads cleanly.

Unreadable input: one line ``error: <file>: <problem>`` on stderr and exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator

from eegkd_jax.data import bids, edf
from eegkd_jax.data.recording import STAGES, DataError, Recording


def _stage_counts(labels) -> dict[str, int]:
    counts = {name: int((labels == i).sum()) for i, name in enumerate(STAGES)}
    counts["unscored"] = int((labels == -1).sum())
    return counts


def summarize_recording(recording: Recording) -> dict:
    """The JSON-able facts about one night."""
    return {
        "subject": recording.subject,
        "source": recording.source,
        "sampling_rate": recording.sampling_rate,
        "scalp_channels": list(recording.scalp_channels),
        "ear_channels": list(recording.ear_channels),
        "rejected_channels": sorted(recording.rejected_channels),
        "duration_seconds": round(recording.duration_seconds, 6),
        "epochs": int(recording.labels.shape[0]),
        "epochs_per_stage": recording.stage_counts(),
    }


def _combine(path: pathlib.Path, fmt: str, summaries: Iterable[dict]) -> dict:
    recordings = list(summaries)
    rates = sorted({r["sampling_rate"] for r in recordings})
    totals = dict.fromkeys(list(STAGES) + ["unscored"], 0)
    for r in recordings:
        for k, v in r["epochs_per_stage"].items():
            totals[k] += v
    first = recordings[0]
    same_channels = all(
        r["scalp_channels"] == first["scalp_channels"] and r["ear_channels"] == first["ear_channels"]
        for r in recordings
    )
    return {
        "path": str(path),
        "format": fmt,
        "subjects": [r["subject"] for r in recordings],
        "sampling_rate": rates[0] if len(rates) == 1 else rates,
        # Channel lists per recording stay in "recordings"; the top level has them when all agree.
        "scalp_channels": first["scalp_channels"] if same_channels else None,
        "ear_channels": first["ear_channels"] if same_channels else None,
        "duration_seconds": round(sum(r["duration_seconds"] for r in recordings), 6),
        "epochs": sum(r["epochs"] for r in recordings),
        "epochs_per_stage": totals,
        "recordings": recordings,
    }


def _each(read, subjects) -> Iterator[dict]:
    # One night in memory at a time: only its summary outlives the loop.
    for subject in subjects:
        yield summarize_recording(read(subject))


def _hypnogram_only(path: pathlib.Path) -> dict:
    hyp = edf.read_hypnogram(path)
    epochs = int(hyp.labels.shape[0])
    return {
        "path": str(path),
        "format": "edf-hypnogram",
        "subjects": [path.name.removesuffix(edf.HYPNOGRAM_SUFFIX)],
        "sampling_rate": None,
        "scalp_channels": [],
        "ear_channels": [],
        "duration_seconds": epochs * edf.EPOCH_SECONDS,
        "first_epoch_onset_seconds": hyp.first_onset,
        "epochs": epochs,
        "epochs_per_stage": _stage_counts(hyp.labels),
        "recordings": [],
    }


def inspect_path(path: str | pathlib.Path) -> dict:
    """Summary of a recording file or a cohort directory (see module docstring).

    Raises DataError naming the file and the problem if anything is unreadable.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_file():
        name = path.name
        if name.endswith(".set"):
            return _combine(path, "eesm17-bids", [summarize_recording(bids.read_recording(path))])
        if name.endswith(edf.HYPNOGRAM_SUFFIX):
            return _hypnogram_only(path)
        if name.endswith(edf.PSG_SUFFIX):
            subject = name[: -len(edf.PSG_SUFFIX)]
            return _combine(path, "edf", [summarize_recording(edf.read_subject(path.parent, subject))])
        raise DataError(
            path, "not a recording this project reads (*_eeg.set, *-PSG.edf, *-Hypnogram.edf)"
        )
    if path.name.startswith("sub-") and any(path.glob("ses-*")):
        recordings = _each(lambda s: bids.read_subject(path.parent, s), [path.name])
        return _combine(path, "eesm17-bids", recordings)
    if any(p.is_dir() and p.name.startswith("sub-") for p in path.iterdir()):
        recordings = _each(lambda s: bids.read_subject(path, s), bids.list_subjects(path))
        return _combine(path, "eesm17-bids", recordings)
    if any(p.name.endswith(edf.PSG_SUFFIX) for p in path.iterdir()):
        recordings = _each(lambda s: edf.read_subject(path, s), edf.list_subjects(path))
        return _combine(path, "edf", recordings)
    raise DataError(
        path, "neither a BIDS root, a BIDS subject directory, nor a directory of *-PSG.edf files"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eegkd_jax.data.inspect", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("path", help="a .set / .edf file, a BIDS subject or root, or an EDF directory")
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the JSON")
    args = parser.parse_args(argv)
    import mne

    mne.set_log_level("ERROR")  # MNE logs to stdout, which must hold only our JSON
    try:
        summary = inspect_path(args.path)
    except DataError as e:
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # anything a reader did not wrap still gets one line
        print(f"error: {args.path}: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    try:
        print(json.dumps(summary, indent=args.indent), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
    return 0


if __name__ == "__main__":
    sys.exit(main())
