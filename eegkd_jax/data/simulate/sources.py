"""Cortical and ocular sources with stage-dependent amplitudes: a 1/f background, delta (N3), theta
(N1, REM), alpha (wake with eyes closed), spindles and K-complexes (N2), vertex waves (N1),
sawtooth waves and rapid eye movements (REM), blinks and saccades (wake), slow eye movements (N1).
Rhythms have a left and a right version, correlated but not equal. Microvolts."""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.signal

from eegkd_jax.data.simulate.hypnogram import REM, W
from eegkd_jax.data.simulate.subject import SubjectTraits

# Stage tables, ordered W N1 N2 N3 REM. Rhythm amplitudes are RMS microvolts of the source.
_RHYTHM_UV = {
    "background": (9.0, 9.0, 10.0, 10.0, 8.0),
    "delta": (5.0, 9.0, 18.0, 70.0, 8.0),
    "theta": (4.0, 11.0, 6.0, 6.0, 10.0),
    "alpha": (3.0, 5.0, 2.0, 2.0, 4.0),  # wake value with eyes open; eyes closed below
}
_ALPHA_EYES_CLOSED_UV = 20.0
_EVENTS_PER_MINUTE = {
    "spindle": (0.0, 0.3, 5.0, 2.0, 0.2),
    "kcomplex": (0.0, 0.2, 1.5, 0.6, 0.0),
    "vertex": (0.0, 2.5, 0.3, 0.0, 0.0),
    "sawtooth": (0.0, 0.0, 0.0, 0.0, 1.2),
    "saccade": (12.0, 1.0, 0.0, 0.0, 18.0),
    "blink": (10.0, 1.0, 0.0, 0.0, 0.0),
}
_SLOW_EYE_UV = (10.0, 35.0, 3.0, 0.0, 3.0)
_MUSCLE = (1.0, 0.5, 0.35, 0.3, 0.08)  # relative EMG level; REM atonia is the lowest
RHYTHMS = ("background", "delta", "theta", "alpha")
# The source columns the electrodes mix: rhythms (left, right), events, eye movements.
COLUMNS = [(k, h) for k in RHYTHMS for h in ("L", "R")] + [
    ("spindle", "L"), ("spindle", "R"), ("kcomplex", None), ("vertex", None), ("sawtooth", None),
    ("eog_h", None), ("eog_v", None)]  # fmt: skip
COLUMN = {c: i for i, c in enumerate(COLUMNS)}
# 1/f ("pink") noise: a 3-pole approximation to a -10 dB/decade slope (b, a).
PINK = (np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786]),
        np.array([1.0, -2.494956002, 2.017265875, -0.522189400]))


