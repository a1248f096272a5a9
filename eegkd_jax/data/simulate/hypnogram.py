"""The true stages of a night: sleep-onset latency, ~90-minute cycles in which N3 is long early and
vanishes late while REM grows, brief awakenings followed by N1, and a final wake
(docs/simulator.md)."""

from __future__ import annotations

import numpy as np

from eegkd_jax.data.simulate.subject import SubjectTraits

W, N1, N2, N3, REM = range(5)


def _cycle_bouts(rng: np.random.Generator, traits: SubjectTraits, minutes: float) -> list:
    """(stage, minutes) bouts for a night of ``minutes``: onset, cycles, final wake."""
    bouts = [(W, traits.sleep_latency_minutes), (N1, rng.uniform(3.0, 7.0))]
    total = sum(d for _, d in bouts)
    cycle = 0
    while total < minutes:
        length = traits.cycle_minutes * rng.uniform(0.9, 1.1)
        n3 = traits.n3_first_cycle_minutes * 0.5**cycle * rng.uniform(0.8, 1.2)
        n3 = n3 if n3 >= 5.0 else 0.0  # late cycles rarely reach slow-wave sleep
        rem = min(traits.rem_first_cycle_minutes + 7.5 * cycle, 36.0) * rng.uniform(0.85, 1.15)
        cycle_bouts = []
        if cycle > 0:  # the brief arousal that often separates cycles
            cycle_bouts += [(W, rng.uniform(1.0, 3.0)), (N1, rng.uniform(1.0, 3.0))]
        n2 = max(length - n3 - rem - sum(d for _, d in cycle_bouts), 10.0)
        descent = min(n2 * 0.5, rng.uniform(8.0, 15.0)) if n3 else n2
        cycle_bouts += [(N2, descent), (N3, n3), (N2, n2 - descent), (REM, rem)]
        bouts += [(s, d) for s, d in cycle_bouts if d > 0]
        total += sum(d for _, d in cycle_bouts)
        cycle += 1
    return bouts


def simulate_hypnogram(
    rng: np.random.Generator, num_epochs: int, traits: SubjectTraits, epoch_seconds: float = 30.0
) -> np.ndarray:
    """A plausible hypnogram of ``num_epochs`` scored epochs (no unscored ones). Nights shorter
    than 7 h are time-compressed whole nights, so even a 20-minute test night holds every stage.

    Returns:
      (num_epochs,) int8 stages in 0..4.
    """
    minutes = num_epochs * epoch_seconds / 60.0
    nominal = max(minutes, 420.0)
    scale = minutes / nominal
    bouts = _cycle_bouts(rng, traits, nominal)
    stages = np.array([s for s, _ in bouts], dtype=np.int8)
    ends_min = np.cumsum([d for _, d in bouts]) * scale
    ends = np.round(ends_min * 60.0 / epoch_seconds).astype(np.int64)
    # stage of epoch i = the bout whose end lies after the epoch's centre
    centres = np.arange(num_epochs) + 0.5
    hyp = stages[np.minimum(np.searchsorted(ends, centres), len(stages) - 1)].copy()

    per_min = 60.0 / epoch_seconds
    onset = int(np.argmax(hyp != W)) if np.any(hyp != W) else num_epochs
    # Wake after sleep onset: brief awakenings, each followed by some N1, anywhere in sleep.
    count = rng.poisson(traits.awakenings_per_hour * nominal / 60.0)
    for _ in range(count):
        if onset >= num_epochs - 1:
            break
        start = int(rng.integers(onset, num_epochs))
        wake = max(1, int(round(rng.uniform(1.0, 6.0) * per_min * scale)))
        drowsy = max(1, int(round(rng.uniform(0.5, 2.0) * per_min * scale)))
        hyp[start : start + wake] = W
        hyp[start + wake : start + wake + drowsy] = N1
    # Final awakening in the morning.
    final = int(round(rng.uniform(8.0, 16.0) * per_min * scale))
    if final:
        hyp[-final:] = W
    # Stage instability: single N3 epochs lighten to N2, single N2 epochs to N1.
    flip = rng.random(num_epochs)
    hyp[(hyp == N3) & (flip < 0.05)] = N2
    hyp[(hyp == N2) & (flip < 0.012)] = N1
    return hyp
