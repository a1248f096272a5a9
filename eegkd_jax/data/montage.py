"""What channel labels say, derivations (bipolar montages) from a recording's channels, channel
maps, and the ear-electrode rejection mask.

Channel labels (``parse_label``) name an electrode of the 10-20 / 10-10 system (C3, Fpz, T7 or its
old name T3, the ear lobes A1 A2, the mastoids M1 M2) or of the EESM17 ear-EEG (ELA ... ELK left,
ERA ... ERK right), with or without an EDF+ type prefix and a reference after "-" or ":":
"EEG C3-A1", "C3-A1", "C3:M2", "EEG Fpz-Cz", "CZ-A1". Case does not matter. A label without a
reference, or with REF / AVG (a common or average reference), is monopolar: the electrode against
the recording's common reference. Labels typed EOG, EMG or ECG, or named like them (LOC, ROC, E1,
E2, Chin), are not EEG; an "EEG" label whose placement is unknown ("EEG(sec)") is EEG of kind
"eeg".

A derivation is named by a config string:

* ``"L-R"``, ``"L_E"``, ``"R_E"``: the ear-EEG derivations of the original work. ``L-R`` is the mean
  of the kept left-ear electrodes minus the mean of the kept right-ear ones; ``L_E`` is
  mean(ELA, ELB) - mean(ELE, ELG, ELI, ELK) within the left ear (concha minus canal), ``R_E`` the
  same on the right. "Kept" means present in the recording and not rejected.
* A channel label of the recording, used as it is: ``"Fpz-Cz"`` matches ``"EEG Fpz-Cz"``, and a
  non-standard label (``"EarL"``) works too. ``"A - B"`` (spaces around the minus) is the difference
  of the two channels labelled A and B.
* ``"X-Y"``: electrode X minus electrode Y (``"C3-O1"``); ``"X"``: electrode X against the common
  reference.

How ``"X-Y"`` is formed: every EEG channel is a known difference of two potentials (its electrode
minus its reference, or minus the common reference), so the channels link electrodes into a graph,
and X-Y is the signed sum of the channels along a path from Y to X. Monopolar C3 and O1 give
C3 - O1; "C3-A1" and "O1-A1" give (C3-A1) - (O1-A1); a channel "Fpz-Cz" is Fpz-Cz itself. Electrodes
that no channel links (A1-A2 in a recording without A1 or A2) cannot be formed: ``unformable`` says
which and why, before anything is computed, and ``example_map`` suggests a channel map.

A channel map (``parse_channel_map``) says which recording channels stand for which model inputs:
``"A1-A2=M1-M2,C3-O1=EEG C3-A2"`` on the command line or the same, one entry per line, in a file.

The rejection mask is the union of three sources: the config (``data_cfg.ear_rejections[subject]``),
the recording's own ``rejected_channels``, and, if enabled, ``auto_reject`` below. Rejected
electrodes leave the averages and the graph; a derivation left with no electrode on one side is an
error, never zeros or NaN. Other derivations have no fallback, so a rejected or flat electrode there
is an error.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from eegkd_jax.data.recording import DataError, Recording

LEFT_EAR: tuple[str, ...] = ("ELA", "ELB", "ELE", "ELG", "ELI", "ELK")
RIGHT_EAR: tuple[str, ...] = ("ERA", "ERB", "ERE", "ERG", "ERI", "ERK")

# name -> (plus group, minus group): derivation = mean(kept plus) - mean(kept minus).
EAR_DERIVATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "L-R": (LEFT_EAR, RIGHT_EAR),
    "L_E": (("ELA", "ELB"), ("ELE", "ELG", "ELI", "ELK")),
    "R_E": (("ERA", "ERB"), ("ERE", "ERG", "ERI", "ERK")),
}

# Auto-rejection thresholds (see ``auto_reject``).
FLAT_SECONDS = 30.0
NOISE_RATIO = 10.0

# The 10-10 system with the old 10-20 names (T3 T4 T5 T6), the ear lobes and the mastoids.
SCALP_ELECTRODES: tuple[str, ...] = tuple(
    "Nz Fp1 Fpz Fp2 AF7 AF3 AFz AF4 AF8 F9 F7 F5 F3 F1 Fz F2 F4 F6 F8 F10 FT9 FT7 FC5 FC3 FC1 FCz "
    "FC2 FC4 FC6 FT8 FT10 T9 T7 C5 C3 C1 Cz C2 C4 C6 T8 T10 TP9 TP7 CP5 CP3 CP1 CPz CP2 CP4 CP6 "
    "TP8 TP10 P9 P7 P5 P3 P1 Pz P2 P4 P6 P8 P10 PO7 PO3 POz PO4 PO8 O9 O1 Oz O2 O10 Iz "
    "T3 T4 T5 T6 A1 A2 M1 M2".split()
)
_SCALP_BY_UPPER = {name.upper(): name for name in SCALP_ELECTRODES}
_EAR_ELECTRODE = re.compile(r"E[LR][A-Z]")
# References that mean "the same for every channel": the recording's common reference.
COMMON_REFERENCE_WORDS = frozenset({"REF", "AVG", "AV", "AVERAGE", "CAR"})
_TYPE_PREFIX = re.compile(r"(EEG|EOG|EMG|ECG|EKG)(?![A-Z0-9])[\s_:]*(.*)$", re.IGNORECASE)
_TYPE_KINDS = {"EEG": "eeg", "EOG": "eog", "EMG": "emg", "ECG": "ecg", "EKG": "ecg"}
_NON_EEG_NAMES = ((re.compile(r"LOC|ROC|E1|E2|HEOG|VEOG|EOG\w*"), "eog"),
                  (re.compile(r"CHIN\w*|EMG\w*"), "emg"), (re.compile(r"ECG\w*|EKG\w*"), "ecg"))
_PAIR = re.compile(r"([A-Za-z0-9]+)\s*(?:[-:]\s*([A-Za-z0-9]+))?")
# Electrodes at (nearly) the same place under another name; example maps try them first.
STAND_INS = {"A1": "M1", "A2": "M2", "M1": "A1", "M2": "A2", "T3": "T7", "T7": "T3", "T4": "T8",
             "T8": "T4", "T5": "P7", "P7": "T5", "T6": "P8", "P8": "T6"}

COMMON = "common reference"  # the graph node every monopolar channel is measured against


@dataclasses.dataclass(frozen=True)
class Label:
    """What a channel label says.

    Attributes:
      label: the label as written.
      kind: "scalp" or "ear" (EEG at a known electrode), "eeg" (EEG, placement unknown), "eog",
        "emg", "ecg" or "other".
      electrode: the electrode in its usual spelling ("Fpz", "ELA"), or None.
      reference: the reference electrode ("A1", "M2"), or None: the common reference (or unknown,
        where ``electrode`` is None too).
    """

    label: str
    kind: str
    electrode: str | None = None
    reference: str | None = None

    @property
    def is_eeg(self) -> bool:
        return self.kind in ("scalp", "ear", "eeg")


def _electrode(name: str) -> str | None:
    """The usual spelling of a 10-10 or ear electrode name, or None."""
    upper = name.upper()
    if upper in _SCALP_BY_UPPER:
        return _SCALP_BY_UPPER[upper]
    return upper if _EAR_ELECTRODE.fullmatch(upper) else None


def parse_label(label: str) -> Label:
    """Reads a channel label (see the module docstring): ``parse_label("C3:M2")`` is
    ``Label("C3:M2", "scalp", "C3", "M2")``."""
    text = label.strip()
    typed = _TYPE_PREFIX.match(text)
    declared = _TYPE_KINDS[typed.group(1).upper()] if typed else None
    rest = typed.group(2).strip() if typed else text
    if declared not in (None, "eeg"):
        return Label(label, declared)
    pair = _PAIR.fullmatch(rest)
    if pair:
        electrode = _electrode(pair.group(1))
        ref_text = pair.group(2)
        reference = None if ref_text is None else _electrode(ref_text)
        common = ref_text is None or ref_text.upper() in COMMON_REFERENCE_WORDS
        if electrode is not None and (reference is not None or common):
            kind = "ear" if _EAR_ELECTRODE.fullmatch(electrode) else "scalp"
            return Label(label, kind, electrode, reference)
    if declared == "eeg":
        return Label(label, "eeg")
    first = re.split(r"[\s\-:]", rest.upper(), maxsplit=1)[0]
    for pattern, kind in _NON_EEG_NAMES:
        if pattern.fullmatch(first):
            return Label(label, kind)
    return Label(label, "other")


def eeg_group(label: str) -> str | None:
    """"scalp" or "ear": the Recording group an EEG channel belongs in; None for anything else.
    EEG of unknown placement goes with the scalp group."""
    return {"scalp": "scalp", "eeg": "scalp", "ear": "ear"}.get(parse_label(label).kind)


# --------------------------------------------------------------------------------------------------
# Rejection


def longest_flat_run(x: np.ndarray) -> tuple[int, int]:
    """(start, length) in samples of the longest run of identical consecutive values in (time,) x."""
    if x.shape[0] < 2:
        return 0, int(x.shape[0])
    same = np.concatenate(([False], x[1:] == x[:-1], [False])).astype(np.int8)
    edges = np.diff(same)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if starts.size == 0:
        return 0, 1
    i = int(np.argmax(ends - starts))
    # ``same[p]`` compares samples p-1 and p, so a run of k equal steps whose first step is
    # ``same[starts + 1]`` spans the k + 1 samples from ``starts``.
    return int(starts[i]), int(ends[i] - starts[i]) + 1


def _noise_level(x: np.ndarray) -> float:
    """IQR of the first difference: a robust amplitude of the fast activity, blind to DC offsets and
    slow drifts that dominate raw unfiltered electrodes."""
    d = np.diff(x.astype(np.float32, copy=False))
    q25, q75 = np.percentile(d, [25.0, 75.0])
    return float(q75 - q25)


def auto_reject(
    recording: Recording, *, already: Iterable[str] = (), electrodes: Sequence[str] | None = None
) -> dict[str, str]:
    """Ear electrodes that look disconnected or broken, with the reason for each.

    The rule, on each ear electrode not ``already`` rejected:

    1. flat: it repeats the same value for ``FLAT_SECONDS`` (30 s) or longer anywhere in the night;
    2. off-scale: its noise level (IQR of the sample-to-sample difference, in microvolts) is more than
       ``NOISE_RATIO`` (10) times above or below the median noise level of the candidate electrodes
       (needs at least 3 candidates that are not flat; a wildly noisy or near-dead electrode stands
       out by an order of magnitude, while good electrodes of one night agree within a few times).

    Args:
      recording: the night; only its ear group is examined.
      already: electrodes rejected by other means; they are neither judged nor counted in the median.
      electrodes: the ear channels to judge (default: all of ``recording.ear_channels``).

    Returns:
      {channel: reason}, empty if all look fine.
    """
    already = set(already)
    names = [n for n in (electrodes or recording.ear_channels) if n not in already]
    fs = recording.sampling_rate
    reasons: dict[str, str] = {}
    levels: dict[str, float] = {}
    for name in names:
        x = recording.ear[:, recording.ear_channels.index(name)]
        start, length = longest_flat_run(x)
        if length >= FLAT_SECONDS * fs:
            reasons[name] = f"flat for {length / fs:.1f} s from {start / fs:.1f} s"
        else:
            levels[name] = _noise_level(x)
    if len(levels) >= 3:
        median = float(np.median(list(levels.values())))
        for name, level in levels.items():
            if median > 0 and level > NOISE_RATIO * median:
                reasons[name] = (
                    f"noisy: noise level {level:.3g} uV is {level / median:.0f}x the median "
                    f"{median:.3g} uV"
                )
            elif level < median / NOISE_RATIO:
                reasons[name] = (
                    f"near-flat: noise level {level:.3g} uV is below 1/{NOISE_RATIO:g} of the "
                    f"median {median:.3g} uV"
                )
    return reasons


def rejections(
    recording: Recording,
    ear_rejections: Mapping[str, Sequence[str]] | None = None,
    *,
    auto: bool = True,
) -> dict[str, str]:
    """Every rejected electrode of the night with why: config, recording, or auto-rejection.

    Args:
      recording: the night.
      ear_rejections: ``data_cfg.ear_rejections``, {subject: electrodes}; only this subject's entry
        is used. A name there that is neither a channel nor an electrode of the recording is an
        error (likely a typo).
      auto: also apply ``auto_reject`` to the remaining ear electrodes.

    Returns:
      {electrode or channel: reason}.
    """
    configured = (ear_rejections or {}).get(recording.subject, ())
    # A bare string ("ELK") would otherwise be split into letters.
    configured = (configured,) if isinstance(configured, str) else tuple(configured)
    channels = recording.scalp_channels + recording.ear_channels
    present = set(channels) | {parse_label(n).electrode for n in channels}
    unknown = [n for n in configured if n not in present]
    if unknown:
        raise DataError(
            recording.subject, f"ear_rejections names electrodes {unknown} that the recording lacks"
        )
    reasons = {n: "listed in data.ear_rejections" for n in configured}
    for n in recording.rejected_channels:
        reasons.setdefault(n, "marked bad by the recording")
    if auto:
        already = set(reasons) | {n for n in recording.ear_channels
                                  if parse_label(n).electrode in reasons}
        reasons.update(auto_reject(recording, already=already))
    return reasons


def rejection_mask(
    recording: Recording,
    ear_rejections: Mapping[str, Sequence[str]] | None = None,
    *,
    auto: bool = True,
) -> frozenset[str]:
    """All rejected electrodes of the night: config ∪ recording.rejected_channels ∪ auto-rejected
    (the keys of ``rejections``)."""
    return frozenset(rejections(recording, ear_rejections, auto=auto))


# --------------------------------------------------------------------------------------------------
# The channel graph and derivation plans


@dataclasses.dataclass(frozen=True)
class _Channel:
    """One EEG column of a recording as an edge of the graph: plus minus minus."""

    label: str
    group: str  # "scalp" | "ear"
    column: int
    plus: str | None  # electrode, None where the placement is unknown
    minus: str  # reference electrode or COMMON


# A path is ((sign, channel), ...): the potential it leads to is the signed sum of the channels,
# relative to the graph's root. A side is the paths whose potentials are averaged.
Path = tuple[tuple[int, _Channel], ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one derivation is computed: mean(plus potentials) - mean(minus potentials)."""

    spec: str
    plus: tuple[Path, ...]
    minus: tuple[Path, ...]
    check_flat: bool  # non-ear derivations refuse flat channels (they have no fallback)


