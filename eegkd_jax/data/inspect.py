"""Look at a recording or a cohort before training on it or staging it.

    eegkd inspect night.edf                      # any EDF/EDF+ file, scored or not
    eegkd inspect night.edf --hypnogram scoring.edf
    eegkd inspect sub-003_ses-001_task-sleep_eeg.set
    eegkd inspect /data/eesm17                   # a BIDS root, a sub-XXX directory or an EDF cohort

Prints one JSON object.

A file: its channels with their kinds (``montage.parse_label``: scalp / ear EEG with electrode and
reference, EEG of unknown placement, EOG, EMG, ECG, other), sampling rates, duration and start
time, and the EEG channels a model would read (``scalp_channels``, ``ear_channels``). With scoring,
the stages per 30-s epoch: for an EDF file, the hypnogram named by ``--hypnogram`` or the
Sleep-EDF hypnogram paired with a ``*-PSG.edf`` by name; for an EESM17 ``*_eeg.set``, the scoring
file beside it. Only that file (and its hypnogram or sidecars) is opened: never the other
recordings in its folder. An EDF file is read through its header (checked as the reader checks it:
truncation, record counts, duplicate labels, start time, the EEG signals' rates and limits), not
sample by sample. ``assumed`` lists what nothing in the file confirms (a plain EDF's record
duration, from which its rates and length follow); ``warnings`` (also printed on stderr) the EEG
rates outside what sleep EEG is recorded at.

A directory: the cohort as training reads it, every night through the same readers, one at a time
(format, subjects, rate, channels, duration and epochs per stage, totals and per recording). There
the duration is that of the signal the reader returns: for EESM17 the scored span from Lights
Off, for EDF from the first scored epoch to the end of the file.

Unreadable input: one line ``error: <file>: <problem>`` on stderr and exit status 1, no traceback
(``--verbose`` prints it first).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable, Iterator

from eegkd_jax.data import bids, edf, montage
from eegkd_jax.data.recording import STAGES, DataError, Recording

EPOCH_SECONDS = edf.EPOCH_SECONDS


def _stage_counts(labels) -> dict[str, int]:
    counts = {name: int((labels == i).sum()) for i, name in enumerate(STAGES)}
    counts["unscored"] = int((labels == -1).sum())
    return counts


def describe_channel(label: str, **extra) -> dict:
    """{"name", "kind", "electrode", "reference", **extra} of one channel label."""
    parsed = montage.parse_label(label)
    described = {"name": label, "kind": parsed.kind}
    if parsed.electrode is not None:
        described["electrode"] = parsed.electrode
        described["reference"] = parsed.reference or "common"
    described.update(extra)
    return described


def _rate(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 6)


# --------------------------------------------------------------------------------------------------
# One file


def _edf_start(path: pathlib.Path, header: edf.EdfHeader) -> str | None:
    """The start date and time in the file's header (its own clock: EDF has no time zone), as
    ISO 8601, or None if the header has none; read as the reader reads it."""
    raw = edf._open_edf(path, header=header)
    start = raw.info["meas_date"]
    raw.close()
    return None if start is None else start.replace(tzinfo=None).isoformat()


def _edf_variant(path: pathlib.Path) -> str:
    """"edf+" for EDF+ (continuous or not), "edf" for plain EDF (the header's reserved field)."""
    with path.open("rb") as f:
        f.seek(192)
        reserved = f.read(44)
    return "edf+" if reserved.startswith((b"EDF+C", b"EDF+D")) else "edf"


def _scoring(psg: pathlib.Path, hypnogram: pathlib.Path, header: edf.EdfHeader) -> dict:
    """Stages of ``hypnogram`` placed on the PSG's clock; the epochs that fall past the end of
    the signal are counted apart (the reader drops unscored ones and refuses scored ones). A
    signal far longer than its scoring is refused, as the reader refuses it."""
    hyp = edf.read_hypnogram(hypnogram)
    first = edf.scoring_start(psg, hypnogram)
    labels = hyp.labels
    edf.check_length_against_scoring(psg, header, hypnogram,
                                     first + labels.shape[0] * EPOCH_SECONDS)
    duration = header.records * header.record_seconds
    within = max(0, min(labels.shape[0], math.floor((duration - first) / EPOCH_SECONDS + 1e-9)))
    past = labels[within:]
    summary = {
        "scored": True,
        "hypnogram": str(hypnogram),
        "first_epoch_onset_seconds": round(first, 6),
        "epochs": int(within),
        "epochs_per_stage": _stage_counts(labels[:within]),
    }
    if past.size:
        summary["epochs_past_end_of_signal"] = {"scored": int((past >= 0).sum()),
                                                "unscored": int((past < 0).sum())}
    return summary


def inspect_edf(path: pathlib.Path, hypnogram: str | pathlib.Path | None = "auto") -> dict:
    """Summary of one EDF/EDF+ file, whatever its name and channels (see the module docstring).

    Args:
      path: the file.
      hypnogram: "auto" (the Sleep-EDF hypnogram paired with a ``*-PSG.edf`` by name, if any),
        None (read as unscored) or the hypnogram's path.
    """
    header = edf.read_header(path)
    if all(label == edf.EDF_ANNOTATIONS for label in header.labels):
        return _hypnogram_only(path)
    duration = header.records * header.record_seconds
    channels, scalp, ear = [], [], []
    for i, label in enumerate(header.labels):
        if label == edf.EDF_ANNOTATIONS:
            continue
        rate = header.samples_per_record[i] / header.record_seconds
        channels.append(describe_channel(label, sampling_rate=_rate(rate),
                                         unit=header.signal_fields["physical dimension"][i]))
        group = montage.eeg_group(label)
        if group == "scalp":
            scalp.append(label)
        elif group == "ear":
            ear.append(label)
    # The reader's checks of the EEG signals (rates, limits), so that inspect passes no file
    # that training or predict would refuse.
    warnings = edf.check_eeg_signals(path, header, scalp + ear)
    assumed = []
    if not edf.record_duration_confirmed(header):
        assumed.append(f"the header's record duration of {header.record_seconds:g} s: a plain EDF "
                       "file has no time-keeping annotations to confirm it, and the sampling rates "
                       "and the duration follow from it")
    eeg_rates = sorted({c["sampling_rate"] for c in channels if c["name"] in scalp + ear})
    if isinstance(hypnogram, str) and hypnogram == "auto":
        hypnogram = edf.find_hypnogram(path)
    summary = {
        "path": str(path),
        "format": _edf_variant(path),
        "subjects": [path.name.removesuffix(edf.PSG_SUFFIX).removesuffix(".edf")],
        "start_time": _edf_start(path, header),
        "assumed": assumed,
        "warnings": warnings,
        "duration_seconds": round(duration, 6),
        "sampling_rate": eeg_rates[0] if len(eeg_rates) == 1 else (eeg_rates or None),
        "channels": channels,
        "scalp_channels": scalp,
        "ear_channels": ear,
    }
    if hypnogram is None:
        summary.update({"scored": False, "hypnogram": None,
                        "epochs": int(duration // EPOCH_SECONDS), "epochs_per_stage": None})
        # DREAMS-style files carry their scoring as a signal; say so rather than look unscored.
        scoring = [c["name"] for c in channels if "hypnogram" in c["name"].lower()]
        if scoring:
            summary["scoring_channel"] = scoring[0]
            summary["note"] = (f"the file holds a scoring signal {scoring[0]!r}, which eegkd does "
                               "not read: give the scoring as an EDF+ hypnogram (--hypnogram)")
    else:
        summary.update(_scoring(path, pathlib.Path(hypnogram), header))
    return summary


def inspect_set(path: pathlib.Path) -> dict:
    """Summary of one EESM17 ``*_eeg.set`` with its sidecars, scored or not. The night is read in
    full through the training reader (from Lights Off, to the end of the scoring or signal)."""
    files = bids.BidsFiles.for_set(path)
    recording = bids.read_recording(files, require_scoring=False)
    listed = bids.read_tsv(files.channels_tsv)
    channels = [describe_channel(row["name"], bids_type=row.get("type", ""),
                                 unit=row.get("units", ""),
                                 sampling_rate=_rate(recording.sampling_rate)) for row in listed]
    scored = files.scoring_tsv.is_file()
    summary = _combine(path, "eesm17-bids", [summarize_recording(recording)])
    summary.update({
        "start_time": None,  # the sidecars give times from the recording's start, no date
        "channels": channels,
        "scored": scored,
        "first_epoch_onset_seconds": float(bids.scoring_start(files, scored=scored)),
    })
    if not scored:
        summary["epochs_per_stage"] = None
    return summary


def _hypnogram_only(path: pathlib.Path) -> dict:
    hyp = edf.read_hypnogram(path)
    epochs = int(hyp.labels.shape[0])
    return {
        "path": str(path),
        "format": "edf-hypnogram",
        "subjects": [path.name.removesuffix(edf.HYPNOGRAM_SUFFIX).removesuffix(".edf")],
        "start_time": None if hyp.start is None else hyp.start.replace(tzinfo=None).isoformat(),
        "sampling_rate": None,
        "channels": [],
        "scalp_channels": [],
        "ear_channels": [],
        "duration_seconds": epochs * EPOCH_SECONDS,
        "scored": True,
        "first_epoch_onset_seconds": hyp.first_onset,
        "epochs": epochs,
        "epochs_per_stage": _stage_counts(hyp.labels),
        "recordings": [],
    }


# --------------------------------------------------------------------------------------------------
# A cohort


def summarize_recording(recording: Recording) -> dict:
    """The JSON-able facts about one night as a reader returned it."""
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


def inspect_path(path: str | pathlib.Path, *, hypnogram: str | pathlib.Path | None = "auto"
                 ) -> dict:
    """Summary of a recording file or a cohort directory (see the module docstring).

    Args:
      path: an EDF/EDF+ file, an EESM17 ``*_eeg.set``, a BIDS subject directory or root, or a
        directory of Sleep-EDF style ``*-PSG.edf`` / ``*-Hypnogram.edf`` pairs.
      hypnogram: EDF files only: "auto", None or a path (see ``inspect_edf``).

    Raises:
      DataError naming the file and the problem if anything is unreadable.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if hypnogram not in (None, "auto") and not (path.is_file() and path.suffix.lower() == ".edf"):
        raise DataError(path, "--hypnogram goes with an EDF file")
    if path.is_file():
        if path.suffix.lower() == ".set":
            return inspect_set(path)
        if path.suffix.lower() == ".edf":
            return inspect_edf(path, hypnogram)
        raise DataError(path, "not a recording this project reads (an EDF/EDF+ .edf file or an "
                              "EESM17 *_eeg.set), nor a directory")
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
