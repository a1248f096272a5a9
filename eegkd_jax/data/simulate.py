"""Synthetic paired scalp / ear-EEG nights: the embedded default dataset.

A night is built in three layers, each drawn from a generator seeded by ``(seed, subject)`` so the
same pair always gives the same night:

1. A hypnogram (``simulate_hypnogram``): sleep-onset latency, then ~90-minute cycles in which N3 is
   long early and vanishes late while REM grows, brief awakenings followed by N1, and a final wake.
   Nights shorter than ~7 h are time-compressed whole nights, so even a 20-minute test night holds
   every stage.
2. Cortical and ocular sources with stage-dependent amplitudes: a 1/f background, delta (N3), theta
   (N1, REM), alpha (wake with eyes closed), spindles and K-complexes (N2), vertex waves (N1),
   sawtooth waves and rapid eye movements (REM), blinks and saccades (wake), slow eye movements
   (N1), muscle (wake, lowest in REM). Rhythms have a left and a right hemisphere version that are
   correlated but not equal, so a left-minus-right derivation still sees some of them.
3. Electrodes: each raw channel is a weighted sum of the sources (a fixed topography: occipital
   electrodes see alpha best, central ones spindles and vertex waves, frontal ones delta,
   K-complexes and blinks, the ears horizontal eye movements) minus the common reference, plus
   per-electrode noise and muscle. Ear electrodes sit close together and far from the cortex:
   they see the cortical sources attenuated, nearly equally within one ear (so ear derivations
   cancel much of them), with more noise (including slow electrode-skin noise whose level wanders
   with contact quality), electrode pops, movement artefacts, and per subject the odd dead
   electrode (flat, or disconnected and noisy), which is listed in ``Recording.rejected_channels``.

4. A scorer (``score_hypnogram``): the labels are what a human would write, not the true stages.
   Each epoch is misread at the rate published for its stage (AASM inter-scorer program: N1
   lowest), more often next to a stage change, and into a neighbouring stage. The true stages stay
   in ``Recording.true_labels`` for analysis.

Subjects differ in alpha and spindle frequency, amplitudes, ear coupling and noise, cycle length
and stage proportions. Signals are in microvolts.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import scipy.signal

from eegkd_jax.data.recording import UNSCORED, Recording

W, N1, N2, N3, REM = range(5)

SCALP_CHANNELS: tuple[str, ...] = ("C3", "C4", "O1", "O2", "A1", "A2", "F3", "F4")
EAR_CHANNELS: tuple[str, ...] = (
    "ELA", "ELB", "ELE", "ELG", "ELI", "ELK",
    "ERA", "ERB", "ERE", "ERG", "ERI", "ERK",
)  # fmt: skip
_EAR_CONCHA = frozenset({"ELA", "ELB", "ERA", "ERB"})

# Region and side of each electrode; the reference sits on the midline near the nose.
_REGION = {"C": "central", "O": "occipital", "A": "mastoid", "F": "frontal", "E": "ear"}
_CHANNELS = SCALP_CHANNELS + EAR_CHANNELS

# Relative gain of each source kind in each region (unitless; amplitudes live in the stage tables).
# Why these shapes: alpha is posterior, spindles and vertex waves central, delta and K-complexes
# frontal; mastoids and ears are far from all of them.
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
_REGION_INDEX = {"frontal": 0, "central": 1, "occipital": 2, "mastoid": 3, "ear": 4, "reference": 5}
# One global factor on every ear electrode's view of the cortex (1.0 = the topography above), the
# knob for calibrating how much harder ear-EEG is than scalp EEG. Published: on EESM17, automatic
# 5-stage scoring from ear-EEG against manual PSG scoring reached Cohen's kappa "in the range
# 0.5-0.8" across the 9 subjects (Mikkelsen et al. 2017, BioMed Eng OnLine 16:111, abstract);
# manual scalp scoring agrees with itself at kappa 0.76 (two scorers, AASM rules, 72 SIESTA
# nights: Danker-Hopfe et al. 2009, J Sleep Res 18:74-84, abstract). We found no published
# feature-classifier kappa from scalp EEG on EESM17, so the published ear-minus-scalp gap is taken
# as 0.65 (mid-range) - 0.76 = -0.11, spanning -0.26 to +0.04 over the ear range. Measured with
# the floor (eegkd_jax.baseline, band powers + logistic regression, LOSO over the 9 x 2-h nights
# of configs/online_kd.py, against the scored labels), 2026-12-04: scalp 0.70 +- 0.07, ear
# 0.61 +- 0.10 (per subject 0.51-0.76), gap -0.09: inside the published span, so 1.0 is kept.
EAR_COUPLING_SCALE = 1.0
_IPSI, _CONTRA = 1.0, 0.35  # how much an electrode sees its own vs the other hemisphere

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
# Muscle microvolts per region: temporalis and jaw muscles sit right by the ears and mastoids.
_MUSCLE_UV = {"frontal": 3.0, "central": 1.5, "occipital": 2.5, "mastoid": 5.0, "ear": 8.0}


def subject_ids(count: int) -> list[str]:
    """The simulated cohort's ids: ``["sim-01", ..., "sim-NN"]`` (zero-padded, sorted)."""
    if count < 1:
        raise ValueError(f"a simulated cohort needs at least one subject, got {count}")
    width = max(2, len(str(count)))
    return [f"sim-{i:0{width}d}" for i in range(1, count + 1)]


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