def _channels(recording: Recording) -> list[_Channel]:
    out = []
    for group, names in (("scalp", recording.scalp_channels), ("ear", recording.ear_channels)):
        for i, name in enumerate(names):
            parsed = parse_label(name)
            out.append(_Channel(name, group, i, parsed.electrode, parsed.reference or COMMON))
    return out


@dataclasses.dataclass(frozen=True)
class _Rejected:
    """Rejected labels and the electrodes they name, so that "ELA" rejects "EEG ELA" and back;
    ``in`` ignores case."""

    names: tuple[str, ...]
    keys: frozenset[str]

    @classmethod
    def of(cls, rejected: Iterable[str]) -> "_Rejected":
        names = tuple(sorted(set(rejected)))
        keys = set()
        for name in names:
            keys.add(name.casefold())
            electrode = parse_label(name).electrode
            if electrode:
                keys.add(electrode.casefold())
        return cls(names, frozenset(keys))

    def __contains__(self, name: str) -> bool:
        return name.casefold() in self.keys


def _is_rejected(channel: _Channel, rejected: _Rejected) -> bool:
    ends = [channel.label, channel.plus or "", channel.minus]
    return any(e in rejected for e in ends if e and e != COMMON)


def _paths_from(root: str, channels: Sequence[_Channel]) -> dict[str, Path]:
    """Shortest path from ``root`` to every electrode it is linked to (breadth first, channels in
    recording order, so the choice is deterministic)."""
    links: dict[str, list[tuple[str, int, _Channel]]] = {}
    for c in channels:
        if c.plus is None:
            continue
        links.setdefault(c.minus, []).append((c.plus, +1, c))
        links.setdefault(c.plus, []).append((c.minus, -1, c))
    paths: dict[str, Path] = {root: ()}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for other, sign, channel in links.get(node, ()):
            if other not in paths:
                paths[other] = paths[node] + ((sign, channel),)
                queue.append(other)
    return paths


