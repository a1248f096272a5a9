"""Electrodes: each raw channel is a weighted sum of the sources (a fixed topography) minus the
common reference, plus per-electrode noise and muscle; then movement, electrode pops and the odd
dead ear electrode. Ear electrodes sit close together and far from the cortex: they see the
cortical sources attenuated and nearly equally within one ear, with more noise whose level wanders
with contact quality (docs/simulator.md)."""

from __future__ import annotations

import numpy as np
import scipy.signal

from eegkd_jax.data.simulate.hypnogram import W
from eegkd_jax.data.simulate.sources import COLUMNS, PINK, event_times
from eegkd_jax.data.simulate.subject import SubjectTraits

SCALP_CHANNELS: tuple[str, ...] = ("C3", "C4", "O1", "O2", "A1", "A2", "F3", "F4")
EAR_CHANNELS: tuple[str, ...] = (
    "ELA", "ELB", "ELE", "ELG", "ELI", "ELK",
    "ERA", "ERB", "ERE", "ERG", "ERI", "ERK",
)  # fmt: skip
CHANNELS = SCALP_CHANNELS + EAR_CHANNELS
_EAR_CONCHA = frozenset({"ELA", "ELB", "ERA", "ERB"})
# Region of each electrode by its first letter; the reference sits on the midline near the nose.
_REGION = {"C": "central", "O": "occipital", "A": "mastoid", "F": "frontal", "E": "ear"}
_REGION_INDEX = {"frontal": 0, "central": 1, "occipital": 2, "mastoid": 3, "ear": 4, "reference": 5}
# Relative gain of each cortical source in each region: alpha is posterior, spindles and vertex
# waves central, delta and K-complexes frontal; mastoids and ears are far from all of them.
_TOPOGRAPHY = {
    #             frontal central occipital mastoid ear  reference
    "background": (0.90, 1.00, 0.80, 0.40, 0.35, 0.50),
    "delta": (1.00, 0.85, 0.35, 0.35, 0.30, 0.60),
    "theta": (0.60, 1.00, 0.45, 0.30, 0.25, 0.35),
    "alpha": (0.25, 0.45, 1.00, 0.40, 0.35, 0.10),
    "spindle": (0.60, 1.00, 0.30, 0.30, 0.25, 0.30),
    "kcomplex": (1.00, 0.85, 0.30, 0.30, 0.25, 0.55),
    "vertex": (0.50, 1.00, 0.30, 0.20, 0.20, 0.25),
    "sawtooth": (0.50, 1.00, 0.55, 0.25, 0.20, 0.30),
}
# Horizontal eye movements (a dipole: left electrodes positive for leftward gaze) and blinks.
_EOG_H = {"frontal": 0.15, "central": 0.04, "occipital": 0.02, "mastoid": 0.25, "ear": 0.2}
_EOG_V = {"frontal": 0.5, "central": 0.15, "occipital": 0.03, "mastoid": 0.08, "ear": 0.1}
# One factor on every ear electrode's view of the cortex, calibrated in docs/simulator.md.
EAR_COUPLING_SCALE = 1.0
_IPSI, _CONTRA = 1.0, 0.35  # how much an electrode sees its own vs the other hemisphere
# Muscle microvolts per region: temporalis and jaw muscles sit right by the ears and mastoids.
_MUSCLE_UV = {"frontal": 3.0, "central": 1.5, "occipital": 2.5, "mastoid": 5.0, "ear": 8.0}
_REGIONS = ["ear" if n in EAR_CHANNELS else _REGION[n[0]] for n in CHANNELS]
_IS_EAR = np.array([r == "ear" for r in _REGIONS])