def _subject_rng(subject: str, seed: int, stream: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng([int(seed), zlib.crc32(subject.encode()), stream])


def subject_traits(subject: str, seed: int) -> SubjectTraits:
    """Draws one subject's traits; deterministic given ``(subject, seed)``."""
    r = _subject_rng(subject, seed, 0)
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


# --------------------------------------------------------------------------------------------------
# Hypnogram


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
    """A plausible hypnogram of ``num_epochs`` scored epochs (no unscored ones).

    Returns:
      (num_epochs,) int8 stages in 0..4.
    """
    minutes = num_epochs * epoch_seconds / 60.0
    # Short nights are compressed whole nights: a test night of 20 minutes still has every stage.
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


# --------------------------------------------------------------------------------------------------
# The scorer: labels are a human reading of the night, not the night itself

# Per-stage agreement of one scorer with the majority of >2,500 scorers in the AASM inter-scorer
# reliability program (Rosenberg & Van Hout 2013, J Clin Sleep Med 9(1):81-87,
# doi:10.5664/jcsm.2350; 9 record fragments, 1,800 epochs, >3.2 million scoring decisions):
# overall 82.6 %, N1 63.0 %, N3 67.4 %, REM 90.5 % (abstract; REM's 90.5 % also in Penzel et al.
# 2013, J Clin Sleep Med 9(1):89, the editorial on it). W 84.1 % and N2 85.2 % are the paper's
# per-stage values as quoted to us; the abstract we could read says only that "N2 and W approach"
# REM's level, so those two are not checked against the text. The majority score is the nearest
# thing to a true stage a human panel gives, so these are read as P(scorer writes the true stage
# | true stage).
SCORER_AGREEMENT = (0.841, 0.630, 0.852, 0.674, 0.905)  # W N1 N2 N3 REM
SCORER_AGREEMENT_OVERALL = 0.826  # the same paper's overall figure, for the tests
# Where a disagreeing scorer's label goes, away from a stage boundary. Rosenberg & Van Hout 2013
# name N2/N3 as "particularly difficult" and the W->N1, N1->N2 and N2->R boundaries; the study
# "Interrater agreement between American and Chinese sleep centers according to the 2014 AASM
# standard" (40 PSGs, 37,642 epochs; we read its abstract only and could not check its authors,
# year or journal) found N2-N3 (22.1 %), W-N1 (19.7 %) and N1-N2 (18.8 %) the most frequent
# disagreements. The split below follows that order (neighbouring stages only);
# its exact shares are our design choice, not a published table.
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
# Rosenberg & Van Hout 2013 found most disagreement at transitions (last W before sleep onset,
# first N2 after N1, first R after N2) but give no ratio; 4 is our choice, and the per-stage rates
# above stay exact whatever it is (see ``score_hypnogram``).
_TRANSITION_WEIGHT = 4.0
# A scorer misreads stretches, not lone epochs (a run of borderline slow-wave epochs all called N2):
# the misread/keep decision and the stage chosen are shared within runs of consecutive epochs of
# mean length 4 (2 minutes). Our design choice, not a published figure; it keeps the per-epoch
# rates above exact and only decides how the misreads cluster. Independent per-epoch misreads cut
# the scored N3 bouts to a mean of 1.2 minutes, against 3.0 (Sleep-EDF) and 5.3 (EESM17) measured
# in benchmarks/results/2026-12-04-hypnogram-distance.json.
_MISREAD_RUN_EPOCHS = 4.0


def score_hypnogram(rng: np.random.Generator, stages: np.ndarray) -> np.ndarray:
    """What a human scorer writes for a night whose true stages are ``stages``.

    Design: each epoch is misread with a probability that depends on its true stage (one minus
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


def simulate_labels(
    subject: str, *, seed: int, hours: float, epoch_seconds: float = 30.0
) -> tuple[np.ndarray, np.ndarray]:
    """The stages of ``simulate_recording``'s night without its signals: (true stages, scored
    labels), each (epochs,) int8. The scored labels are the recording's except that the few
    movement epochs (-1 there) keep the scorer's stage here: they are drawn after the signals."""
    num_epochs = int(hours * 3600.0 // epoch_seconds)
    traits = subject_traits(subject, seed)
    stages = simulate_hypnogram(_subject_rng(subject, seed, 1), num_epochs, traits, epoch_seconds)
    return stages, score_hypnogram(_subject_rng(subject, seed, 2), stages)


# --------------------------------------------------------------------------------------------------
# Sources


def _per_second(table, stage_sec: np.ndarray, smooth_seconds: int = 5) -> np.ndarray:
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


def _event_times(rng: np.random.Generator, rate_per_sec: np.ndarray) -> np.ndarray:
    """Seconds (float) of a Poisson process whose rate changes every second."""
    counts = rng.poisson(rate_per_sec)
    secs = np.repeat(np.arange(rate_per_sec.shape[0]), counts)
    return secs + rng.random(secs.shape[0])


@dataclasses.dataclass
class _Event:
    column: int  # source column it is added to
    start: int  # sample
    waveform: np.ndarray  # (n,) float32 microvolts


def _spindle(rng, fs, traits) -> np.ndarray:
    dur = rng.uniform(0.5, 2.0)
    t = np.arange(int(dur * fs)) / fs
    freq = traits.spindle_hz + rng.normal(0.0, 0.6)
    # waxing-waning envelope: a raised-cosine window
    env = 0.5 - 0.5 * np.cos(2 * np.pi * t / dur)
    return rng.uniform(12.0, 30.0) * env * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))