def _eeg_labels(recording: Recording) -> list[str]:
    return list(recording.scalp_channels) + list(recording.ear_channels)


def _plan(recording: Recording, spec: str, rejected: _Rejected) -> _Plan:
    """The plan of derivation ``spec``, or a DataError (named by the subject) saying why it
    cannot be formed."""
    channels = _channels(recording)
    by_label = {c.label.casefold(): c for c in channels}

    def refuse(problem: str):
        return DataError(recording.subject, f"derivation {spec}: {problem}")

    def whole(label: str) -> _Channel | None:
        channel = by_label.get(label.casefold()) or by_label.get(f"eeg {label}".casefold())
        if channel is not None and _is_rejected(channel, rejected):
            raise refuse(f"electrode {channel.plus or channel.label} is rejected")
        return channel

    # A channel that already is the derivation, or the difference of two named channels.
    if spec not in EAR_DERIVATIONS:
        channel = whole(spec)
        if channel is not None:
            return _Plan(spec, (((1, channel),),), (), True)
        if " - " in spec:
            a, b = (whole(part.strip()) for part in spec.split(" - ", 1))
            if a is not None and b is not None:
                return _Plan(spec, (((1, a),),), (((1, b),),), True)

    usable = [c for c in channels if not _is_rejected(c, rejected)]
    if spec in EAR_DERIVATIONS:
        plus, minus = EAR_DERIVATIONS[spec]
        kept = [[e for e in side if e not in rejected] for side in (plus, minus)]
        linked_to_common = _paths_from(COMMON, usable)
        root = COMMON if any(e in linked_to_common for side in kept for e in side) else (
            kept[1][0] if kept[1] else COMMON)
        paths = _paths_from(root, usable)
        sides = []
        for side, kept_side in zip((plus, minus), kept):
            found = [e for e in kept_side if e in paths]
            if not found and len(kept_side) == len(side):
                raise refuse(f"the recording has none of {', '.join(side)}")
            if not found:
                missing = [e for e in kept_side if e not in paths]
                raise refuse(
                    f"every electrode of {', '.join(side)} is rejected"
                    + (f" or missing (missing: {', '.join(missing)})" if missing else "")
                    + f" (rejected: {list(rejected.names)})")
            sides.append(tuple(paths[e] for e in found))
        return _Plan(spec, sides[0], sides[1], False)

    parsed = parse_label(spec)
    if parsed.electrode is None or not parsed.is_eeg:
        raise refuse(
            "no such channel, and not electrodes of the 10-20 system or of the ear-EEG "
            f"(the recording has {_eeg_labels(recording)})")
    ends = [parsed.electrode, parsed.reference or COMMON]
    for e in ends:
        if e != COMMON and e in rejected:
            raise refuse(f"electrode {e} is rejected")
    present = {c.plus for c in channels} | {c.minus for c in channels}
    absent = [e for e in ends if e not in present]
    if absent:
        what = " and ".join("a channel against the common reference" if e == COMMON else e
                            for e in absent)
        raise refuse(f"no channel has {what} (the recording has {_eeg_labels(recording)})")
    root = COMMON if COMMON in _paths_from(ends[0], usable) else ends[1]
    paths = _paths_from(root, usable)
    unlinked = [e for e in ends if e not in paths]
    if unlinked:
        raise refuse(
            f"no chain of channels links {' and '.join(ends)} (the recording has "
            f"{_eeg_labels(recording)})")
    return _Plan(spec, (paths[ends[0]],), (paths[ends[1]],), True)