def mixing(rng: np.random.Generator, traits: SubjectTraits) -> np.ndarray:
    """(sources, electrodes) gains of ``sources.COLUMNS`` in each electrode against the common
    reference (every channel minus the reference site)."""
    gains = np.zeros((len(COLUMNS), len(CHANNELS)), np.float32)
    ref = np.zeros(len(COLUMNS), np.float32)
    # Within-ear differences are small (electrodes ~1 cm apart): the concha pair sees a little more.
    ear_jitter = {name: (1.12 if name in _EAR_CONCHA else 0.92) * rng.uniform(0.93, 1.07)
                  for name in EAR_CHANNELS}
    for e, (name, region) in enumerate(zip(CHANNELS, _REGIONS)):
        side = "L" if (name[-1] in "13" or name.startswith("EL")) else "R"
        for s, (kind, hemi) in enumerate(COLUMNS):
            if kind in _TOPOGRAPHY:
                g = _TOPOGRAPHY[kind][_REGION_INDEX[region]]
                if hemi is not None:
                    g *= _IPSI if hemi == side else _CONTRA
                else:
                    g *= 0.5 * (_IPSI + _CONTRA)
                if region == "ear":
                    g *= EAR_COUPLING_SCALE * traits.ear_coupling * ear_jitter[name]
            elif kind == "eog_h":
                g = (1.0 if side == "L" else -1.0) * (
                    0.25 if name in _EAR_CONCHA else _EOG_H[region])
            else:  # eog_v: blinks and vertical movements
                g = _EOG_V[region]
            gains[s, e] = g
    for s, (kind, _) in enumerate(COLUMNS):
        if kind in _TOPOGRAPHY:
            ref[s] = _TOPOGRAPHY[kind][_REGION_INDEX["reference"]] * 0.5 * (_IPSI + _CONTRA)
        elif kind == "eog_v":
            ref[s] = 0.9  # a nose-side reference sits right by the eyes
    return gains - ref[:, None]