def per_second(table, stage_sec: np.ndarray, smooth_seconds: int = 5) -> np.ndarray:
    """Stage table looked up per second and smoothed so amplitudes glide across transitions."""
    values = np.asarray(table, dtype=np.float32)[stage_sec]
    if smooth_seconds > 1:
        kernel = np.ones(smooth_seconds, np.float32) / smooth_seconds
        padded = np.pad(
            values, (smooth_seconds // 2, smooth_seconds - 1 - smooth_seconds // 2), "edge"
        )
        values = np.convolve(padded, kernel, mode="valid").astype(np.float32)
    return values


def _bouts_mask(
    rng: np.random.Generator, allowed: np.ndarray, p_on: float, mean_s: float
) -> np.ndarray:
    """Per-second on/off process (e.g. eyes closed): bouts of ~mean_s s, only where allowed."""
    n = allowed.shape[0]
    lengths = rng.geometric(1.0 / mean_s, size=max(4, int(2 * n / mean_s) + 4))
    states = rng.random(lengths.shape[0]) < p_on
    on = np.repeat(states, lengths)
    if on.shape[0] < n:  # geometric draws came up short; extend with "off"
        on = np.pad(on, (0, n - on.shape[0]))
    return on[:n] & allowed


def event_times(rng: np.random.Generator, rate_per_sec: np.ndarray) -> np.ndarray:
    """Seconds (float) of a Poisson process whose rate changes every second."""
    counts = rng.poisson(rate_per_sec)
    secs = np.repeat(np.arange(rate_per_sec.shape[0]), counts)
    return secs + rng.random(secs.shape[0])


@dataclasses.dataclass
class Envelopes:
    """Per-second amplitudes of the night (num_seconds,): the rhythms', the slow eye movements',
    the muscle level; and when the eyes are closed."""

    stage_sec: np.ndarray
    rhythm: dict[str, np.ndarray]
    eyes_closed: np.ndarray
    slow_eye: np.ndarray
    muscle: np.ndarray


def envelopes(rng: np.random.Generator, stages: np.ndarray, traits: SubjectTraits,
              epoch_seconds: float) -> Envelopes:
    stage_sec = np.repeat(stages, int(epoch_seconds))
    num_seconds = stage_sec.shape[0]
    amp = traits.amplitude
    rhythm = {}
    for kind, table in _RHYTHM_UV.items():
        # Epochs of one stage are not all alike: each rhythm's amplitude wanders from epoch to
        # epoch, which is what makes N1/N2 and N2/N3 boundaries ambiguous in real recordings.
        jitter = np.repeat(np.exp(rng.normal(0.0, 0.3, stages.shape[0])), int(epoch_seconds))
        seconds = np.arange(num_seconds)
        rhythm[kind] = per_second(np.asarray(table)[stage_sec] * jitter, seconds) * amp
    rhythm["delta"] *= traits.delta_gain
    eyes_closed = _bouts_mask(rng, stage_sec == W, traits.eyes_closed_fraction, 20.0)
    closed = per_second(np.where(eyes_closed, 1.0, 0.0), np.arange(num_seconds), 3)
    rhythm["alpha"] = rhythm["alpha"] + closed * (_ALPHA_EYES_CLOSED_UV * amp)
    muscle = per_second(_MUSCLE, stage_sec, 3)
    # Wake muscle tone comes and goes (jaw clenching, swallowing, shifting).
    muscle *= np.where((stage_sec == W) & (rng.random(num_seconds) < 0.15), 3.0, 1.0).astype(
        np.float32)
    return Envelopes(stage_sec, rhythm, eyes_closed, per_second(_SLOW_EYE_UV, stage_sec, 9),
                     muscle)


# ---------------------------------------------------------------------------------------- events
@dataclasses.dataclass
class Event:
    column: int  # source column it is added to
    start: int  # sample
    waveform: np.ndarray  # (n,) float32 microvolts


def _spindle(rng, fs, traits) -> np.ndarray:
    dur = rng.uniform(0.5, 2.0)
    t = np.arange(int(dur * fs)) / fs
    freq = traits.spindle_hz + rng.normal(0.0, 0.6)
    env = 0.5 - 0.5 * np.cos(2 * np.pi * t / dur)  # waxing-waning: a raised-cosine window
    return rng.uniform(12.0, 30.0) * env * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))


def _kcomplex(rng, fs) -> np.ndarray:
    # A sharp negative wave followed by a slower positive one, ~1 s in all, 70-140 uV.
    t = np.arange(int(1.2 * fs)) / fs
    amp = rng.uniform(70.0, 140.0)
    return amp * (-np.exp(-(((t - 0.25) / 0.09) ** 2)) + 0.6 * np.exp(-(((t - 0.65) / 0.2) ** 2)))


def _vertex(rng, fs) -> np.ndarray:
    t = np.arange(int(0.5 * fs)) / fs
    return -rng.uniform(35.0, 70.0) * np.exp(-(((t - 0.2) / 0.06) ** 2))


def _sawtooth(rng, fs) -> np.ndarray:
    dur = rng.uniform(2.0, 5.0)
    freq = rng.uniform(2.0, 4.0)
    t = np.arange(int(dur * fs)) / fs
    phase = (t * freq) % 1.0
    # slow rise, quick fall: the shape that gives the wave its name
    wave = np.where(phase < 0.75, phase / 0.75, (1.0 - phase) / 0.25) - 0.5
    return rng.uniform(20.0, 40.0) * 2.0 * wave * np.sin(np.pi * t / dur)