def unformable(recording: Recording, specs: Sequence[str], *, rejected: Iterable[str] = ()
               ) -> dict[str, str]:
    """{spec: why} for every derivation of ``specs`` that the recording cannot give; empty if all
    can be formed. Reads no samples."""
    rejected = _Rejected.of(rejected)
    problems = {}
    for spec in specs:
        try:
            _plan(recording, spec, rejected)
        except DataError as err:
            problems[spec] = err.problem.removeprefix(f"derivation {spec}: ")
    return problems


def _in_order(path: Path) -> Path:
    """The path's channels with the added ones first: (C3-A1) - (O1-A1) reads (and sums) better
    than -(O1-A1) + (C3-A1)."""
    return tuple(sorted(path, key=lambda term: term[0] < 0))


def _path_text(path: Path) -> str:
    if not path:
        return "0"
    text = ""
    for i, (sign, channel) in enumerate(_in_order(path)):
        if i == 0:
            text = channel.label if sign > 0 else f"-{channel.label}"
        else:
            text += f" {'+' if sign > 0 else '-'} {channel.label}"
    return text


def _side_text(side: tuple[Path, ...]) -> str:
    if not side:  # a derivation that is one channel has no minus side
        return ""
    texts = [_path_text(p) for p in side if p]
    if len(side) == 1:
        return texts[0] if texts else ""
    return f"mean({', '.join(texts)})"


