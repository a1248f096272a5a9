"""Reader for EESM17 (Ear-EEG Sleep Monitoring 2017) in its BIDS layout, OpenNeuro ds004348.

Layout, per subject::

    ROOT/sub-001/ses-001/eeg/sub-001_ses-001_task-sleep_eeg.set       EEGLAB header (+ .fdt samples)
                             sub-001_ses-001_task-sleep_channels.tsv  name, type, units (uV)
                             sub-001_ses-001_task-sleep_eeg.json      SamplingFrequency (200)
                             sub-001_ses-001_task-sleep_events.tsv    "Lights Off" among other events
                             sub-001_ses-001_task-sleep_acq-scoring_events.tsv
                                                                     one row per 30-s epoch, `staging`

How the scoring lines up with the signal (worked out from the nine subjects' sidecars):

* ``events.tsv`` onsets are seconds since the start of the recording (its json says so).
* The scoring onsets always run 0, 30, 60, ... : they are *not* recording times. The dataset README
  says scoring begins at "Lights Off", and the sidecars agree: for every subject the number of scored
  epochs times 30 s matches Lights On minus Lights Off to within one epoch (sub-005: Lights Off 1.71 s,
  Lights On 31201.71 s, exactly 1040 epochs), whereas counting from the recording start would leave
  up to two hours (sub-003: Lights Off at 7087.58 s) of unscored wake at the start and scored epochs
  after Lights On.
* The epoch grid starts at Lights Off truncated to the whole second: scoring epoch ``i`` covers
  recording time ``[floor(lights_off) + 30 i, floor(lights_off) + 30 (i + 1))``. Only this fits
  every night: sub-008 has Lights Off at 1272.58 s and 758 epochs, and its source EDF lasts
  24011.995 s (``sourcedata/sub-008/ses-001/recording_duration.tsv``: the time of the last of
  4,802,400 samples at 200 Hz). From 1272 s the scoring ends exactly at the last sample; from
  1272.58 s its last epoch would run 0.58 s past the end of the recording. (A scoring tool that
  keeps epoch times to the second would produce just this.) Elsewhere the two readings differ by
  less than a second, at most 0.855 s over the nine nights.
* The reader crops the signal to exactly the scored span. What comes before the first epoch and
  after the last has no labels and is not returned.
* ``RecordingDuration`` in ``*_eeg.json`` is ignored (it says 3607.995 s for nights of 8 h); the
  length comes from the signal file, and a signal shorter than the start plus the scoring is an
  error.

Staging codes (``*_acq-scoring_events.json``): 1=Wake 2=REM 3=N1 4=N2 5=N3 6=A 7=Artefact 8=Unscored.
Ours: W=0 N1=1 N2=2 N3=3 REM=4, and -1 for 6, 7, 8. Any other code is an error.

Channels: 10-20 names (C3 C4 O1 O2 F3 F4 A1 A2) are the scalp group; EL*/ER* are the ear group except
ELB1/ERB1, which the dataset notes were never used. Non-EEG extras (Event, LOC, ROC, CHIN12, DIF*, DC*,
OSAT) are dropped by name. Any other name is an error, so nothing is dropped without being named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

from eegkd_jax.data.recording import DataError, Recording

EPOCH_SECONDS = 30.0

# EESM17 staging code -> our label (0=W 1=N1 2=N2 3=N3 4=REM, -1 not scored).
STAGING_CODES: dict[int, int] = {1: 0, 2: 4, 3: 1, 4: 2, 5: 3, 6: -1, 7: -1, 8: -1}

EAR_ELECTRODES: tuple[str, ...] = (
    "ELA", "ELB", "ELE", "ELG", "ELI", "ELK", "ERA", "ERB", "ERE", "ERG", "ERI", "ERK",
)
UNUSED_EAR = frozenset({"ELB1", "ERB1"})  # present in the files, never connected (dataset README)
NON_EEG_NAMES = frozenset({"EVENT", "LOC", "ROC", "CHIN12", "OSAT"})
NON_EEG_PREFIXES = ("DIF", "DC")  # DIF2..4 differential inputs, DC1..4 DC channels

# The 10-20 system with its 10-10 renames and the mastoid / earlobe references.
TEN_TWENTY = frozenset(
    n.upper()
    for n in (
        "Fp1 Fpz Fp2 F7 F3 Fz F4 F8 T3 C3 Cz C4 T4 T5 P3 Pz P4 T6 O1 Oz O2 "
        "T7 T8 P7 P8 A1 A2 M1 M2"
    ).split()
)

# A stretch this long where every kept channel repeats the same value is a gap in the recording
# (amplifier dropout or zero padding), not sleep; see ``check_no_gap``.
GAP_SECONDS = 30.0
_READ_CHUNK = 1 << 19  # samples per chunk when copying out of MNE (bounds the float64 temporary)


@dataclasses.dataclass(frozen=True)
class BidsFiles:
    """Paths of one EESM17 night: the EEGLAB file and its sidecars."""

    subject: str
    eeg_set: pathlib.Path
    channels_tsv: pathlib.Path
    eeg_json: pathlib.Path
    events_tsv: pathlib.Path
    scoring_tsv: pathlib.Path

    @classmethod
    def for_set(cls, eeg_set: str | pathlib.Path) -> "BidsFiles":
        """The sidecars of ``..._task-sleep_eeg.set`` are found by swapping the ``_eeg.set`` suffix."""
        eeg_set = pathlib.Path(eeg_set)
        if not eeg_set.name.endswith("_eeg.set"):
            raise DataError(eeg_set, "not a BIDS EEG file (expected a name ending in _eeg.set)")
        stem = eeg_set.name[: -len("_eeg.set")]
        match = re.match(r"(sub-[A-Za-z0-9]+)_", stem)
        if not match:
            raise DataError(eeg_set, "file name does not start with a BIDS sub-<label> entity")
        d = eeg_set.parent
        return cls(
            subject=match.group(1),
            eeg_set=eeg_set,
            channels_tsv=d / f"{stem}_channels.tsv",
            eeg_json=d / f"{stem}_eeg.json",
            events_tsv=d / f"{stem}_events.tsv",
            scoring_tsv=d / f"{stem}_acq-scoring_events.tsv",
        )


def list_subjects(root: str | pathlib.Path) -> list[str]:
    """Sorted ids (``"sub-001"``, ...) of the subject directories under a BIDS root."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(root, "BIDS root directory does not exist")
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    if not subjects:
        raise DataError(root, "no sub-* directories: not a BIDS root, or empty")
    return subjects


