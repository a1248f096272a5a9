"""Who sleeps: the cohort's ids, and the traits that make one simulated sleeper differ from
another, drawn from a generator seeded by ``(seed, subject)``."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np


def subject_ids(count: int) -> list[str]:
    """The simulated cohort's ids: ``["sim-01", ..., "sim-NN"]`` (zero-padded, sorted)."""
    if count < 1:
        raise ValueError(f"a simulated cohort needs at least one subject, got {count}")
    width = max(2, len(str(count)))
    return [f"sim-{i:0{width}d}" for i in range(1, count + 1)]


def subject_rng(subject: str, seed: int, stream: int) -> np.random.Generator:
    """Stream 0: the traits; 1: the night (hypnogram, signals, artefacts); 2: the scorer."""
    # crc32 rather than hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng([int(seed), zlib.crc32(subject.encode()), stream])


@dataclasses.dataclass(frozen=True)
class SubjectTraits:
    """What makes one simulated sleeper differ from another."""

    alpha_hz: float
    spindle_hz: float
    amplitude: float  # overall cortical amplitude factor
    delta_gain: float
    ear_coupling: float  # ear electrodes' cortical gain relative to the ear topography row
    ear_noise_uv: float  # white noise floor of an ear electrode
    ear_drift_uv: float  # low-frequency electrode-skin noise of an ear electrode
    scalp_noise_uv: float
    cycle_minutes: float
    sleep_latency_minutes: float
    n3_first_cycle_minutes: float
    rem_first_cycle_minutes: float
    awakenings_per_hour: float
    eyes_closed_fraction: float


def subject_traits(subject: str, seed: int) -> SubjectTraits:
    """Draws one subject's traits; deterministic given ``(subject, seed)``."""
    r = subject_rng(subject, seed, 0)
    return SubjectTraits(
        alpha_hz=float(r.uniform(8.5, 11.5)),
        spindle_hz=float(r.uniform(12.0, 14.5)),
        amplitude=float(np.exp(r.normal(0.0, 0.15))),
        delta_gain=float(r.uniform(0.8, 1.2)),
        ear_coupling=float(r.uniform(0.55, 0.9)),
        ear_noise_uv=float(r.uniform(3.0, 6.0)),
        ear_drift_uv=float(r.uniform(8.0, 14.0)),
        scalp_noise_uv=float(r.uniform(0.8, 1.5)),
        cycle_minutes=float(r.uniform(82.0, 100.0)),
        sleep_latency_minutes=float(r.uniform(8.0, 22.0)),
        n3_first_cycle_minutes=float(r.uniform(34.0, 46.0)),
        rem_first_cycle_minutes=float(r.uniform(7.0, 12.0)),
        awakenings_per_hour=float(r.uniform(1.2, 2.0)),
        eyes_closed_fraction=float(r.uniform(0.5, 0.8)),
    )