def explain(recording: Recording, spec: str, *, rejected: Iterable[str] = ()) -> str:
    """How ``spec`` is formed from the recording's channels, e.g. "(C3-A1) - (O1-A1)" or
    "mean(ELA, ELB) - mean(ELE, ELG, ELI, ELK)". Raises a DataError if it cannot be."""
    plan = _plan(recording, spec, _Rejected.of(rejected))
    plus, minus = _side_text(plan.plus), _side_text(plan.minus)

    def wrap(text):
        return f"({text})" if any(op in text for op in (" + ", " - ")) else text

    if not minus:
        return plus
    return f"{wrap(plus) if plus else '0'} - {wrap(minus)}"


# --------------------------------------------------------------------------------------------------
# Computing derivations


def _column(recording: Recording, channel: _Channel) -> np.ndarray:
    return (recording.scalp if channel.group == "scalp" else recording.ear)[:, channel.column]


def _potential(recording: Recording, path: Path) -> np.ndarray | None:
    """The potential at the end of ``path`` (None: the root itself, zero). A one-channel path is
    the column itself, not a copy."""
    if not path:
        return None
    path = _in_order(path)
    sign, channel = path[0]
    if len(path) == 1 and sign > 0:
        return _column(recording, channel)
    out = _column(recording, channel) * np.float32(sign)
    for sign, channel in path[1:]:
        if sign > 0:
            out += _column(recording, channel)
        else:
            out -= _column(recording, channel)
    return out


