"""Reader for EDF/EDF+ polysomnograms with Sleep-EDF-style hypnograms (EDF+ annotation files).

A hypnogram is a list of annotations (onset, duration, stage) in Rechtschaffen & Kales terms:
"Sleep stage W/1/2/3/4/R", "Sleep stage ?" (not scored) and "Movement time". They are expanded to
30-s epochs: W=0, 1=N1, 2=N2, 3 and 4 merge to N3, R=REM; "?" and movement time become -1. The
epoch grid starts at the first annotation (in Sleep-EDF usually 30 s after the file start, e.g.
ST7132JR). Gaps between annotations that are whole epochs are unscored (-1); overlaps, gaps that are
not whole epochs, or unknown annotation texts are errors. The annotations are parsed here
(``read_annotations``), each in full or refused naming its index and text: MNE's reader skips one
it cannot parse without a word.

The hypnogram's onsets are relative to its own start time; the PSG's start time (both from the EDF
headers) places them on the signal. Unscored epochs that run past the end of the signal (Sleep-EDF
hypnograms often end in a long "Sleep stage ?") are cut off; a *scored* epoch past the end of the
signal is an error. A PSG read without a hypnogram (``read_psg(psg, None)``: a night nobody scored)
starts its epoch grid at the first sample and has every label -1.

Channels: EDF+ labels are "<type> <name>"; channels of type EEG ("EEG Fpz-Cz") and bare electrode
names are kept, every other type (EOG, EMG, Resp, Temp, Event marker, ...) is not EEG and is left out.
Kept channels whose name (without "EEG ") is an ear electrode (EL*/ER*) form the ear group, the rest
the scalp group. Sleep-EDF's bipolar channels thus become scalp channels, with no ear channels.

Headers: ``read_header`` parses the fixed header itself before MNE sees the file, and refuses what
MNE would read wrong without a word: a file shorter (truncated) or longer than the records its
header promises (MNE reads the whole records there are), a record duration that is not a positive
number or that the EDF+ time-keeping annotations contradict, record, signal and sample counts that
are not positive whole numbers, duplicate labels (MNE renames them ELA-0, ELA-1), a start time
that is no hh.mm.ss (MNE reads it as midnight). A record count
of -1 ("still recording" in the spec) is counted from the file size. ``read_psg`` further refuses
an EEG rate outside EEG_RATE_RANGE_HZ and a signal more than SIGNAL_PER_SCORING_LIMIT times as
long as its hypnogram covers: the two signs of a wrong record duration in a plain EDF file, which
has no time-keeping annotations. A rate outside SLEEP_EEG_RATE_RANGE_HZ is read with a warning:
without a hypnogram it is the only sign of an edited record duration. ``check_eeg_signals`` holds the checks of the EEG
signals, which ``eegkd inspect`` applies too. Past these checks, MNE reads the many slightly non-compliant
headers found in the wild (free text in reserved fields, digital limits written as floats, dates
in odd formats); what it cannot read is a DataError.

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
import re

import numpy as np
from absl import logging

from eegkd_jax.data import bids, montage
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


EDF_ANNOTATIONS = "EDF Annotations"
MAIN_HEADER_BYTES = 256
SIGNAL_HEADER_BYTES = 256  # per signal
SAMPLE_BYTES = 2  # EDF samples are 16-bit little-endian integers
# The per-signal header fields, in file order: (name as the EDF spec calls it, width in bytes).
# Each field holds one value per signal before the next field starts.
SIGNAL_FIELDS = (
    ("label", 16),
    ("transducer type", 80),
    ("physical dimension", 8),
    ("physical minimum", 8),
    ("physical maximum", 8),
    ("digital minimum", 8),
    ("digital maximum", 8),
    ("prefiltering", 80),
    ("number of samples in each data record", 8),
    ("reserved", 32),
)
# Rates an EEG signal can have at all; outside them the header's record duration or samples per
# record are wrong. Wide on purpose: whether a rate suits a model (> 70 Hz for the 0.3-35 Hz band)
# is for preprocess and predict to say, not the reader.
EEG_RATE_RANGE_HZ = (16.0, 65536.0)
# Rates sleep EEG is recorded at (Sleep-EDF 100 Hz, SHHS 125, EESM17 200, MASS 256, clinical
# systems up to 512). A rate outside is read, with a warning: a plain EDF file has nothing that
# confirms its record duration, and an edited one (30 s -> 1 or 3 s) shows only in its rate.
SLEEP_EEG_RATE_RANGE_HZ = (100.0, 512.0)
# A PSG may run on after its scoring ends (lights on, the recorder left running), but a signal
# more than half again as long as everything its hypnogram covers is more likely read with a wrong
# record duration (twice the true one doubles the signal's length).
SIGNAL_PER_SCORING_LIMIT = 1.5
# How far an EDF+ time-keeping onset may miss its record's start; onsets are decimal text, which
# writers round (often to the millisecond).
ONSET_TOLERANCE_S = 1e-3


@dataclasses.dataclass(frozen=True)
class EdfHeader:
    """The fixed part of an EDF/EDF+ header, checked against itself and the file's size.

    Attributes:
      records: number of data records (counted from the file size where the header says -1).
      record_seconds: duration of a data record; 0 only in a file of annotations alone.
      labels: (signals,) signal labels without their padding.
      samples_per_record: (signals,) samples of each signal in one data record.
      signal_fields: {field name: (signals,) texts without padding} of every per-signal field.
    """

    records: int
    record_seconds: float
    labels: tuple[str, ...]
    samples_per_record: tuple[int, ...]
    signal_fields: dict[str, tuple[str, ...]]

    def signal(self, label: str) -> int:
        """Index of the signal called ``label``."""
        return self.labels.index(label)


def _field(field: str, signal: int | None = None, labels=()) -> str:
    """How an error names a header field, e.g. "header field 'label' of signal 2 ('EEG C3')"."""
    where = f"header field {field!r}"
    if signal is not None:
        where += f" of signal {signal + 1}" + (f" ({labels[signal]!r})" if labels else "")
    return where


def _whole_number(path, text: str, field: str, *, signal=None, labels=(), allow=()) -> int:
    """The positive whole number (or one of ``allow``) in a header field, else a DataError."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (value < 1 and value not in allow):
        also = "".join(f" (or {a})" for a in allow)
        raise DataError(
            path, f"{_field(field, signal, labels)} is {text!r}, not a positive whole number{also}"
        )
    return value


