"""Hypnogram statistics, and how far one set of hypnograms is from another.

Used to check the simulator's nights against real scorings (Sleep-EDF, EESM17). Three summaries of
a set of hypnograms, each pooled over every night of the set (a long night weighs more):

* stage shares: the fraction of scored epochs in each stage W N1 N2 N3 REM;
* mean bout length per stage, in minutes: a bout is a run of one stage, ended by another stage or
  by an unscored epoch (-1);
* the 5 x 5 transition matrix: row s is the distribution of the next epoch's stage after an epoch
  of stage s (self-transitions included), counting only pairs of consecutive scored epochs.

Distances between two sets (``distance(candidate, reference)``):

* ``stage_shares_tv``: total variation distance of the stage shares, 0.5 * sum |p - q|, in [0, 1];
* ``transitions_tv``: the mean over the five rows of the rows' total variation distance;
* ``bout_relative_difference``: per stage |m - m_ref| / m_ref, and their mean.

Real recordings hold long wake before lights-out and after waking (Sleep-EDF cassette files span
about 24 h), so every night is first cut to its sleep period (``sleep_period``: first to last
sleep epoch), the same rule for real and simulated nights.

Command line: ``eegkd hypnogram-stats`` (``eegkd_jax/cli/hypnogram_stats.py``) writes the JSON
report.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from eegkd_jax.data.recording import NUM_CLASSES, STAGES, UNSCORED

W = 0


def _checked(hypnogram) -> np.ndarray:
    hyp = np.asarray(hypnogram)
    if hyp.ndim != 1:
        raise ValueError(f"a hypnogram is 1-D (epochs,), got shape {hyp.shape}")
    bad = np.setdiff1d(np.unique(hyp), np.arange(UNSCORED, NUM_CLASSES))
    if bad.size:
        raise ValueError(f"stage values {bad.tolist()} are outside -1..{NUM_CLASSES - 1}")
    return hyp.astype(np.int64)


def sleep_period(hypnogram) -> np.ndarray:
    """The night from its first to its last sleep epoch (N1, N2, N3 or REM), both included.

    Args:
      hypnogram: (epochs,) stages 0..4, -1 = not scored.

    Returns:
      (k,) the slice; empty if the night holds no sleep.
    """
    hyp = _checked(hypnogram)
    asleep = np.flatnonzero(hyp > W)
    if asleep.size == 0:
        return hyp[:0]
    return hyp[asleep[0] : asleep[-1] + 1]


def stage_counts(hypnograms: Sequence) -> np.ndarray:
    """(5,) scored epochs per stage, summed over the hypnograms."""
    counts = np.zeros(NUM_CLASSES, np.int64)
    for h in hypnograms:
        h = _checked(h)
        counts += np.bincount(h[h != UNSCORED], minlength=NUM_CLASSES)
    return counts


def stage_shares(hypnograms: Sequence) -> np.ndarray:
    """(5,) fraction of the scored epochs in each stage, pooled over the hypnograms."""
    counts = stage_counts(hypnograms)
    if counts.sum() == 0:
        raise ValueError("no scored epoch in these hypnograms")
    return counts / counts.sum()


def bouts(hypnogram) -> list[tuple[int, int]]:
    """(stage, length in epochs) of each run of one scored stage, in order; -1 ends a run."""
    hyp = _checked(hypnogram)
    if hyp.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, hyp[1:] != hyp[:-1]])
    lengths = np.diff(np.r_[starts, hyp.size])
    return [(int(hyp[s]), int(n)) for s, n in zip(starts, lengths) if hyp[s] != UNSCORED]


def mean_bout_minutes(hypnograms: Sequence, epoch_seconds: float = 30.0) -> np.ndarray:
    """(5,) mean bout length per stage in minutes, pooled over the hypnograms (0 where a stage
    never occurs)."""
    total = np.zeros(NUM_CLASSES)
    count = np.zeros(NUM_CLASSES)
    for h in hypnograms:
        for stage, n in bouts(h):
            total[stage] += n
            count[stage] += 1
    return np.divide(total, count, out=np.zeros(NUM_CLASSES), where=count > 0) * (
        epoch_seconds / 60.0
    )


def transition_counts(hypnograms: Sequence) -> np.ndarray:
    """(5, 5) counts of (stage at t, stage at t + 1) over consecutive scored epochs."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for h in hypnograms:
        h = _checked(h)
        a, b = h[:-1], h[1:]
        keep = (a != UNSCORED) & (b != UNSCORED)
        np.add.at(counts, (a[keep], b[keep]), 1)
    return counts