def _blink(rng, fs) -> np.ndarray:
    t = np.arange(int(0.5 * fs)) / fs
    return rng.uniform(80.0, 200.0) * np.exp(-(((t - 0.2) / 0.07) ** 2))


_WAVEFORMS = {"kcomplex": _kcomplex, "vertex": _vertex, "sawtooth": _sawtooth, "blink": _blink}


def events(rng: np.random.Generator, env: Envelopes, traits: SubjectTraits, fs: float
           ) -> list[Event]:
    """Sparse events at a per-second Poisson rate (phasic REM comes in bursts), sorted by start.
    A saccade is a one-sample step in horizontal gaze, integrated into eye position later."""
    stage_sec = env.stage_sec
    phasic = _bouts_mask(rng, stage_sec == REM, 0.4, 15.0)
    eyes_open_wake = (stage_sec == W) & ~env.eyes_closed
    found: list[Event] = []
    for kind, rates in _EVENTS_PER_MINUTE.items():
        rate = np.asarray(rates, np.float64)[stage_sec] / 60.0
        if kind == "saccade":
            rate = rate * np.where(stage_sec == REM, np.where(phasic, 2.2, 0.2), 1.0)
            rate = rate * np.where(stage_sec == W, eyes_open_wake * 1.6 + 0.2, 1.0)
        elif kind == "sawtooth":
            rate = rate * np.where(phasic, 2.0, 0.3)
        elif kind == "blink":
            rate = rate * np.where(stage_sec == W, eyes_open_wake, 1.0)
        for t in event_times(rng, rate):
            start = int(t * fs)
            if kind == "spindle":  # bilateral with unequal sides
                wave = _spindle(rng, fs, traits)
                for side in ("L", "R"):
                    found.append(Event(COLUMN[("spindle", side)], start,
                                       (wave * rng.uniform(0.7, 1.2)).astype(np.float32)))
            elif kind == "saccade":
                found.append(Event(COLUMN[("eog_h", None)], start,
                                   np.float32([rng.choice([-1, 1]) * rng.uniform(60, 200)])))
            else:
                wave = _WAVEFORMS[kind](rng, fs)
                target = COLUMN[("eog_v", None)] if kind == "blink" else COLUMN[(kind, None)]
                scale = traits.amplitude if kind != "blink" else 1.0
                found.append(Event(target, start, (wave * scale).astype(np.float32)))
    found.sort(key=lambda ev: ev.start)
    return found