def _decimal(path, text: str, field: str, *, signal=None, labels=(), kind="a number") -> float:
    """The finite number in a header field, else a DataError that says it is not ``kind``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(path, f"{_field(field, signal, labels)} is {text!r}, not {kind}")
    return value


def _header_text(raw: bytes, label: bool = False) -> str:
    """A header field's text as MNE reads it (so that labels match MNE's channel names, and no
    field MNE accepts is refused): without padding; a number ends at its first NUL."""
    if label:
        return raw.strip().decode("latin-1")
    return raw.decode("latin-1").split("\x00")[0].strip()


def read_header(path: str | pathlib.Path) -> EdfHeader:
    """Parse and check the fixed header of an EDF/EDF+ file (256 bytes + 256 per signal).

    Checked, each failure a DataError naming the file and the header field: the number of signals,
    of data records and of samples per record are positive whole numbers (records may be -1, the
    spec's "still recording", and are then counted from the file size); the record duration is a
    positive number (0 only where every signal is "EDF Annotations", as in Sleep-EDF's
    hypnograms); the header length matches the number of signals; no two signals share a label;
    the file holds exactly the records the header promises (a truncated file is refused, not read
    in part); and in an EDF+ file the time-keeping annotation of every record agrees with the
    record duration (no gaps: MNE would join discontinuous records as if they were contiguous).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(path, "file is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        main = f.read(MAIN_HEADER_BYTES)
        if len(main) < MAIN_HEADER_BYTES:
            raise DataError(
                path, f"file is {size} bytes, shorter than the {MAIN_HEADER_BYTES}-byte EDF header"
            )
        signals = _whole_number(path, _header_text(main[252:256]), "number of signals")
        header_bytes = MAIN_HEADER_BYTES + SIGNAL_HEADER_BYTES * signals
        stated = _header_text(main[184:192])
        try:
            stated_ok = int(stated) == header_bytes
        except ValueError:
            stated_ok = False
        if not stated_ok:
            raise DataError(
                path,
                f"{_field('number of bytes in header record')} is {stated!r}, but a header of "
                f"{signals} signals is {MAIN_HEADER_BYTES} + {signals} x {SIGNAL_HEADER_BYTES} = "
                f"{header_bytes} bytes",
            )
        if size < header_bytes:
            raise DataError(
                path, f"file is {size} bytes, it ends inside its {header_bytes}-byte header"
            )
        rest = f.read(header_bytes - MAIN_HEADER_BYTES)

    start_text = _header_text(main[176:184])
    clock = re.fullmatch(r"([0-9]{1,2})\.([0-9]{1,2})\.([0-9]{1,2})", start_text)
    if not clock or int(clock[1]) > 23 or int(clock[2]) > 59 or int(clock[3]) > 59:
        # MNE reads a start time it cannot parse as midnight, which misplaces the scoring.
        raise DataError(path, f"{_field('starttime of recording')} is {start_text!r}, not a time "
                              "of day hh.mm.ss")

    signal_fields: dict[str, tuple[str, ...]] = {}
    at = 0
    for name, width in SIGNAL_FIELDS:
        signal_fields[name] = tuple(
            _header_text(rest[at + i * width: at + (i + 1) * width], label=name == "label")
            for i in range(signals)
        )
        at += width * signals
    labels = signal_fields["label"]
    spr_field = "number of samples in each data record"
    samples = tuple(
        _whole_number(path, t, spr_field, signal=i, labels=labels)
        for i, t in enumerate(signal_fields[spr_field])
    )

    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label == EDF_ANNOTATIONS:  # EDF+ allows several annotation signals
            continue
        key = label.casefold()  # electrode names know no case: C3 is c3
        if key in seen:
            raise DataError(
                path,
                f"{_field('label')} {label!r} is used by signals {seen[key] + 1} and {i + 1}: "
                "duplicate channel labels are ambiguous",
            )
        seen[key] = i

    duration_text = _header_text(main[244:252])
    duration = _decimal(path, duration_text, "duration of a data record", kind="a positive number")
    only_annotations = all(label == EDF_ANNOTATIONS for label in labels)
    if duration < 0 or (duration == 0 and not only_annotations):
        raise DataError(
            path,
            f"{_field('duration of a data record')} is {duration_text!r}, not a positive number"
            + (" (0 is allowed only in a file of annotations alone)" if duration == 0 else ""),
        )

    record_bytes = SAMPLE_BYTES * sum(samples)
    records_text = _header_text(main[236:244])
    records = _whole_number(path, records_text, "number of data records", allow=(-1,))
    data_bytes = size - header_bytes
    if records == -1:  # the spec's "unknown while recording": the file size tells
        records, partial = divmod(data_bytes, record_bytes)
        if partial or records == 0:
            raise DataError(
                path,
                f"{_field('number of data records')} is '-1' (unknown), and the {data_bytes} bytes "
                f"after the header are not a whole number of {record_bytes}-byte records "
                f"({records} records and {partial} bytes): the file ends inside a record",
            )
    elif data_bytes != records * record_bytes:
        whole, partial = divmod(data_bytes, record_bytes)
        promise = (
            f"{_field('number of data records')} is {records_text!r}: {records} records of "
            f"{record_bytes} bytes after a {header_bytes}-byte header make "
            f"{header_bytes + records * record_bytes} bytes, the file is {size}"
        )
        if data_bytes < records * record_bytes:
            raise DataError(
                path,
                f"truncated: {promise} ({whole} whole records"
                + (f" and {partial} bytes" if partial else "")
                + f", {records - whole} records missing)",
            )
        raise DataError(path, f"{promise} ({data_bytes - records * record_bytes} bytes more): "
                              "the record count is wrong or data follows the records")

    header = EdfHeader(records, duration, labels, samples, signal_fields)
    if EDF_ANNOTATIONS in labels and duration > 0:
        discontinuous = main[192:236].startswith(b"EDF+D")
        _check_time_keeping(path, header, header_bytes, duration_text, discontinuous)
    return header


def _check_time_keeping(path, header: EdfHeader, header_bytes: int, duration_text: str,
                        discontinuous: bool) -> None:
    """Check the EDF+ time-keeping annotations (the onset that opens each record's first
    "EDF Annotations" signal) against the record duration: contiguous records, each that long."""
    i = header.signal(EDF_ANNOTATIONS)
    lo = SAMPLE_BYTES * sum(header.samples_per_record[:i])
    hi = lo + SAMPLE_BYTES * header.samples_per_record[i]
    record_bytes = SAMPLE_BYTES * sum(header.samples_per_record)
    data = np.memmap(path, np.uint8, "r", offset=header_bytes, shape=(header.records, record_bytes))
    annotations = np.array(data[:, lo:hi])  # only the first annotation signal of each record
    del data
    onsets = np.empty(header.records)
    for k, row in enumerate(annotations):
        raw = row.tobytes()
        text = raw[: raw.find(b"\x14")].decode("latin-1") if b"\x14" in raw else ""
        try:
            onsets[k] = float(text) if text[:1] in ("+", "-") else math.nan
        except ValueError:
            onsets[k] = math.nan
        if not math.isfinite(onsets[k]):
            raise DataError(
                path,
                f"data record {k + 1} of {header.records}: its 'EDF Annotations' signal does not "
                f"open with a time-keeping onset (EDF+ requires one; found {raw[:24]!r})",
            )
    if header.records < 2:
        return
    steps = np.diff(onsets)
    duration = header.record_seconds
    regular = np.all(np.abs(steps - steps[0]) <= ONSET_TOLERANCE_S)
    # Records that all step by another time than the duration: in EDF+C the duration is wrong
    # (in EDF+D they may be records with gaps between them, reported below).
    if not discontinuous and regular and abs(steps[0] - duration) > ONSET_TOLERANCE_S:
        raise DataError(
            path,
            f"{_field('duration of a data record')} is {duration_text!r}, but the records' EDF+ "
            f"time-keeping annotations step by {steps[0]:g} s",
        )
    off = np.flatnonzero(np.abs(steps - duration) > ONSET_TOLERANCE_S)
    if off.size:
        k = int(off[0]) + 1
        gap = steps[k - 1] - duration
        kind = f"a gap of {gap:g} s" if gap > 0 else f"an overlap of {-gap:g} s"
        raise DataError(
            path,
            f"data record {k + 1} of {header.records} starts at {onsets[k]:g} s by its "
            f"time-keeping annotation, {kind} after data record {k} ({onsets[k - 1]:g} s + "
            f"{duration:g} s by "
            f"{_field('duration of a data record')})"
            + ("; discontinuous EDF+D recordings are not supported" if discontinuous else
               "; an EDF+C file's records must be contiguous"),
        )


def record_duration_confirmed(header: EdfHeader) -> bool:
    """Whether anything in the file confirms the header's record duration: EDF+ time-keeping
    annotations (``read_header`` checked them against it); a plain EDF file has none."""
    return EDF_ANNOTATIONS in header.labels and header.record_seconds > 0


def check_eeg_signals(path, header: EdfHeader, names) -> list[str]:
    """Check the header fields of the EEG signals ``names`` that will be read (the reader and
    ``eegkd inspect`` apply the same checks): a plausible sampling rate and digital and physical
    limits that give a finite, non-zero scale, else a DataError.

    Returns:
      Warnings, one sentence each: rates outside SLEEP_EEG_RATE_RANGE_HZ.
    """
    lo, hi = EEG_RATE_RANGE_HZ
    warnings = []
    for name in names:
        i = header.signal(name)
        rate = header.samples_per_record[i] / header.record_seconds
        if not lo <= rate <= hi:
            raise DataError(
                path,
                f"signal {i + 1} ({name!r}) would be sampled at {rate:g} Hz "
                f"({header.samples_per_record[i]} samples per {header.record_seconds:g}-s record), "
                f"not a plausible EEG rate ({lo:g} to {hi:g} Hz): check header fields "
                "'duration of a data record' and 'number of samples in each data record'",
            )
        limits = {  # MNE reads a decimal comma in these, as European recorders write them
            field: _decimal(path, header.signal_fields[field][i].replace(",", "."), field, signal=i,
                            labels=header.labels)
            for field in ("physical minimum", "physical maximum",
                          "digital minimum", "digital maximum")
        }
        if limits["digital maximum"] <= limits["digital minimum"]:
            raise DataError(
                path,
                f"{_field('digital maximum', i, header.labels)} is "
                f"{header.signal_fields['digital maximum'][i]!r}, not above the digital minimum "
                f"{header.signal_fields['digital minimum'][i]!r}",
            )
        if limits["physical maximum"] == limits["physical minimum"]:
            raise DataError(
                path,
                f"{_field('physical maximum', i, header.labels)} equals the physical minimum "
                f"({header.signal_fields['physical minimum'][i]!r}): the signal would have no "
                "scale",
            )
        if not SLEEP_EEG_RATE_RANGE_HZ[0] <= rate <= SLEEP_EEG_RATE_RANGE_HZ[1]:
            basis = ("EDF+ time-keeping annotations confirm it" if record_duration_confirmed(header)
                     else "nothing in a plain EDF file confirms it")
            warnings.append(
                f"signal {i + 1} ({name!r}) is sampled at {rate:g} Hz "
                f"({header.samples_per_record[i]} samples per {header.record_seconds:g}-s record "
                f"by header field 'duration of a data record'; {basis}), outside the "
                f"{SLEEP_EEG_RATE_RANGE_HZ[0]:g} to {SLEEP_EEG_RATE_RANGE_HZ[1]:g} Hz that sleep "
                "EEG is recorded at: if the record duration is wrong, so are the rate and the "
                "length")
    return warnings


def check_length_against_scoring(psg_path, header: EdfHeader, hypnogram_path,
                                 scored_span: float) -> None:
    """Refuses a signal more than SIGNAL_PER_SCORING_LIMIT times as long as the ``scored_span``
    seconds (from the PSG's start) that its hypnogram covers: in a plain EDF file, the sign of a
    wrong record duration (the reader and ``eegkd inspect`` apply it alike)."""
    seconds = header.records * header.record_seconds
    if seconds > SIGNAL_PER_SCORING_LIMIT * scored_span:
        raise DataError(
            psg_path,
            f"signal runs {seconds:g} s ({header.records} records of {header.record_seconds:g} s "
            f"by header field 'duration of a data record'), more than "
            f"{SIGNAL_PER_SCORING_LIMIT:g} times the {scored_span:g} s that its hypnogram "
            f"{pathlib.Path(hypnogram_path).name} covers: the record duration is wrong, or the "
            "hypnogram belongs to another recording",
        )


def _open_edf(path: pathlib.Path, include=None, header: EdfHeader | None = None):
    """MNE's reader on ``path``, after ``read_header`` (or with its result ``header``) checked the
    header: MNE would read a truncated file's whole records, or a -1 record count, without a word,
    and number duplicate labels (ELA -> ELA-0, ELA-1)."""
    import mne  # heavy import, only when a file is actually read

    if header is None:
        read_header(path)
    try:
        return mne.io.read_raw_edf(path, include=include, preload=False, verbose="error")
    # MNE raises anything from AssertionError to UnicodeDecodeError on a bad header.
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"cannot read EDF header ({type(e).__name__}: {e})")


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One EDF+ annotation: ``index`` counts the file's annotations from 1 (time-keeping ones
    left out); ``tal`` is the text of its time-stamped annotation list, for error messages."""

    index: int
    onset: float
    duration: float | None
    text: str
    tal: str


# EDF+ 2.2.2: a TAL is "+onset[\x15duration]\x14text\x14[text\x14...]\x00"; onsets carry a
# sign, durations do not, and both are plain decimals (no exponent, no nan).
_TAL_ONSET = re.compile(rb"[+-][0-9]+(?:\.[0-9]*)?")
_TAL_DURATION = re.compile(rb"[0-9]+(?:\.[0-9]*)?")


def read_annotations(path: str | pathlib.Path, header: EdfHeader | None = None
                     ) -> list[Annotation]:
    """Every annotation in the "EDF Annotations" signals of an EDF+ file, in file order.

    Parsed here rather than by MNE, whose pattern skips a TAL it cannot parse without a word (an
    onset "+3a0" or a duration "nan" made a stage vanish): each TAL is parsed in full or refused
    with a DataError naming its index and text. The time-keeping TAL that opens each record (an
    onset and no text) is not an annotation.
    """
    path = pathlib.Path(path)
    header = read_header(path) if header is None else header
    signals = [i for i, label in enumerate(header.labels) if label == EDF_ANNOTATIONS]
    if not signals:
        raise DataError(path, f"no {EDF_ANNOTATIONS!r} signal: not an EDF+ annotation file")
    record_bytes = SAMPLE_BYTES * sum(header.samples_per_record)
    header_bytes = MAIN_HEADER_BYTES + SIGNAL_HEADER_BYTES * len(header.labels)
    data = np.memmap(path, np.uint8, "r", offset=header_bytes,
                     shape=(header.records, record_bytes))
    annotations: list[Annotation] = []
    for k in range(header.records):
        for n, i in enumerate(signals):
            lo = SAMPLE_BYTES * sum(header.samples_per_record[:i])
            raw = bytes(data[k, lo: lo + SAMPLE_BYTES * header.samples_per_record[i]])
            # Unused bytes after the last TAL are NULs too: empty pieces are padding.
            for m, tal in enumerate(t for t in raw.split(b"\x00") if t):
                parsed = _parse_tal(path, tal, len(annotations) + 1, k, header.records)
                if m == 0 and n == 0 and parsed[2] == [""] and parsed[1] is None:
                    continue  # the record's time-keeping TAL
                onset, duration, texts = parsed
                for text in texts:
                    if not text:
                        raise DataError(path, f"annotation {len(annotations) + 1} "
                                              f"({_shown(tal)}) has an empty text")
                    annotations.append(Annotation(len(annotations) + 1, onset, duration, text,
                                                  _shown(tal)))
    del data
    return annotations


def _shown(tal: bytes) -> str:
    return repr(tal.decode("latin-1"))


def _parse_tal(path, tal: bytes, index: int, record: int, records: int
               ) -> tuple[float, float | None, list[str]]:
    """(onset, duration or None, texts) of one TAL, else a DataError naming annotation ``index``."""
    def refuse(problem: str):
        where = f" in data record {record + 1} of {records}" if records > 1 else ""
        raise DataError(path, f"annotation {index}{where} ({_shown(tal)}): {problem}")

    if not tal.endswith(b"\x14"):
        refuse("its text does not end in byte 20 (\\x14), as EDF+ requires")
    stamp, *texts = tal[:-1].split(b"\x14")
    onset_text, has_duration, duration_text = stamp.partition(b"\x15")
    if not _TAL_ONSET.fullmatch(onset_text):
        refuse(f"onset {onset_text.decode('latin-1')!r} is not a signed number of seconds")
    if has_duration and not _TAL_DURATION.fullmatch(duration_text):
        refuse(f"duration {duration_text.decode('latin-1')!r} is not a number of seconds")
    try:
        decoded = [t.decode("utf-8") for t in texts]  # EDF+ annotations are UTF-8
    except UnicodeDecodeError:
        refuse("its text is not UTF-8")
    return (float(onset_text), float(duration_text) if has_duration else None, decoded)


def read_hypnogram(path: str | pathlib.Path, epoch_seconds: float = EPOCH_SECONDS) -> Hypnogram:
    """Expand a Sleep-EDF style EDF+ hypnogram into one label per ``epoch_seconds`` epoch."""
    path = pathlib.Path(path)
    header = read_header(path)
    raw = _open_edf(path, header=header)
    start = raw.info["meas_date"]
    raw.close()
    annotations = read_annotations(path, header)
    if not annotations:
        raise DataError(path, "no annotations: not a hypnogram")
    order = sorted(annotations, key=lambda a: a.onset)  # stable: ties keep file order
    labels: list[int] = []
    first = order[0].onset
    expected = first
    for annotation in order:
        text = annotation.text.strip()
        onset, duration = annotation.onset, annotation.duration or 0.0
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
    """``"scalp"``, ``"ear"`` or ``"drop"`` for an EDF signal label: any 10-20 or ear-EEG label,
    with or without the "EEG " prefix and a reference (``montage.parse_label`` reads it)."""
    return montage.eeg_group(name) or "drop"


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
    header = read_header(psg_path)
    names = [n for n in header.labels if n != EDF_ANNOTATIONS]
    kinds = {n: classify_edf_channel(n) for n in names}
    scalp = [n for n in names if kinds[n] == "scalp"]
    ear = [n for n in names if kinds[n] == "ear"]
    if not scalp and not ear:
        raise DataError(psg_path, f"no EEG channels among {names}")
    for warning in check_eeg_signals(psg_path, header, scalp + ear):
        logging.warning("%s: %s", psg_path, warning)
    # MNE gives a file one rate, the highest of its channels; opening with only the EEG keeps the
    # EEG at its own rate when, say, an ECG is sampled faster. (EEG channels of different rates
    # would still be brought to the highest of them.)
    raw = _open_edf(psg_path, include=scalp + ear, header=header)
    per_record = max(header.samples_per_record[header.signal(n)] for n in scalp + ear)
    if sorted(raw.ch_names) != sorted(scalp + ear) or raw.n_times != header.records * per_record:
        # read_header checked the header; MNE must read what it describes
        raise DataError(
            psg_path,
            f"MNE read {raw.n_times} samples of channels {raw.ch_names}, the header describes "
            f"{header.records} records of {per_record} samples of {scalp + ear}",
        )
    fs = float(raw.info["sfreq"])
    length = (  # what the header says, for the errors below
        f"{header.records} records of {header.record_seconds:g} s by header field "
        f"'duration of a data record'"
    )

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
        check_length_against_scoring(psg_path, header, hypnogram_path,
                                     first + labels.shape[0] * epoch_seconds)
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
                f"({missing:.3f} s missing, {int(np.sum(beyond >= 0))} scored epochs past the end; "
                f"the signal's length is {length})",
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