def transition_matrix(hypnograms: Sequence) -> np.ndarray:
    """(5, 5) row-stochastic matrix: row s = P(next epoch's stage | this epoch is s). A stage
    that never occurs gets an all-zero row."""
    counts = transition_counts(hypnograms).astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def summary(hypnograms: Sequence, epoch_seconds: float = 30.0) -> dict[str, Any]:
    """The three summaries of a set, and the spread of stage shares across its nights."""
    per_night = np.array([stage_shares([h]) for h in hypnograms])
    return {
        "nights": len(hypnograms),
        "scored_epochs": int(stage_counts(hypnograms).sum()),
        "stage_shares": _named(stage_shares(hypnograms)),
        "stage_share_range_across_nights": {
            s: [round(float(lo), 4), round(float(hi), 4)]
            for s, lo, hi in zip(STAGES, per_night.min(axis=0), per_night.max(axis=0))
        },
        "mean_bout_minutes": _named(mean_bout_minutes(hypnograms, epoch_seconds)),
        "transition_matrix": {
            s: _named(row) for s, row in zip(STAGES, transition_matrix(hypnograms))
        },
    }


def _named(values) -> dict[str, float]:
    return {s: round(float(v), 4) for s, v in zip(STAGES, values)}


def _tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def distance(candidate: Sequence, reference: Sequence, epoch_seconds: float = 30.0) -> dict:
    """How far the ``candidate`` hypnograms are from the ``reference`` ones (see the module doc).

    Returns:
      {"stage_shares_tv": float, "transitions_tv": float, "transitions_tv_per_row": {stage: float},
       "bout_relative_difference": {stage: float}, "bout_relative_difference_mean": float}
    """
    rows = [
        _tv(a, b)
        for a, b in zip(transition_matrix(candidate), transition_matrix(reference))
    ]
    m = mean_bout_minutes(candidate, epoch_seconds)
    m_ref = mean_bout_minutes(reference, epoch_seconds)
    rel = np.divide(np.abs(m - m_ref), m_ref, out=np.zeros(NUM_CLASSES), where=m_ref > 0)
    return {
        "stage_shares_tv": round(_tv(stage_shares(candidate), stage_shares(reference)), 4),
        "transitions_tv": round(float(np.mean(rows)), 4),
        "transitions_tv_per_row": _named(rows),
        "bout_relative_difference": _named(rel),
        "bout_relative_difference_mean": round(float(rel.mean()), 4),
    }


# --------------------------------------------------------------------------------------------------
# The report: the simulator against Sleep-EDF and EESM17


def read_sleep_edf(directory) -> list[np.ndarray]:
    """Sleep periods of every ``*-Hypnogram.edf`` in ``directory`` (sorted by name)."""
    from eegkd_jax.data import edf

    files = sorted(pathlib.Path(directory).glob("*-Hypnogram.edf"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *-Hypnogram.edf file")
    return [sleep_period(edf.read_hypnogram(f).labels) for f in files]


def read_eesm17(root) -> list[np.ndarray]:
    """Sleep periods of every ``*_acq-scoring_events.tsv`` under ``root`` (sorted by name)."""
    from eegkd_jax.data import bids

    files = sorted(pathlib.Path(root).glob("sub-*/ses-*/eeg/*_acq-scoring_events.tsv"))
    if not files:
        raise FileNotFoundError(f"{root}: no sub-*/ses-*/eeg/*_acq-scoring_events.tsv file")
    return [sleep_period(bids.read_scoring(f)) for f in files]


def simulated(subjects: int, seed: int, hours: float) -> tuple[list, list]:
    """Sleep periods of the simulator's nights: (true stages, scored labels), one per subject."""
    from eegkd_jax.data import simulate

    true, scored = [], []
    for subject in simulate.subject_ids(subjects):
        t, s = simulate.simulate_labels(subject, seed=seed, hours=hours)
        true.append(sleep_period(t))
        # the scorer's sleep period, cut by its own first and last sleep epoch
        scored.append(sleep_period(s))
    return true, scored


def config_cohort(name: str = "online_kd") -> tuple[list, list]:
    """Sleep periods of the simulated cohort that ``eegkd_jax/configs/<name>.py``'s defaults
    build (subjects, seed and night length from its data config): (true stages, scored labels).
    The scored labels are the built cohort's, except that its few movement epochs (-1 there)
    keep the scorer's stage (``simulate.simulate_labels``)."""
    import importlib

    data = importlib.import_module(f"eegkd_jax.configs.{name}").get_config().data
    if data.source != "simulated":
        raise ValueError(f"configs/{name}.py reads {data.source!r} data, not the simulator")
    sim = data.simulated
    return simulated(int(sim.subjects), int(sim.seed), float(sim.hours))


def report(sleep_edf_dir, eesm17_root, subjects: int, seed: int, hours: float,
           cohort: str = "") -> dict:
    sets = {"sleep_edf": read_sleep_edf(sleep_edf_dir), "eesm17": read_eesm17(eesm17_root)}
    sets["simulated_true"], sets["simulated_scored"] = simulated(subjects, seed, hours)
    candidates = ["simulated_true", "simulated_scored", "eesm17"]
    if cohort:
        sets["cohort_true"], sets["cohort_scored"] = config_cohort(cohort)
        candidates += ["cohort_true", "cohort_scored"]
    out: dict[str, Any] = {"summaries": {k: summary(v) for k, v in sets.items()}, "distances": {}}
    for cand in candidates:
        for ref in ("sleep_edf", "eesm17"):
            if cand != ref:
                out["distances"][f"{cand}_vs_{ref}"] = distance(sets[cand], sets[ref])
    return out