# --------------------------------------------------------------------------------- the time series
class Sources:
    """Writes the sources' time series chunk by chunk; filter states carry over between chunks.
    Narrow-band rhythms are generated at half rate (all lie below 16 Hz) and interpolated up."""

    def __init__(self, rng: np.random.Generator, env: Envelopes, found: list[Event],
                 traits: SubjectTraits, fs: float):
        self.env, self.events, self.sps = env, found, int(fs)
        self.starts = np.array([ev.start for ev in found], np.int64)
        self.longest = max((ev.waveform.shape[0] for ev in found), default=1)
        self.decim = 2 if self.sps % 2 == 0 and fs >= 100 else 1
        fs_low = fs / self.decim

        def band(lo, hi):
            return scipy.signal.butter(2, [lo, min(hi, 0.45 * fs_low)], btype="band", fs=fs_low,
                                       output="sos")

        self.filters = {
            "delta": band(0.5, 2.0),
            "theta": band(4.0, 7.0),
            "alpha": band(traits.alpha_hz - 1.2, traits.alpha_hz + 1.2),
            "slow_eye": scipy.signal.butter(1, [0.1, 0.5], btype="band", fs=fs_low, output="sos"),
        }
        # Unit-variance scale of each filter, measured once on a white-noise probe.
        probe = rng.standard_normal(int(60 * fs_low))
        settle = int(10 * fs_low)
        self.norm = {k: 1.0 / np.std(scipy.signal.sosfilt(sos, probe)[settle:])
                     for k, sos in self.filters.items()}
        self.norm["background"] = 1.0 / np.std(scipy.signal.lfilter(*PINK, probe)[settle:])
        self.zi = {k: np.zeros((sos.shape[0], 2, 2)) for k, sos in self.filters.items()
                   if k != "slow_eye"}
        self.zi["slow_eye"] = np.zeros((self.filters["slow_eye"].shape[0], 1, 2))
        self.zi["background"] = np.zeros((2, 3))
        # Eye position for saccades: leaky integration (the amplifier's AC coupling, ~2 s).
        self.leak = float(np.exp(-1.0 / (2.0 * fs)))
        self.eye = 0.0

    def chunk(self, rng: np.random.Generator, s0: int, s1: int) -> np.ndarray:
        """(sources, s1 - s0) float32 for samples s0..s1 (whole seconds), rows contiguous."""
        n, sps, hemi_corr = s1 - s0, self.sps, 0.8
        sec0, sec1 = s0 // sps, s1 // sps
        src = np.zeros((len(COLUMNS), n), np.float32)
        n_low = n // self.decim
        for kind in RHYTHMS:
            white = rng.standard_normal((2, n_low))
            white[1] = hemi_corr * white[0] + np.sqrt(1 - hemi_corr**2) * white[1]
            if kind == "background":
                low, self.zi[kind] = scipy.signal.lfilter(*PINK, white, axis=1, zi=self.zi[kind])
            else:
                low, self.zi[kind] = scipy.signal.sosfilt(self.filters[kind], white, axis=1,
                                                          zi=self.zi[kind])
            env = np.repeat(self.env.rhythm[kind][sec0:sec1], sps)
            up = _upsample((low * self.norm[kind]).astype(np.float32), self.decim)
            np.multiply(up[0], env, out=src[COLUMN[(kind, "L")]])
            np.multiply(up[1], env, out=src[COLUMN[(kind, "R")]])
        slow, self.zi["slow_eye"] = scipy.signal.sosfilt(
            self.filters["slow_eye"], rng.standard_normal((1, n_low)), axis=1,
            zi=self.zi["slow_eye"])
        slow = _upsample((slow * self.norm["slow_eye"]).astype(np.float32), self.decim)[0]
        src[COLUMN[("eog_h", None)]] = slow * np.repeat(self.env.slow_eye[sec0:sec1], sps)
        self._add_events(src, s0)
        return src

    def _add_events(self, src: np.ndarray, s0: int) -> None:
        """The events overlapping the chunk (one may straddle two), and the gaze they move."""
        n, gaze_row = src.shape[1], COLUMN[("eog_h", None)]
        lo = np.searchsorted(self.starts, s0 - self.longest)
        hi = np.searchsorted(self.starts, s0 + n)
        saccades = np.zeros(n, np.float32)
        for ev in self.events[lo:hi]:
            a, b = ev.start - s0, ev.start - s0 + ev.waveform.shape[0]
            if b <= 0 or a >= n:
                continue
            piece = ev.waveform[max(0, -a) : ev.waveform.shape[0] - max(0, b - n)]
            if ev.column == gaze_row:
                saccades[max(a, 0)] += piece[0]
            else:
                src[ev.column, max(a, 0) : min(b, n)] += piece
        gaze, _ = scipy.signal.lfilter([1.0], [1.0, -self.leak], saccades,
                                       zi=[self.eye * self.leak])
        self.eye = float(gaze[-1])
        src[gaze_row] += gaze.astype(np.float32)


def _upsample(low: np.ndarray, factor: int) -> np.ndarray:
    """(k, n) -> (k, n * factor) by linear interpolation (the last sample is held)."""
    if factor == 1:
        return low
    k, n = low.shape
    up = np.empty((k, n, factor), low.dtype)
    up[:, :, 0] = low
    step = np.empty_like(low)
    np.subtract(low[:, 1:], low[:, :-1], out=step[:, :-1])
    step[:, -1] = 0.0
    for j in range(1, factor):
        up[:, :, j] = low + step * np.float32(j / factor)
    return up.reshape(k, n * factor)
