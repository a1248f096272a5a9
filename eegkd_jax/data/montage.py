"""Derivations (bipolar montages) from raw electrodes, and the ear-electrode rejection mask.

A derivation is named by a config string:

* ``"L-R"``, ``"L_E"``, ``"R_E"``: the ear-EEG derivations of the original work. ``L-R`` is the mean of
  the kept left-ear electrodes minus the mean of the kept right-ear ones; ``L_E`` is
  mean(ELA, ELB) - mean(ELE, ELG, ELI, ELK) within the left ear (concha minus canal), ``R_E`` the same
  on the right. "Kept" means present in the recording and not rejected.
* A channel that is already a derivation, e.g. ``"Fpz-Cz"`` matching ``"EEG Fpz-Cz"`` in Sleep-EDF,
  or ``"A1-A2"`` if a channel has that name: used as is.
* ``"X-Y"`` otherwise: electrode X minus electrode Y (``"C3-O1"``), or a single electrode name.

The rejection mask is the union of three sources: the config (``data_cfg.ear_rejections[subject]``),
the recording's own ``rejected_channels``, and, if enabled, ``auto_reject`` below. Rejected
electrodes leave the averages; a derivation left with no electrode on one side is an error, never
zeros or NaN. Scalp derivations have no fallback, so a rejected or flat electrode there is an error.
"""

from __future__ import annotations

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
      electrodes: the ear electrodes to judge (default: all of ``recording.ear_channels``).

    Returns:
      {electrode: reason}, empty if all look fine.
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
        is used. An electrode named there that the recording lacks is an error (likely a typo).
      auto: also apply ``auto_reject`` to the remaining ear electrodes.

    Returns:
      {electrode: reason}.
    """
    configured = (ear_rejections or {}).get(recording.subject, ())
    # A bare string ("ELK") would otherwise be split into letters.
    configured = (configured,) if isinstance(configured, str) else tuple(configured)
    present = set(recording.ear_channels) | set(recording.scalp_channels)
    unknown = [n for n in configured if n not in present]
    if unknown:
        raise DataError(
            recording.subject, f"ear_rejections names electrodes {unknown} that the recording lacks"
        )
    reasons = {n: "listed in data.ear_rejections" for n in configured}
    for n in recording.rejected_channels:
        reasons.setdefault(n, "marked bad by the recording")
    if auto:
        reasons.update(auto_reject(recording, already=reasons))
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


def find_channel(recording: Recording, name: str) -> tuple[str, int] | None:
    """("scalp" | "ear", column) of a channel called ``name`` or ``"EEG name"`` (case-insensitive)."""
    wanted = {name.upper(), f"EEG {name}".upper()}
    for group, names in (("scalp", recording.scalp_channels), ("ear", recording.ear_channels)):
        for i, n in enumerate(names):
            if n.upper() in wanted:
                return group, i
    return None


def _column(recording: Recording, where: tuple[str, int]) -> np.ndarray:
    group, i = where
    return (recording.scalp if group == "scalp" else recording.ear)[:, i]


def _mean_of(recording, spec, side, rejected) -> np.ndarray:
    kept = []
    for e in side:
        if e in rejected:
            continue
        where = find_channel(recording, e)
        if where is None:
            raise DataError(
                recording.subject, f"derivation {spec}: electrode {e} is missing and not rejected"
            )
        kept.append(where)
    if not kept:
        raise DataError(
            recording.subject,
            f"derivation {spec}: every electrode of {', '.join(side)} is rejected "
            f"(rejected: {sorted(rejected)})",
        )
    total = np.zeros(recording.num_samples, np.float32)
    for where in kept:
        total += _column(recording, where)
    total /= np.float32(len(kept))
    return total


def _checked(recording, spec, name, where, rejected) -> np.ndarray:
    """A single electrode/channel for a scalp-style derivation, refusing rejected or flat ones."""
    group, i = where
    actual = (recording.scalp_channels if group == "scalp" else recording.ear_channels)[i]
    if name in rejected or actual in rejected:
        raise DataError(recording.subject, f"derivation {spec}: electrode {name} is rejected")
    x = _column(recording, where)
    start, length = longest_flat_run(x)
    fs = recording.sampling_rate
    if length >= FLAT_SECONDS * fs:
        raise DataError(
            recording.subject,
            f"derivation {spec}: {name} is flat for {length / fs:.1f} s from {start / fs:.1f} s",
        )
    return x


def derive(
    recording: Recording, specs: Sequence[str], *, rejected: Iterable[str] = ()
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Compute derivations named by ``specs`` (see the module docstring).

    Args:
      recording: raw electrodes, (time, channels) microvolts.
      specs: e.g. ``("A1-A2", "C3-O1", "C4-O2")`` or ``("L-R", "L_E", "R_E")``; may be empty.
      rejected: the rejection mask (``rejection_mask``).

    Returns:
      ((time, len(specs)) float32, names) where names are the specs.
    """
    rejected = frozenset(rejected)
    out = np.empty((recording.num_samples, len(specs)), np.float32)
    for k, spec in enumerate(specs):
        if spec in EAR_DERIVATIONS:
            plus, minus = EAR_DERIVATIONS[spec]
            out[:, k] = _mean_of(recording, spec, plus, rejected)
            out[:, k] -= _mean_of(recording, spec, minus, rejected)
            continue
        whole = find_channel(recording, spec)
        if whole is not None:
            out[:, k] = _checked(recording, spec, spec, whole, rejected)
            continue
        parts = spec.split("-")
        ends = [(p, find_channel(recording, p)) for p in parts]
        if len(parts) != 2 or any(w is None for _, w in ends):
            raise DataError(
                recording.subject,
                f"derivation {spec}: no such channel, and not two electrodes of the recording "
                f"(scalp {list(recording.scalp_channels)}, ear {list(recording.ear_channels)})",
            )
        (a, wa), (b, wb) = ends
        out[:, k] = _checked(recording, spec, a, wa, rejected)
        out[:, k] -= _checked(recording, spec, b, wb, rejected)
    return out, tuple(specs)