def _side_mean(recording: Recording, side: tuple[Path, ...]) -> np.ndarray | None:
    if not side:
        return None
    if len(side) == 1:
        return _potential(recording, side[0])
    total = np.zeros(recording.num_samples, np.float32)
    for path in side:
        value = _potential(recording, path)
        if value is not None:
            total += value
    total /= np.float32(len(side))
    return total


def _check_not_flat(recording: Recording, plan: _Plan) -> None:
    fs = recording.sampling_rate
    for path in plan.plus + plan.minus:
        for _, channel in path:
            start, length = longest_flat_run(_column(recording, channel))
            if length >= FLAT_SECONDS * fs:
                raise DataError(
                    recording.subject,
                    f"derivation {plan.spec}: {channel.label} is flat for {length / fs:.1f} s "
                    f"from {start / fs:.1f} s",
                )


def derive(
    recording: Recording, specs: Sequence[str], *, rejected: Iterable[str] = ()
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Compute derivations named by ``specs`` (see the module docstring).

    Args:
      recording: raw electrodes, (time, channels) microvolts.
      specs: e.g. ``("A1-A2", "C3-O1", "C4-O2")`` or ``("L-R", "L_E", "R_E")``; may be empty.
      rejected: the rejection mask (``rejection_mask``): electrodes or channel labels.

    Returns:
      ((time, len(specs)) float32, names) where names are the specs.

    Raises:
      DataError (named by the subject): a derivation cannot be formed, or a channel it needs is
        rejected or flat for FLAT_SECONDS.
    """
    rejected = _Rejected.of(rejected)
    out = np.empty((recording.num_samples, len(specs)), np.float32)
    for k, spec in enumerate(specs):
        plan = _plan(recording, spec, rejected)
        if plan.check_flat:
            _check_not_flat(recording, plan)
        plus, minus = _side_mean(recording, plan.plus), _side_mean(recording, plan.minus)
        out[:, k] = 0.0 if plus is None else plus
        if minus is not None:
            out[:, k] -= minus
    return out, tuple(specs)


# --------------------------------------------------------------------------------------------------
# Channel maps


def parse_channel_map(text: str, *, source: str = "--channel_map") -> dict[str, str]:
    """{model derivation: recording channels} from ``"A1-A2=M1-M2,C3-O1=EEG C3-A2"``, or from a file
    with one ``derivation = channels`` entry per line (``#`` starts a comment) or a JSON object.

    The channels are any derivation string of the module docstring, resolved against the
    recording: a channel label, ``"A - B"`` of two labels, or electrodes ``"X-Y"``.

    Raises:
      DataError naming the file (or ``source``) and the entry that is not ``derivation=channels``.
    """
    path = pathlib.Path(text)
    if "=" not in text and path.is_file():
        source = str(path)
        body = path.read_text(encoding="utf-8-sig")
        if body.lstrip().startswith("{"):
            try:
                mapping = json.loads(body)
            except json.JSONDecodeError as e:
                raise DataError(source, f"invalid JSON ({e})") from None
            if not isinstance(mapping, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
                raise DataError(source, "a JSON channel map must be an object of strings, "
                                        'e.g. {"A1-A2": "M1-M2"}')
            return {k.strip(): v.strip() for k, v in mapping.items()}
        entries = [line.split("#", 1)[0] for line in body.splitlines()]
    elif "=" not in text:
        raise DataError(source, f"{text!r} is neither a file nor DERIVATION=CHANNELS entries "
                                "(e.g. 'A1-A2=M1-M2,C3-O1=C3-A2')")
    else:
        entries = text.split(",")
    mapping = {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise DataError(source,
                            f"entry {entry!r} is not DERIVATION=CHANNELS (e.g. A1-A2=M1-M2)")
        if key in mapping:
            raise DataError(source, f"derivation {key} is mapped twice")
        mapping[key] = value
    return mapping


def _family(electrode: str) -> str:
    """The row of the 10-20 system an electrode lies on: C3, Cz, C4 -> "C"; Fp1, Fpz -> "Fp";
    the ear lobes and the mastoids (A1, M2) -> "A"."""
    row = electrode.rstrip("0123456789").removesuffix("z").upper()
    return "A" if row == "M" else row


def _signal_key(recording: Recording, spec: str) -> str | None:
    """What ``spec`` is computed from, as text, so that two specs giving the same signal (up to
    its sign) compare equal; None if it cannot be formed."""
    try:
        return explain(recording, spec).removeprefix("-")
    except DataError:
        return None


@dataclasses.dataclass(frozen=True)
class SuggestedMap:
    """A channel map that the recording can give, for the derivations it lacks.

    Attributes:
      entries: {derivation: recording channels}, in the model's order.
      repeated: {derivation: the input it repeats}: where the recording has fewer distinct EEG
        signals than the model has inputs, these derivations get a signal another input has too.
    """

    entries: dict[str, str]
    repeated: dict[str, str]

    def text(self) -> str:
        """Command-line form: "A1-A2=M1-M2,C4-O2=EEG Pz-Oz"."""
        return ",".join(f"{k}={v}" for k, v in self.entries.items())


def suggest_map(recording: Recording, specs: Sequence[str], problems: Mapping[str, str]
                ) -> SuggestedMap:
    """A channel map for the derivations in ``problems`` that forms every input from the
    recording, each from a signal no other input uses where the recording has enough.

    First, for a derivation X-Y, the same electrodes under another name (A1 -> M1, T3 -> T7), then
    electrodes of the same rows of the 10-20 system (C4-O2 -> Cz-O1). Then the recording's EEG
    channels as they are, each to the derivation it shares most electrode rows with (C3-O1 takes
    "Pz-Oz" before A1-A2 does). When every EEG signal is taken, a derivation reuses the best
    formable candidate and is listed in ``repeated``.
    """
    labels = _eeg_labels(recording)
    channels = {c.label: c for c in _channels(recording)}
    present = sorted({e for c in channels.values() for e in (c.plus, c.minus)
                      if e is not None and e != COMMON}, key=str.casefold)
    used: dict[str, str] = {}  # signal -> the input it feeds
    for spec in specs:
        key = None if spec in problems else _signal_key(recording, spec)
        if key is not None:
            used.setdefault(key, spec)

    def rows(spec: str) -> set[str]:
        parsed = parse_label(spec)
        return {_family(e) for e in (parsed.electrode, parsed.reference) if e}

    def near(spec: str) -> list[str]:  # same electrodes renamed, or the same rows
        parsed = parse_label(spec)
        if parsed.electrode is None or spec in EAR_DERIVATIONS:
            return []
        ends = [parsed.electrode, parsed.reference]
        swapped = [STAND_INS.get(e, e) if e else e for e in ends]
        found = [swapped[0] + (f"-{swapped[1]}" if swapped[1] else "")]
        pools = [[e for e in present if _family(e) == _family(end)] if end else [None]
                 for end in ends]
        return found + [a + (f"-{b}" if b else "") for a in pools[0] for b in pools[1] if a != b]

    def formable(candidates: Sequence[str], spec: str) -> list[tuple[str, str]]:
        return [(c, k) for c in dict.fromkeys(candidates)
                if c != spec and (k := _signal_key(recording, c)) is not None]

    wanted = [spec for spec in specs if spec in problems]
    entries: dict[str, str] = {}
    for spec in wanted:
        fresh = [(c, k) for c, k in formable(near(spec), spec) if k not in used]
        if fresh:
            entries[spec], key = fresh[0]
            used[key] = spec

    def shared(spec: str, label: str) -> int:
        channel = channels[label]
        return len(rows(spec) & {_family(e) for e in (channel.plus, channel.minus)
                                 if e and e != COMMON})

    left = [spec for spec in wanted if spec not in entries]
    by_fit = sorted(left, key=lambda spec: -max((shared(spec, x) for x in labels), default=0))
    repeated = {}
    for spec in by_fit:
        ranked = sorted(labels, key=lambda x: -shared(spec, x))  # stable: recording order on ties
        candidates = formable(near(spec) + ranked, spec)
        fresh = [(c, k) for c, k in candidates if k not in used]
        if fresh:
            entries[spec], key = fresh[0]
            used[key] = spec
        elif candidates:
            entries[spec], key = candidates[0]
            repeated[spec] = used[key]
        else:
            entries[spec] = "CHANNEL"
    return SuggestedMap({spec: entries[spec] for spec in wanted}, repeated)


def example_map(recording: Recording, specs: Sequence[str], problems: Mapping[str, str]) -> str:
    """``suggest_map`` in command-line form."""
    return suggest_map(recording, specs, problems).text()