def subject_files(root: str | pathlib.Path, subject: str) -> BidsFiles:
    """Locate the single sleep recording of ``subject`` under ``root``."""
    subject_dir = pathlib.Path(root) / subject
    if not subject_dir.is_dir():
        raise DataError(subject_dir, "subject directory does not exist")
    found = sorted(subject_dir.glob(f"ses-*/eeg/{subject}_ses-*_task-sleep_eeg.set"))
    if not found:
        # Report the path the file would have in the standard layout.
        want = subject_dir / "ses-001" / "eeg" / f"{subject}_ses-001_task-sleep_eeg.set"
        raise DataError(want, "sleep recording (.set) is missing")
    if len(found) > 1:
        names = [str(p) for p in found]
        raise DataError(subject_dir, f"several sleep recordings, expected one: {names}")
    return BidsFiles.for_set(found[0])


def read_tsv(path: pathlib.Path) -> list[dict[str, str]]:
    """Rows of a BIDS .tsv as dicts keyed by the header.

    The EESM17 sidecars end lines with CR CR LF, so any run of CR/LF counts as one line break and
    blank lines are skipped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(path, "file is missing")
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    if not lines:
        raise DataError(path, "file is empty")
    header = [h.strip() for h in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split("\t")]
        if len(cells) != len(header):
            raise DataError(path, f"line {number} has {len(cells)} columns, header has {len(header)}")
        rows.append(dict(zip(header, cells)))
    return rows


def _column(path, rows, name):
    if rows and name not in rows[0]:
        raise DataError(path, f"no column {name!r} (columns: {list(rows[0])})")
    return [r[name] for r in rows]


def read_scoring(path: str | pathlib.Path, epoch_seconds: float = EPOCH_SECONDS) -> np.ndarray:
    """(epochs,) int8 labels from an ``*_acq-scoring_events.tsv``.

    Rows must be consecutive epochs: onsets 0, 30, 60, ... (from Lights Off, see the module doc).
    """
    path = pathlib.Path(path)
    rows = read_tsv(path)
    if not rows:
        raise DataError(path, "scoring has no epochs")
    onsets = _column(path, rows, "onset")
    codes = _column(path, rows, "staging")
    labels = np.empty(len(rows), np.int8)
    for i, (onset, code) in enumerate(zip(onsets, codes)):
        try:
            onset_s, code_i = float(onset), int(code)
        except ValueError:
            raise DataError(path, f"row {i + 1}: onset {onset!r} / staging {code!r} are not numbers")
        if not math.isclose(onset_s, i * epoch_seconds, abs_tol=1e-3):
            raise DataError(
                path,
                f"row {i + 1}: onset {onset_s:g} s, expected {i * epoch_seconds:g} s "
                f"(epochs must be consecutive {epoch_seconds:g}-s epochs)",
            )
        if code_i not in STAGING_CODES:
            raise DataError(
                path, f"row {i + 1}: unknown staging code {code_i} (known: {sorted(STAGING_CODES)})"
            )
        labels[i] = STAGING_CODES[code_i]
    return labels


def read_lights_off(path: str | pathlib.Path) -> float:
    """Seconds from the start of the recording to the single "Lights Off" event."""
    path = pathlib.Path(path)
    rows = read_tsv(path)
    types = _column(path, rows, "trial_type")
    onsets = [r["onset"] for r, t in zip(rows, types) if t.lower() == "lights off"]
    if len(onsets) != 1:
        raise DataError(path, f"expected exactly one 'Lights Off' event, found {len(onsets)}")
    try:
        return float(onsets[0])
    except ValueError:
        raise DataError(path, f"'Lights Off' onset {onsets[0]!r} is not a number")


def _checked_lights_off(files: BidsFiles, scored: bool) -> float | None:
    """Lights Off in seconds; None for an unscored night without an events file."""
    if not scored and not files.events_tsv.is_file():
        return None
    lights_off = read_lights_off(files.events_tsv)
    if lights_off < 0:
        raise DataError(
            files.events_tsv, f"'Lights Off' at {lights_off:g} s, before the recording starts"
        )
    return lights_off


def scoring_start(files: BidsFiles, *, scored: bool = True) -> float:
    """Recording time in whole seconds of epoch 0: "Lights Off" truncated to the second (see the
    module doc). An unscored night (``scored=False``) without an events file starts at 0."""
    lights_off = _checked_lights_off(files, scored)
    return 0.0 if lights_off is None else float(math.floor(lights_off))


def classify_channel(name: str) -> str:
    """``"scalp"``, ``"ear"``, ``"drop"`` (known non-EEG or unused) or ``"unknown"``."""
    upper = name.upper()
    if upper in UNUSED_EAR or upper in NON_EEG_NAMES or upper.startswith(NON_EEG_PREFIXES):
        return "drop"
    if upper in TEN_TWENTY:
        return "scalp"
    if re.fullmatch(r"E[LR][A-Z]", upper):
        return "ear"
    return "unknown"


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise DataError(path, "file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e})")


def read_microvolts(raw, groups, start: int, stop: int, source) -> list[np.ndarray]:
    """Samples ``[start, stop)`` of an MNE raw, one (stop - start, len(g)) float32 microvolt array per
    group ``g`` of channel names, copied out chunk by chunk.

    MNE hands out float64 volts; going through bounded chunks keeps the peak at the float32 result
    plus one chunk, instead of a full float64 copy of the night, and one pass serves all groups.
    """
    names = [n for g in groups for n in g]
    outs = [np.empty((stop - start, len(g)), np.float32) for g in groups]
    if not names:
        return outs
    picks = [raw.ch_names.index(n) for n in names]
    bounds = np.cumsum([0] + [len(g) for g in groups])
    for a in range(start, stop, _READ_CHUNK):
        b = min(a + _READ_CHUNK, stop)
        chunk = raw.get_data(picks=picks, start=a, stop=b, units="uV", verbose="error")
        bad = ~np.isfinite(chunk)
        if bad.any():
            ch, t = np.argwhere(bad)[0]
            raise DataError(
                source,
                f"channel {names[ch]} has NaN or infinite samples (first at "
                f"{(a + t) / raw.info['sfreq']:.3f} s)",
            )
        for out, lo, hi in zip(outs, bounds[:-1], bounds[1:]):
            out[a - start : b - start] = chunk[lo:hi].T
    return outs


def check_no_gap(signal: np.ndarray, names, fs: float, offset_s: float, source) -> None:
    """Raise if every channel of ``signal`` is constant over one stretch of at least GAP_SECONDS."""
    if signal.shape[1] == 0 or signal.shape[0] < 2:
        return
    # True where every channel repeats its previous sample.
    still = np.all(signal[1:] == signal[:-1], axis=1)
    run = _longest_true_run(still)
    if run[1] + 1 >= GAP_SECONDS * fs:
        start_s = offset_s + run[0] / fs
        raise DataError(
            source,
            f"flat stretch: all {len(names)} channels {list(names)} are constant for "
            f"{(run[1] + 1) / fs:.1f} s "
            f"from {start_s:.1f} s (a gap in the recording)",
        )


def _longest_true_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True in a 1-D bool array; (0, 0) if none."""
    if not mask.any():
        return 0, 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i] - starts[i])