def _kcomplex(rng, fs) -> np.ndarray:
    # A sharp negative wave followed by a slower positive one, ~1 s in all, 70-140 uV.
    t = np.arange(int(1.2 * fs)) / fs
    amp = rng.uniform(70.0, 140.0)
    neg = -np.exp(-(((t - 0.25) / 0.09) ** 2))
    pos = 0.6 * np.exp(-(((t - 0.65) / 0.2) ** 2))
    return amp * (neg + pos)


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
    env = np.sin(np.pi * t / dur)
    return rng.uniform(20.0, 40.0) * 2.0 * wave * env


def _blink(rng, fs) -> np.ndarray:
    t = np.arange(int(0.5 * fs)) / fs
    return rng.uniform(80.0, 200.0) * np.exp(-(((t - 0.2) / 0.07) ** 2))


def _gains(
    traits: SubjectTraits, rng: np.random.Generator, columns: list
) -> tuple[np.ndarray, np.ndarray]:
    """(n_sources, n_electrodes) gains for the electrodes, and (n_sources,) for the reference."""
    gains = np.zeros((len(columns), len(_CHANNELS)), np.float32)
    ref = np.zeros(len(columns), np.float32)
    # Within-ear differences are small (electrodes ~1 cm apart): the concha pair sees a little more.
    ear_jitter = {
        name: (1.12 if name in _EAR_CONCHA else 0.92) * rng.uniform(0.93, 1.07)
        for name in EAR_CHANNELS
    }
    for e, name in enumerate(_CHANNELS):
        region = "ear" if name in EAR_CHANNELS else _REGION[name[0]]
        side = "L" if (name[-1] in "13" or name.startswith("EL")) else "R"
        for s, (kind, hemi) in enumerate(columns):
            if kind in _TOPOGRAPHY:
                g = _TOPOGRAPHY[kind][_REGION_INDEX[region]]
                if hemi is not None:
                    g *= _IPSI if hemi == side else _CONTRA
                else:
                    g *= 0.5 * (_IPSI + _CONTRA)
                if region == "ear":
                    g *= EAR_COUPLING_SCALE * traits.ear_coupling * ear_jitter[name]
            elif (
                kind == "eog_h"
            ):  # horizontal dipole: left-side electrodes positive for leftward gaze
                sign = 1.0 if side == "L" else -1.0
                g = (
                    sign
                    * {
                        "frontal": 0.15,
                        "central": 0.04,
                        "occipital": 0.02,
                        "mastoid": 0.25,
                        "ear": 0.25 if name in _EAR_CONCHA else 0.2,
                    }[region]
                )
            elif kind == "eog_v":  # blinks and vertical movements: frontal, weak elsewhere
                g = {
                    "frontal": 0.5,
                    "central": 0.15,
                    "occipital": 0.03,
                    "mastoid": 0.08,
                    "ear": 0.1,
                }[region]
            else:
                raise AssertionError(kind)
            gains[s, e] = g
    for s, (kind, _) in enumerate(columns):
        if kind in _TOPOGRAPHY:
            ref[s] = _TOPOGRAPHY[kind][_REGION_INDEX["reference"]] * 0.5 * (_IPSI + _CONTRA)
        elif kind == "eog_v":
            ref[s] = 0.9  # a nose-side reference sits right by the eyes
    return gains, ref


