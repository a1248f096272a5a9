"""Reader for EDF/EDF+ polysomnograms with Sleep-EDF-style hypnograms (EDF+ annotation files).

A hypnogram is a list of annotations (onset, duration, stage) in Rechtschaffen & Kales terms:
"Sleep stage W/1/2/3/4/R", "Sleep stage ?" (not scored) and "Movement time". They are expanded to
30-s epochs: W=0, 1=N1, 2=N2, 3 and 4 merge to N3, R=REM; "?" and movement time become -1. The
epoch grid starts at the first annotation (in Sleep-EDF usually 30 s after the file start, e.g.
ST7132JR). Gaps between annotations that are whole epochs are unscored (-1); overlaps, gaps that are
not whole epochs, or unknown annotation texts are errors.

The hypnogram's onsets are relative to its own start time; the PSG's start time (both from the EDF
headers) places them on the signal. Unscored epochs that run past the end of the signal (Sleep-EDF
hypnograms often end in a long "Sleep stage ?") are cut off; a *scored* epoch past the end of the
signal is an error. A PSG read without a hypnogram (``read_psg(psg, None)``: a night nobody scored)
starts its epoch grid at the first sample and has every label -1.

Channels: EDF+ labels are "<type> <name>"; channels of type EEG ("EEG Fpz-Cz") and bare electrode
names are kept, every other type (EOG, EMG, Resp, Temp, Event marker, ...) is not EEG and is left out.
Kept channels whose name (without "EEG ") is an ear electrode (EL*/ER*) form the ear group, the rest
the scalp group. Sleep-EDF's bipolar channels thus become scalp channels, with no ear channels.

Headers: MNE reads the many slightly non-compliant headers found in the wild (free text in reserved
fields, digital limits written as floats, dates in odd formats); what it cannot read is a DataError.

Cohort layout: a directory of ``*-PSG.edf`` and ``*-Hypnogram.edf``. A PSG ``X-PSG.edf`` pairs with
``X-Hypnogram.edf`` if present, otherwise with the one hypnogram whose name shares all of X except
its last character (Sleep-EDF: SC4001E0-PSG.edf <-> SC4001EC-Hypnogram.edf, ST7132J0 <-> ST7132JR).
The subject id is X (e.g. "SC4001E0").
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib

import numpy as np

from eegkd_jax.data import bids
from eegkd_jax.data.recording import DataError, Recording

EPOCH_SECONDS = 30.0

HYPNOGRAM_STAGES: dict[str, int] = {
    "sleep stage w": 0,
    "sleep stage 1": 1,
    "sleep stage 2": 2,
    "sleep stage 3": 3,
    "sleep stage 4": 3,  # R&K S3 + S4 = AASM N3
    "sleep stage r": 4,
    "sleep stage ?": -1,
    "movement time": -1,
}

PSG_SUFFIX = "-PSG.edf"
HYPNOGRAM_SUFFIX = "-Hypnogram.edf"


@dataclasses.dataclass(frozen=True)
class Hypnogram:
    """Labels per epoch from an annotation file.

    Attributes:
      labels: (epochs,) int8, -1 where not scored.
      first_onset: seconds from the hypnogram's start to the start of epoch 0.
      start: the hypnogram file's start date-time, or None if the header has none.
      source: the file.
    """

    labels: np.ndarray
    first_onset: float
    start: datetime.datetime | None
    source: str


def _open_edf(path: pathlib.Path, include=None):
    import mne  # heavy import, only when a file is actually read

    if not path.is_file():
        raise DataError(path, "file is missing")
    try:
        return mne.io.read_raw_edf(path, include=include, preload=False, verbose="error")
    # MNE raises anything from AssertionError to UnicodeDecodeError on a bad header.
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"cannot read EDF header ({type(e).__name__}: {e})")


def read_hypnogram(path: str | pathlib.Path, epoch_seconds: float = EPOCH_SECONDS) -> Hypnogram:
    """Expand a Sleep-EDF style EDF+ hypnogram into one label per ``epoch_seconds`` epoch."""
    import mne

    path = pathlib.Path(path)
    start = _open_edf(path).info["meas_date"]
    try:
        annotations = mne.read_annotations(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"cannot read annotations ({type(e).__name__}: {e})")
    if len(annotations) == 0:
        raise DataError(path, "no annotations: not a hypnogram")
    order = np.argsort(annotations.onset, kind="stable")
    labels: list[int] = []
    first = float(annotations.onset[order[0]])
    expected = first
    for i in order:
        text = str(annotations.description[i]).strip()
        onset, duration = float(annotations.onset[i]), float(annotations.duration[i])
        stage = HYPNOGRAM_STAGES.get(text.lower())
        if stage is None:
            raise DataError(
                path,
                f"unknown annotation {text!r} at {onset:g} s (known: R&K sleep stages, movement time)",
            )
        epochs = duration / epoch_seconds
        if duration <= 0 or not math.isclose(epochs, round(epochs), abs_tol=1e-6):
            raise DataError(
                path,
                f"{text!r} at {onset:g} s lasts {duration:g} s, not a whole number of "
                f"{epoch_seconds:g}-s epochs",
            )
        gap = onset - expected
        if gap < -1e-6:
            raise DataError(
                path,
                f"{text!r} at {onset:g} s overlaps the previous annotation (which ends at "
                f"{expected:g} s)",
            )
        gap_epochs = gap / epoch_seconds
        if not math.isclose(gap_epochs, round(gap_epochs), abs_tol=1e-6):
            raise DataError(path, f"gap of {gap:g} s before {onset:g} s is not a whole number of epochs")
        labels.extend([-1] * int(round(gap_epochs)))  # not scored: it was never annotated
        labels.extend([stage] * int(round(epochs)))
        expected = onset + duration
    return Hypnogram(np.asarray(labels, np.int8), first, start, str(path))


def classify_edf_channel(name: str) -> str:
    """``"scalp"``, ``"ear"`` or ``"drop"`` for an EDF signal label (see module docstring)."""
    parts = name.strip().split(None, 1)
    if len(parts) == 2 and parts[0].upper() == "EEG":
        bare = parts[1]
    elif len(parts) == 1 and bids.classify_channel(parts[0]) in ("scalp", "ear"):
        bare = parts[0]
    else:
        return "drop"
    return "ear" if bids.classify_channel(bare) == "ear" else "scalp"


def _scoring_start(hyp: Hypnogram, psg_start, psg_path: pathlib.Path) -> float:
    """Seconds from the PSG's first sample to the hypnogram's epoch 0 (both headers' start times)."""
    if (psg_start is None) != (hyp.start is None):
        raise DataError(
            hyp.source,
            "only one of the PSG and hypnogram headers has a start time; cannot align them",
        )
    offset = 0.0 if psg_start is None else (hyp.start - psg_start).total_seconds()
    first = offset + hyp.first_onset
    if first < 0:
        raise DataError(hyp.source, f"scoring starts {-first:g} s before the PSG {psg_path.name}")
    return first


def scoring_start(
    psg_path: str | pathlib.Path,
    hypnogram_path: str | pathlib.Path | None,
    epoch_seconds: float = EPOCH_SECONDS,
) -> float:
    """Seconds from the PSG's first sample to epoch 0 of ``read_psg`` (0 without a hypnogram).

    Reads only the two headers and the annotations; for placing predictions on the recording's
    own clock.
    """
    if hypnogram_path is None:
        return 0.0
    psg_path = pathlib.Path(psg_path)
    hyp = read_hypnogram(hypnogram_path, epoch_seconds)
    raw = _open_edf(psg_path)
    try:
        return _scoring_start(hyp, raw.info["meas_date"], psg_path)
    finally:
        raw.close()


def read_psg(
    psg_path: str | pathlib.Path,
    hypnogram_path: str | pathlib.Path | None,
    *,
    subject: str | None = None,
    rejected=(),
    epoch_seconds: float = EPOCH_SECONDS,
) -> Recording:
    """Read an EDF/EDF+ PSG and its hypnogram as a ``Recording`` whose sample 0 is epoch 0.

    Args:
      psg_path: the signal file.
      hypnogram_path: the EDF+ annotation file with the sleep stages, or None for a recording that
        was never scored: then epoch 0 is the first sample, every whole epoch of the signal is
        kept, and every label is -1 (what a model is asked to stage without anything to compare).
      subject: id for the Recording (default: the PSG name without ``-PSG.edf``).
      rejected: electrodes known to be bad, passed on as ``Recording.rejected_channels``.

    Returns:
      A Recording of the kept channels in microvolts, float32, from the first scored epoch to the
      end of the signal (it may run past the last epoch; ``prepare_night`` trims).
    """
    psg_path = pathlib.Path(psg_path)
    subject = subject or psg_path.name.removesuffix(PSG_SUFFIX).removesuffix(".edf")
    hyp = None
    if hypnogram_path is not None:
        hypnogram_path = pathlib.Path(hypnogram_path)
        hyp = read_hypnogram(hypnogram_path, epoch_seconds)
    raw = _open_edf(psg_path)
    kinds = {n: classify_edf_channel(n) for n in raw.ch_names}
    scalp = [n for n in raw.ch_names if kinds[n] == "scalp"]
    ear = [n for n in raw.ch_names if kinds[n] == "ear"]
    if not scalp and not ear:
        raise DataError(psg_path, f"no EEG channels among {raw.ch_names}")
    if len(scalp) + len(ear) < len(raw.ch_names):
        # MNE gives a file one rate, the highest of its channels; reopening with only the EEG
        # keeps the EEG at its own rate when, say, an ECG is sampled faster. (EEG channels of
        # different rates would still be brought to the highest of them.)
        raw.close()
        raw = _open_edf(psg_path, include=scalp + ear)
    fs = float(raw.info["sfreq"])

    # Seconds from the PSG start to epoch 0.
    first = 0.0 if hyp is None else _scoring_start(hyp, raw.info["meas_date"], psg_path)
    start = int(round(first * fs))
    samples = epoch_seconds * fs
    if not math.isclose(samples, round(samples)):
        raise DataError(psg_path, f"{epoch_seconds:g}-s epochs are not whole samples at {fs:g} Hz")
    samples = int(round(samples))

    if hyp is None:
        # Never scored: every whole epoch of the signal, all unscored.
        labels = np.full(raw.n_times // samples, -1, np.int8)
        if labels.shape[0] == 0:
            raise DataError(psg_path, f"signal is shorter than one {epoch_seconds:g}-s epoch")
    else:
        labels = hyp.labels
    covered = max(0, (raw.n_times - start) // samples)  # epochs that fit in the signal
    if covered < labels.shape[0]:
        beyond = labels[covered:]
        if np.any(beyond >= 0):
            missing = (start + labels.shape[0] * samples - raw.n_times) / fs
            raise DataError(
                psg_path,
                f"signal is shorter than the scoring: {raw.n_times / fs:.3f} s recorded, the "
                f"hypnogram {hypnogram_path.name} scores up to "
                f"{first + labels.shape[0] * epoch_seconds:.3f} s "
                f"({missing:.3f} s missing, {int(np.sum(beyond >= 0))} scored epochs past the end)",
            )
        labels = labels[:covered]  # only unscored epochs ran past the end
    if labels.shape[0] == 0:
        raise DataError(psg_path, "no scored epoch lies within the signal")

    stop = raw.n_times
    scalp_signal, ear_signal = bids.read_microvolts(raw, [scalp, ear], start, stop, psg_path)
    bids.check_no_gap(scalp_signal[: labels.shape[0] * samples], scalp, fs, first, psg_path)
    bids.check_no_gap(ear_signal[: labels.shape[0] * samples], ear, fs, first, psg_path)
    raw.close()
    return Recording(
        subject=subject,
        source=str(psg_path),
        sampling_rate=fs,
        scalp=scalp_signal,
        scalp_channels=tuple(scalp),
        ear=ear_signal,
        ear_channels=tuple(ear),
        labels=labels,
        epoch_seconds=epoch_seconds,
        rejected_channels=frozenset(rejected),
    )


def pair_files(directory: str | pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """{subject: (psg, hypnogram)} for a Sleep-EDF style directory, sorted by subject."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(directory, "EDF directory does not exist")
    psgs = sorted(p for p in directory.iterdir() if p.name.endswith(PSG_SUFFIX))
    hyps = sorted(p for p in directory.iterdir() if p.name.endswith(HYPNOGRAM_SUFFIX))
    if not psgs:
        raise DataError(directory, f"no *{PSG_SUFFIX} files")
    pairs: dict[str, tuple[pathlib.Path, pathlib.Path]] = {}
    used: dict[pathlib.Path, str] = {}
    for psg in psgs:
        stem = psg.name[: -len(PSG_SUFFIX)]
        match = _matching_hypnograms(psg, hyps)
        if len(match) != 1:
            problem = "no hypnogram" if not match else f"several hypnograms {[h.name for h in match]}"
            raise DataError(psg, f"{problem} pairs with it (expected {stem[:-1]}?{HYPNOGRAM_SUFFIX})")
        if match[0] in used:
            raise DataError(match[0], f"pairs with both {used[match[0]]} and {psg.name}")
        used[match[0]] = psg.name
        pairs[stem] = (psg, match[0])
    return pairs


def _matching_hypnograms(psg: pathlib.Path, hyps) -> list[pathlib.Path]:
    """The hypnograms among ``hyps`` that pair with ``psg`` by the rule of the module docstring."""
    stem = psg.name[: -len(PSG_SUFFIX)]
    exact = psg.parent / f"{stem}{HYPNOGRAM_SUFFIX}"
    if exact.is_file():
        return [exact]
    return [h for h in hyps if len(h.name) - len(HYPNOGRAM_SUFFIX) == len(stem)
            and h.name[: len(stem) - 1] == stem[:-1]]


def find_hypnogram(psg_path: str | pathlib.Path) -> pathlib.Path | None:
    """The hypnogram beside one PSG by the pairing rule (module docstring), or None if there is
    none; several candidates are an error. A PSG not named ``*-PSG.edf`` has none."""
    psg_path = pathlib.Path(psg_path)
    if not psg_path.name.endswith(PSG_SUFFIX):
        return None
    hyps = sorted(p for p in psg_path.parent.iterdir() if p.name.endswith(HYPNOGRAM_SUFFIX))
    match = _matching_hypnograms(psg_path, hyps)
    if len(match) > 1:
        raise DataError(psg_path, f"several hypnograms {[h.name for h in match]} pair with it")
    return match[0] if match else None


def list_subjects(directory: str | pathlib.Path) -> list[str]:
    """Sorted subject ids (PSG names without ``-PSG.edf``) of a Sleep-EDF style directory."""
    return sorted(pair_files(directory))


def read_subject(directory: str | pathlib.Path, subject: str, *, rejected=(),
                 epoch_seconds: float = EPOCH_SECONDS) -> Recording:
    """``read_psg`` for ``subject`` in a Sleep-EDF style directory."""
    pairs = pair_files(directory)
    if subject not in pairs:
        missing = pathlib.Path(directory) / f"{subject}{PSG_SUFFIX}"
        raise DataError(missing, f"no such subject (have {sorted(pairs)})")
    psg, hyp = pairs[subject]
    return read_psg(psg, hyp, subject=subject, rejected=rejected, epoch_seconds=epoch_seconds)