class Noise:
    """Per-electrode noise: a white floor, 1/f contact noise (on the ears modulated by a slowly
    wandering contact quality), and muscle (the first difference of white noise). Cut from pools
    of white and 1/f noise at a random offset per chunk and channel: independent-looking noise
    without drawing 20 x T fresh normals."""

    def __init__(self, rng: np.random.Generator, traits: SubjectTraits, fs: float,
                 num_seconds: int, chunk_samples: int):
        self.sps = int(fs)
        self.pool_size = 2 * chunk_samples + 1
        self.white = rng.standard_normal(self.pool_size).astype(np.float32)
        pink = scipy.signal.lfilter(*PINK, rng.standard_normal(self.pool_size))
        self.pink = (pink / pink[int(10 * fs) :].std()).astype(np.float32)
        self.floor_uv = np.where(_IS_EAR, traits.ear_noise_uv, traits.scalp_noise_uv).astype(
            np.float32)
        self.drift_uv = np.where(_IS_EAR, traits.ear_drift_uv, 1.0).astype(np.float32)
        self.muscle_uv = np.array([_MUSCLE_UV[r] for r in _REGIONS], np.float32)
        # Ear contact quality (sweat, pressure on the pillow): a log-normal random walk over tens
        # of seconds, kept from drifting off over the night.
        walk = np.cumsum(rng.normal(0.0, 0.15, (len(CHANNELS), num_seconds)), axis=1)
        walk -= _moving_average(walk, 120)
        self.contact = np.where(_IS_EAR[:, None], np.exp(0.8 * walk), 1.0).astype(np.float32)

    def add(self, rng: np.random.Generator, mixed: np.ndarray, muscle: np.ndarray,
            s0: int) -> None:
        """Adds the noise of samples s0.. to ``mixed`` (channels, n); ``muscle`` is the night's
        per-second muscle level."""
        n, sps = mixed.shape[1], self.sps
        sec0, sec1 = s0 // sps, (s0 + n) // sps
        muscle_env = np.repeat(muscle[sec0:sec1], sps)
        for c in range(len(CHANNELS)):
            o1, o2, o3 = rng.integers(0, self.pool_size - n - 1, 3)
            noise = self.white[o1 : o1 + n] * self.floor_uv[c] + self.pink[o2 : o2 + n] * \
                self.drift_uv[c]
            if _IS_EAR[c]:
                noise *= np.repeat(self.contact[c, sec0:sec1], sps)
            emg = self.white[o3 + 1 : o3 + 1 + n] - self.white[o3 : o3 + n]
            emg *= muscle_env
            mixed[c] += noise
            mixed[c] += emg * np.float32(np.sqrt(0.5) * self.muscle_uv[c])


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along the last axis, same length (edges use the partial window)."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    n = x.shape[-1]
    hi = np.minimum(np.arange(n) + width // 2 + 1, n)
    lo = np.maximum(np.arange(n) - width // 2, 0)
    return (c[..., hi] - c[..., lo]) / (hi - lo)


# ------------------------------------------------------------------------------------- artefacts
def movement_epochs(rng: np.random.Generator, stages: np.ndarray) -> np.ndarray:
    """A few epochs per night that a scorer would mark as movement: mostly at wake transitions."""
    n = stages.shape[0]
    wanted = max(1, int(rng.poisson(0.008 * n))) if n >= 20 else 0
    transitions = np.flatnonzero(np.diff(stages.astype(np.int16)) != 0) + 1
    near_wake = transitions[(stages[transitions] == W) | (stages[transitions - 1] == W)]
    pool = near_wake if near_wake.size >= wanted else np.arange(n)
    return np.sort(rng.choice(pool, size=min(wanted, pool.size), replace=False))


def add_movement(rng, scalp, ear, start, length, fs) -> None:
    """Large slow swings and muscle bursts on every electrode, strongest on the ears."""
    dur = int(rng.uniform(5.0, 20.0) * fs)
    a = start + int(rng.integers(0, max(1, length - dur)))
    b = min(a + dur, scalp.shape[0])
    n = b - a
    t = np.arange(n) / fs
    for arr, scale in ((scalp, 1.0), (ear, 2.5)):
        k = arr.shape[1]
        swing = np.sin(
            2 * np.pi * rng.uniform(0.2, 1.0, k)[None, :] * t[:, None] + rng.uniform(0, 6.3, k)
        )
        burst = rng.standard_normal((n, k))
        arr[a:b] += (
            scale * (rng.uniform(100, 400, k) * swing + rng.uniform(20, 60, k) * burst)
        ).astype(np.float32)


def add_pops(rng, ear, fs, num_seconds) -> None:
    """Electrode pops on the ear: a sudden step that decays over about a second (~1 per 20 min)."""
    for c in range(ear.shape[1]):
        for t in event_times(rng, np.full(num_seconds, 1.0 / 1200.0)):
            start = int(t * fs)
            tau = rng.uniform(0.3, 1.5)
            n = min(int(4 * tau * fs), ear.shape[0] - start)
            if n <= 0:
                continue
            step = rng.choice([-1.0, 1.0]) * rng.uniform(50.0, 300.0)
            ear[start : start + n, c] += (step * np.exp(-np.arange(n) / (tau * fs))).astype(
                np.float32
            )


def kill_electrodes(rng, ear, fs) -> list[str]:
    """Makes 0-2 ear electrodes dead: flat (disconnected lead, constant offset) or noisy
    (poor contact: large mains hum and broadband noise). Returns their names."""
    count = int(rng.choice([0, 1, 2], p=[0.3, 0.5, 0.2]))
    dead = [str(x) for x in rng.choice(EAR_CHANNELS, size=count, replace=False)]
    t = np.arange(ear.shape[0]) / fs
    for name in dead:
        c = EAR_CHANNELS.index(name)
        if rng.random() < 0.5:
            ear[:, c] = np.float32(rng.uniform(-50.0, 50.0)) + 0.01 * rng.standard_normal(
                ear.shape[0]
            ).astype(np.float32)
        else:
            hum = rng.uniform(300.0, 800.0) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 6.3))
            ear[:, c] = (
                hum + rng.uniform(150.0, 400.0) * rng.standard_normal(ear.shape[0])
            ).astype(np.float32)
    return dead