def _open_eeglab(files: BidsFiles):
    import mne  # heavy import, only when a file is actually read

    eeg_set = files.eeg_set
    if not eeg_set.is_file():
        raise DataError(eeg_set, "file is missing")
    try:
        raw = mne.io.read_raw_eeglab(eeg_set, preload=False, verbose="error")
    except Exception as e:  # noqa: BLE001 - MNE raises all sorts on malformed files
        raise DataError(eeg_set, f"cannot read EEGLAB file ({type(e).__name__}: {e})")
    # With a separate .fdt, MNE reads samples lazily; check its size now so that a truncated copy
    # fails here with a clear message instead of deep inside a chunked read.
    data_file = pathlib.Path(raw.filenames[0]) if raw.filenames and raw.filenames[0] else eeg_set
    if data_file.suffix.lower() == ".fdt":
        want = 4 * raw.info["nchan"] * raw.n_times
        have = data_file.stat().st_size if data_file.is_file() else None
        if have is None:
            raise DataError(data_file, "sample file (.fdt) named by the .set is missing")
        if have < want:
            raise DataError(
                data_file,
                f"truncated: {have} bytes, but {raw.info['nchan']} channels x {raw.n_times} "
                f"float32 samples need {want}",
            )
    return raw


def read_recording(
    eeg_set: str | pathlib.Path | BidsFiles,
    *,
    rejected: frozenset[str] | tuple[str, ...] = (),
    epoch_seconds: float = EPOCH_SECONDS,
    require_scoring: bool = True,
) -> Recording:
    """Read one EESM17 night (an ``*_task-sleep_eeg.set`` and its sidecars) as a ``Recording``.

    Args:
      eeg_set: the .set path (sidecars are found beside it) or a ``BidsFiles``.
      rejected: electrodes known to be bad (e.g. ``data_cfg.ear_rejections[subject]``); they are
        kept in the arrays and listed in ``Recording.rejected_channels``.
      epoch_seconds: scoring epoch length.
      require_scoring: if False, a night without ``*_acq-scoring_events.tsv`` is read as never
        scored: epochs from ``scoring_start`` to the last whole epoch of the signal, every label
        -1 (for staging a new night). A scoring file that is present is always read and checked.

    Returns:
      A Recording whose sample 0 is the start of the scoring (Lights Off truncated to the whole
      second, see the module doc) and whose length is exactly the scored epochs:
      scalp (epochs * 30 * fs, n_scalp) and ear (epochs * 30 * fs, n_ear) float32 microvolts.
    """
    files = eeg_set if isinstance(eeg_set, BidsFiles) else BidsFiles.for_set(eeg_set)
    source = files.eeg_set
    scored = require_scoring or files.scoring_tsv.is_file()
    labels = read_scoring(files.scoring_tsv, epoch_seconds) if scored else None
    lights_off = _checked_lights_off(files, scored)
    first_epoch_s = 0 if lights_off is None else math.floor(lights_off)
    where = "the recording start" if lights_off is None else f"Lights Off at {lights_off:g} s"
    sidecar = _read_json(files.eeg_json)
    listed = read_tsv(files.channels_tsv)
    listed_names = _column(files.channels_tsv, listed, "name")

    raw = _open_eeglab(files)
    fs = float(raw.info["sfreq"])
    json_fs = sidecar.get("SamplingFrequency")
    if json_fs is None:
        raise DataError(files.eeg_json, "no SamplingFrequency")
    if not math.isclose(fs, float(json_fs), rel_tol=1e-6):
        raise DataError(
            source, f"sampling rate {fs:g} Hz, but {files.eeg_json.name} says {json_fs:g} Hz"
        )

    in_file = list(raw.ch_names)
    missing = [n for n in listed_names if n not in in_file]
    if missing:
        raise DataError(source, f"channels {missing} listed in {files.channels_tsv.name} are missing")
    unlisted = [n for n in in_file if n not in listed_names]
    if unlisted:
        raise DataError(source, f"channels {unlisted} are not listed in {files.channels_tsv.name}")
    unknown = [n for n in in_file if classify_channel(n) == "unknown"]
    if unknown:
        raise DataError(
            source, f"channels {unknown} are neither 10-20 scalp, ear (EL*/ER*) nor a known extra"
        )
    scalp = [n for n in in_file if classify_channel(n) == "scalp"]
    ear = [n for n in in_file if classify_channel(n) == "ear"]
    missing_ear = [n for n in EAR_ELECTRODES if n not in ear]
    if missing_ear:
        raise DataError(source, f"ear electrodes {missing_ear} are missing")
    if not scalp:
        raise DataError(source, "no scalp (10-20) channels")
    units = {r["name"]: r.get("units", "") for r in listed}
    wrong_units = {n: units[n] for n in scalp + ear if units[n] not in ("uV", "µV", "μV")}
    if wrong_units:
        # MNE's EEGLAB reader assumes microvolts; anything else would be silently mis-scaled.
        raise DataError(files.channels_tsv, f"units {wrong_units}: expected uV for EEG channels")

    start = int(round(first_epoch_s * fs))
    epoch_samples = epoch_seconds * fs
    if not math.isclose(epoch_samples, round(epoch_samples)):
        raise DataError(source, f"{epoch_seconds:g}-s epochs are not whole samples at {fs:g} Hz")
    if labels is None:
        labels = np.full(max(0, raw.n_times - start) // int(round(epoch_samples)), -1, np.int8)
        if labels.shape[0] == 0:
            raise DataError(
                source, f"no whole {epoch_seconds:g}-s epoch after {first_epoch_s:g} s in the signal"
            )
    stop = start + labels.shape[0] * int(round(epoch_samples))
    if raw.n_times < stop:
        short = (stop - raw.n_times) / fs
        raise DataError(
            source,
            f"signal is shorter than the scoring: {raw.n_times / fs:.3f} s recorded, but scoring "
            f"from {first_epoch_s:g} s ({where}) for {labels.shape[0]} "
            f"epochs of {epoch_seconds:g} s needs "
            f"{stop / fs:.3f} s ({short:.3f} s missing)",
        )

    scalp_signal, ear_signal = read_microvolts(raw, [scalp, ear], start, stop, source)
    # Scalp and ear groups are checked separately: either group going flat as a whole means its
    # electrodes lost contact together, which no rejection of single electrodes can repair.
    check_no_gap(scalp_signal, scalp, fs, start / fs, source)
    check_no_gap(ear_signal, ear, fs, start / fs, source)
    raw.close()

    rejected = frozenset(rejected)
    return Recording(
        subject=files.subject,
        source=str(source),
        sampling_rate=fs,
        scalp=scalp_signal,
        scalp_channels=tuple(scalp),
        ear=ear_signal,
        ear_channels=tuple(ear),
        labels=labels,
        epoch_seconds=epoch_seconds,
        rejected_channels=rejected,
    )


def read_subject(
    root: str | pathlib.Path, subject: str, *, rejected=(), epoch_seconds: float = EPOCH_SECONDS,
    require_scoring: bool = True,
) -> Recording:
    """``read_recording`` for ``subject`` under the BIDS ``root``."""
    return read_recording(subject_files(root, subject), rejected=rejected,
                          epoch_seconds=epoch_seconds, require_scoring=require_scoring)