def simulate_recording(
    subject: str,
    *,
    seed: int,
    hours: float,
    sampling_rate: float = 200.0,
    scorer_disagreement: bool = True,
) -> Recording:
    """Simulates one paired scalp / ear-EEG night.

    Args:
      subject: subject id, e.g. ``"sim-03"``; it seeds the subject's traits and the night.
      seed: cohort seed; the same (subject, seed) always gives the same night.
      hours: recording length; rounded down to whole 30-s epochs (at least one).
      sampling_rate: Hz; must be a whole number so that a second holds whole samples.
      scorer_disagreement: if True (the default) ``labels`` are what a human scorer would write
        (``score_hypnogram``: published inter-scorer agreement, lowest for N1); if False they are
        the true stages. Either way the signals are the same and ``true_labels`` holds the truth.

    Returns:
      A ``Recording`` with scalp (T, 8) electrodes ``SCALP_CHANNELS`` and ear (T, 12) electrodes
      ``EAR_CHANNELS``, float32 microvolts against a common reference, T = epochs * 30 * fs; labels
      (epochs,) int8 as scored, with a few movement epochs marked -1; ``true_labels`` (epochs,)
      int8 the stages the signals were made from (no -1); ``rejected_channels`` the ear
      electrodes simulated as dead.
    """
    fs = float(sampling_rate)
    if fs <= 0 or fs != int(fs):
        raise ValueError(
            f"sampling_rate must be a positive whole number of Hz, got {sampling_rate}"
        )
    epoch_seconds = 30.0
    num_epochs = int(hours * 3600.0 // epoch_seconds)
    if num_epochs < 1:
        raise ValueError(f"hours={hours} is shorter than one 30-s epoch")
    sps = int(fs)  # samples per second
    num_seconds = num_epochs * int(epoch_seconds)
    total = num_seconds * sps

    traits = subject_traits(subject, seed)
    rng = _subject_rng(subject, seed, 1)
    stages = simulate_hypnogram(rng, num_epochs, traits, epoch_seconds)
    stage_sec = np.repeat(stages, int(epoch_seconds))

    # ---- per-second amplitude envelopes ------------------------------------------------------
    amp = traits.amplitude
    rhythm_env = {}
    for kind, table in _RHYTHM_UV.items():
        # Epochs of one stage are not all alike: each rhythm's amplitude wanders from epoch to
        # epoch, which is what makes N1/N2 and N2/N3 boundaries ambiguous in real recordings.
        jitter = np.repeat(np.exp(rng.normal(0.0, 0.3, num_epochs)), int(epoch_seconds))
        rhythm_env[kind] = (
            _per_second(np.asarray(table)[stage_sec] * jitter, np.arange(num_seconds)) * amp
        )
    rhythm_env["delta"] *= traits.delta_gain
    eyes_closed = _bouts_mask(rng, stage_sec == W, traits.eyes_closed_fraction, 20.0)
    closed_env = _per_second(np.where(eyes_closed, 1.0, 0.0), np.arange(num_seconds), 3)
    rhythm_env["alpha"] = rhythm_env["alpha"] + closed_env * (_ALPHA_EYES_CLOSED_UV * amp)
    slow_eye_env = _per_second(_SLOW_EYE_UV, stage_sec, 9)
    muscle_env = _per_second(_MUSCLE, stage_sec, 3)
    # Wake muscle tone comes and goes (jaw clenching, swallowing, shifting).
    muscle_env *= np.where((stage_sec == W) & (rng.random(num_seconds) < 0.15), 3.0, 1.0).astype(
        np.float32
    )

    # ---- source columns: rhythms (L/R), events, eye movements ---------------------------------
    rhythm_kinds = ["background", "delta", "theta", "alpha"]
    columns = [(k, h) for k in rhythm_kinds for h in ("L", "R")]
    columns += [
        ("spindle", "L"),
        ("spindle", "R"),
        ("kcomplex", None),
        ("vertex", None),
        ("sawtooth", None),
        ("eog_h", None),
        ("eog_v", None),
    ]
    col = {c: i for i, c in enumerate(columns)}
    gains, ref_gain = _gains(traits, rng, columns)
    raw_gains = (
        gains - ref_gain[:, None]
    )  # common reference: every channel minus the reference site

    # Sparse events, placed by a per-second Poisson rate (phasic REM comes in bursts).
    phasic = _bouts_mask(rng, stage_sec == REM, 0.4, 15.0)
    eyes_open_wake = (stage_sec == W) & ~eyes_closed
    events: list[_Event] = []
    for kind, rates in _EVENTS_PER_MINUTE.items():
        rate = np.asarray(rates, np.float64)[stage_sec] / 60.0
        if kind == "saccade":
            rate = rate * np.where(stage_sec == REM, np.where(phasic, 2.2, 0.2), 1.0)
            rate = rate * np.where(stage_sec == W, eyes_open_wake * 1.6 + 0.2, 1.0)
        elif kind == "sawtooth":
            rate = rate * np.where(phasic, 2.0, 0.3)
        elif kind == "blink":
            rate = rate * np.where(stage_sec == W, eyes_open_wake, 1.0)
        for t in _event_times(rng, rate):
            start = int(t * fs)
            if kind == "spindle":
                wave = _spindle(rng, fs, traits)
                # spindles are bilateral with unequal sides
                events.append(
                    _Event(
                        col[("spindle", "L")],
                        start,
                        (wave * rng.uniform(0.7, 1.2)).astype(np.float32),
                    )
                )
                events.append(
                    _Event(
                        col[("spindle", "R")],
                        start,
                        (wave * rng.uniform(0.7, 1.2)).astype(np.float32),
                    )
                )
                continue
            if kind == "saccade":
                # a step in horizontal gaze; the eye position signal is built by integration below
                events.append(
                    _Event(
                        col[("eog_h", None)],
                        start,
                        np.float32([rng.choice([-1, 1]) * rng.uniform(60, 200)]),
                    )
                )
                continue
            wave = {
                "kcomplex": _kcomplex,
                "vertex": _vertex,
                "sawtooth": _sawtooth,
                "blink": _blink,
            }[kind](rng, fs)
            target = col[("eog_v", None)] if kind == "blink" else col[(kind, None)]
            events.append(
                _Event(target, start, (wave * (amp if kind != "blink" else 1.0)).astype(np.float32))
            )
    events.sort(key=lambda ev: ev.start)
    event_starts = np.array([ev.start for ev in events], np.int64)
    max_event = max((ev.waveform.shape[0] for ev in events), default=1)

    # Narrow-band filters run at half rate (all rhythms are below 16 Hz); their states carry over
    # from chunk to chunk.
    decim = 2 if sps % 2 == 0 and fs >= 100 else 1
    fs_low = fs / decim

    def band(lo, hi):
        return scipy.signal.butter(
            2, [lo, min(hi, 0.45 * fs_low)], btype="band", fs=fs_low, output="sos"
        )

    filters = {
        "delta": band(0.5, 2.0),
        "theta": band(4.0, 7.0),
        "alpha": band(traits.alpha_hz - 1.2, traits.alpha_hz + 1.2),
        "slow_eye": scipy.signal.butter(1, [0.1, 0.5], btype="band", fs=fs_low, output="sos"),
    }
    # 1/f ("pink") background: a 3-pole approximation to a -10 dB/decade slope.
    pink_b = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
    pink_a = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])
    # Unit-variance scale of each filter, measured once on a white-noise probe.
    probe = rng.standard_normal(int(60 * fs_low))
    norm = {
        k: 1.0 / np.std(scipy.signal.sosfilt(sos, probe)[int(10 * fs_low) :])
        for k, sos in filters.items()
    }
    norm["background"] = 1.0 / np.std(
        scipy.signal.lfilter(pink_b, pink_a, probe)[int(10 * fs_low) :]
    )
    zi = {k: np.zeros((sos.shape[0], 2, 2)) for k, sos in filters.items() if k != "slow_eye"}
    zi["slow_eye"] = np.zeros((filters["slow_eye"].shape[0], 1, 2))
    zi_pink = np.zeros((2, 3))
    hemi_corr = 0.8  # left and right versions of a rhythm are correlated, not identical

    # Eye position for saccades: leaky integration (the amplifier's AC coupling, ~2 s).
    leak = float(np.exp(-1.0 / (2.0 * fs)))
    eye_state = 0.0

    # Per-electrode noise is cut from pools of white and 1/f noise at a random offset per chunk and
    # channel: independent-looking noise without drawing 20 x T fresh normals.
    chunk_epochs = 40  # 20 minutes per chunk bounds the temporaries (~100 MB at 200 Hz)
    epoch_samples = int(epoch_seconds * sps)
    chunk_samples = chunk_epochs * epoch_samples
    pool_size = 2 * chunk_samples + 1
    white_pool = rng.standard_normal(pool_size).astype(np.float32)
    pink_pool = scipy.signal.lfilter(pink_b, pink_a, rng.standard_normal(pool_size))
    pink_pool = (pink_pool / pink_pool[int(10 * fs) :].std()).astype(np.float32)
    n_ch = len(_CHANNELS)
    n_scalp = len(SCALP_CHANNELS)
    regions = ["ear" if n in EAR_CHANNELS else _REGION[n[0]] for n in _CHANNELS]
    is_ear = np.array([r == "ear" for r in regions])
    noise_uv = np.where(is_ear, traits.ear_noise_uv, traits.scalp_noise_uv).astype(np.float32)
    drift_uv = np.where(is_ear, traits.ear_drift_uv, 1.0).astype(np.float32)
    muscle_uv = np.array([_MUSCLE_UV[r] for r in regions], np.float32)
    # Ear contact quality wanders (sweat, pressure on the pillow): a slow log-normal modulation of
    # each ear electrode's noise, changing over tens of seconds.
    walk = np.cumsum(rng.normal(0.0, 0.15, (n_ch, num_seconds)), axis=1)
    walk -= _moving_average(walk, 120)  # keep the walk from drifting off over the night
    contact = np.where(is_ear[:, None], np.exp(0.8 * walk), 1.0).astype(np.float32)

    scalp = np.empty((total, n_scalp), np.float32)
    ear = np.empty((total, n_ch - n_scalp), np.float32)

    for e0 in range(0, num_epochs, chunk_epochs):
        e1 = min(num_epochs, e0 + chunk_epochs)
        s0, s1 = e0 * epoch_samples, e1 * epoch_samples
        n = s1 - s0
        sec0, sec1 = e0 * int(epoch_seconds), e1 * int(epoch_seconds)
        src = np.zeros((len(columns), n), np.float32)  # (sources, time): rows stay contiguous

        # rhythms, generated at the low rate and linearly interpolated up
        n_low = n // decim
        for kind in rhythm_kinds:
            white = rng.standard_normal((2, n_low))
            white[1] = hemi_corr * white[0] + np.sqrt(1 - hemi_corr**2) * white[1]
            if kind == "background":
                low, zi_pink = scipy.signal.lfilter(pink_b, pink_a, white, axis=1, zi=zi_pink)
            else:
                low, zi[kind] = scipy.signal.sosfilt(filters[kind], white, axis=1, zi=zi[kind])
            env = np.repeat(rhythm_env[kind][sec0:sec1], sps)
            up = _upsample((low * norm[kind]).astype(np.float32), decim)
            np.multiply(up[0], env, out=src[col[(kind, "L")]])
            np.multiply(up[1], env, out=src[col[(kind, "R")]])
        slow, zi["slow_eye"] = scipy.signal.sosfilt(
            filters["slow_eye"], rng.standard_normal((1, n_low)), axis=1, zi=zi["slow_eye"]
        )
        slow = _upsample((slow * norm["slow_eye"]).astype(np.float32), decim)[0]
        src[col[("eog_h", None)]] = slow * np.repeat(slow_eye_env[sec0:sec1], sps)

        # events overlapping this chunk (an event may straddle two chunks)
        lo = np.searchsorted(event_starts, s0 - max_event)
        hi = np.searchsorted(event_starts, s1)
        saccades = np.zeros(n, np.float32)
        for ev in events[lo:hi]:
            a, b = ev.start - s0, ev.start - s0 + ev.waveform.shape[0]
            if b <= 0 or a >= n:
                continue
            piece = ev.waveform[max(0, -a) : ev.waveform.shape[0] - max(0, b - n)]
            if ev.column == col[("eog_h", None)]:
                saccades[max(a, 0)] += piece[0]
            else:
                src[ev.column, max(a, 0) : min(b, n)] += piece
        gaze, _ = scipy.signal.lfilter([1.0], [1.0, -leak], saccades, zi=[eye_state * leak])
        eye_state = float(gaze[-1])
        src[col[("eog_h", None)]] += gaze.astype(np.float32)

        mixed = raw_gains.T @ src  # (channels, time)
        del src

        # per-electrode noise: white floor, 1/f contact noise, and muscle (the first difference of
        # white noise, i.e. mostly high frequencies)
        mus_env = np.repeat(muscle_env[sec0:sec1], sps)
        for c in range(n_ch):
            o1, o2, o3 = rng.integers(0, pool_size - n - 1, 3)
            noise = white_pool[o1 : o1 + n] * noise_uv[c] + pink_pool[o2 : o2 + n] * drift_uv[c]
            if is_ear[c]:
                noise *= np.repeat(contact[c, sec0:sec1], sps)
            muscle = white_pool[o3 + 1 : o3 + 1 + n] - white_pool[o3 : o3 + n]
            muscle *= mus_env
            mixed[c] += noise
            mixed[c] += muscle * np.float32(np.sqrt(0.5) * muscle_uv[c])
        scalp[s0:s1] = mixed[:n_scalp].T
        ear[s0:s1] = mixed[n_scalp:].T
        del mixed

    # The scorer draws from its own stream, so switching it off leaves every signal as it was.
    if scorer_disagreement:
        labels = score_hypnogram(_subject_rng(subject, seed, 2), stages)
    else:
        labels = stages.copy()
    movement = _movement_epochs(rng, stages)
    labels[movement] = UNSCORED
    for ep in movement:
        _add_movement(rng, scalp, ear, ep * epoch_samples, epoch_samples, fs)
    _add_pops(rng, ear, fs, num_seconds)
    rejected = _kill_electrodes(rng, ear, fs)

    return Recording(
        subject=subject,
        source=f"simulated:{subject}:seed={seed}",
        sampling_rate=fs,
        scalp=scalp,
        scalp_channels=SCALP_CHANNELS,
        ear=ear,
        ear_channels=EAR_CHANNELS,
        labels=labels.astype(np.int8),
        epoch_seconds=epoch_seconds,
        rejected_channels=frozenset(rejected),
        true_labels=stages.astype(np.int8),
    )


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average along the last axis, same length (edges use the partial window)."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    n = x.shape[-1]
    hi = np.minimum(np.arange(n) + width // 2 + 1, n)
    lo = np.maximum(np.arange(n) - width // 2, 0)
    return (c[..., hi] - c[..., lo]) / (hi - lo)


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


def _movement_epochs(rng: np.random.Generator, stages: np.ndarray) -> np.ndarray:
    """A few epochs per night that a scorer would mark as movement: mostly at wake transitions."""
    n = stages.shape[0]
    wanted = max(1, int(rng.poisson(0.008 * n))) if n >= 20 else 0
    transitions = np.flatnonzero(np.diff(stages.astype(np.int16)) != 0) + 1
    near_wake = transitions[(stages[transitions] == W) | (stages[transitions - 1] == W)]
    pool = near_wake if near_wake.size >= wanted else np.arange(n)
    return np.sort(rng.choice(pool, size=min(wanted, pool.size), replace=False))


def _add_movement(rng, scalp, ear, start, length, fs) -> None:
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


def _add_pops(rng, ear, fs, num_seconds) -> None:
    """Electrode pops on the ear: a sudden step that decays over about a second (~1 per 20 min)."""
    for c in range(ear.shape[1]):
        for t in _event_times(rng, np.full(num_seconds, 1.0 / 1200.0)):
            start = int(t * fs)
            tau = rng.uniform(0.3, 1.5)
            n = min(int(4 * tau * fs), ear.shape[0] - start)
            if n <= 0:
                continue
            step = rng.choice([-1.0, 1.0]) * rng.uniform(50.0, 300.0)
            ear[start : start + n, c] += (step * np.exp(-np.arange(n) / (tau * fs))).astype(
                np.float32
            )


def _kill_electrodes(rng, ear, fs) -> list[str]:
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
