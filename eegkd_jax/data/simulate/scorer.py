"""The scorer: labels are a human reading of the night, not the night itself. Its rates, and which
of them are published and which are our choice, are in docs/simulator.md."""

from __future__ import annotations

import numpy as np

# P(scorer writes the true stage | true stage), W N1 N2 N3 REM: one scorer against the majority of
# the AASM inter-scorer reliability program (Rosenberg & Van Hout 2013).
SCORER_AGREEMENT = (0.841, 0.630, 0.852, 0.674, 0.905)
SCORER_AGREEMENT_OVERALL = 0.826  # the same paper's overall figure, for the tests
# Where a disagreeing scorer's label goes, away from a stage boundary (neighbouring stages only).
_CONFUSED_WITH = np.array(
    [
        # W     N1    N2    N3    REM      (true stage in the row)
        [0.00, 0.75, 0.10, 0.00, 0.15],  # W: mostly N1 (drowsy wake vs N1)
        [0.40, 0.00, 0.45, 0.00, 0.15],  # N1: W or N2, some REM (low-voltage mixed frequency)
        [0.00, 0.45, 0.00, 0.40, 0.15],  # N2: N1 (arousal rules) or N3 (the 20 % delta threshold)
        [0.00, 0.00, 1.00, 0.00, 0.00],  # N3: only N2
        [0.20, 0.50, 0.30, 0.00, 0.00],  # REM: N1 (both low-voltage) or W, N2 at its start
    ]
)  # fmt: skip
# How much likelier a disagreement is on an epoch next to a stage change than inside a bout.
_TRANSITION_WEIGHT = 4.0
# Misreads come in runs of this mean length (epochs): a run of borderline epochs all called N2.
_MISREAD_RUN_EPOCHS = 4.0


def score_hypnogram(rng: np.random.Generator, stages: np.ndarray) -> np.ndarray:
    """What a human scorer writes for a night whose true stages are ``stages``.

    Each epoch is misread with a probability that depends on its true stage (one minus
    ``SCORER_AGREEMENT``) and is ``_TRANSITION_WEIGHT`` times higher on an epoch next to a stage
    change than inside a bout, normalised per stage and night so that the expected per-stage
    agreement is the published one. The random draws behind that choice are shared within runs of
    ~``_MISREAD_RUN_EPOCHS`` epochs, so misreads come in stretches. A misread boundary epoch takes
    its neighbour's stage (the scorer put the boundary one epoch off); a misread epoch inside a
    bout takes a neighbouring stage drawn from ``_CONFUSED_WITH``. Epochs labelled -1 stay -1.

    Args:
      rng: generator for the scorer's choices.
      stages: (epochs,) int true stages 0..4, or -1.

    Returns:
      (epochs,) int8 scored labels.
    """
    stages = np.asarray(stages).astype(np.int8)
    n = stages.shape[0]
    labels = stages.copy()
    if n == 0:
        return labels
    before = np.concatenate(([stages[0]], stages[:-1]))
    after = np.concatenate((stages[1:], [stages[-1]]))
    boundary = (before != stages) | (after != stages)
    weight = np.where(boundary, _TRANSITION_WEIGHT, 1.0)
    p = np.zeros(n)
    for s, agreement in enumerate(SCORER_AGREEMENT):
        here = stages == s
        if here.any():
            p[here] = (1.0 - agreement) * weight[here] / weight[here].mean()
    # A night where nearly all of a stage sits at boundaries would ask for p > 1 there.
    p = np.minimum(p, 0.95)
    lengths = rng.geometric(1.0 / _MISREAD_RUN_EPOCHS, size=n)
    run = np.repeat(np.arange(n), lengths)[:n]  # run index of each epoch (sum(lengths) >= n)
    misread = (rng.random(n)[run] < p) & (stages >= 0)
    # At a boundary: the other side's stage (either neighbour if both differ).
    other = np.where(rng.random(n) < 0.5, before, after)
    other = np.where(other == stages, np.where(before != stages, before, after), other)
    at_edge = misread & boundary & (other >= 0)
    labels[at_edge] = other[at_edge]
    inside = np.flatnonzero(misread & ~at_edge)
    cumulative = np.cumsum(_CONFUSED_WITH[stages[inside]], axis=1)
    labels[inside] = (rng.random(n)[run][inside][:, None] > cumulative).sum(axis=1)
    return labels
