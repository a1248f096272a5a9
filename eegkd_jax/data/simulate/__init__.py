"""Synthetic paired scalp / ear-EEG nights: the embedded default dataset.

A night is built in layers, each from a generator seeded by ``(seed, subject)`` so the same pair
always gives the same night: the sleeper's traits (``subject``), the true stages
(``hypnogram``), cortical and ocular sources with stage-dependent amplitudes (``sources``), the
electrodes that mix them with their noise and artefacts (``electrodes``), and a scorer whose
labels are a human reading of the stages (``scorer``). Subjects differ in alpha and spindle
frequency, amplitudes, ear coupling and noise, cycle length and stage proportions. Signals are in
microvolts. What each layer is calibrated to, and its published sources: docs/simulator.md.
"""

from __future__ import annotations

import numpy as np

from eegkd_jax.data.recording import UNSCORED, Recording
from eegkd_jax.data.simulate import electrodes, sources
from eegkd_jax.data.simulate.electrodes import CHANNELS, EAR_CHANNELS, SCALP_CHANNELS
from eegkd_jax.data.simulate.hypnogram import simulate_hypnogram
from eegkd_jax.data.simulate.scorer import (SCORER_AGREEMENT, SCORER_AGREEMENT_OVERALL,
                                            score_hypnogram)
from eegkd_jax.data.simulate.subject import SubjectTraits, subject_ids, subject_rng, subject_traits

__all__ = ["EAR_CHANNELS", "SCALP_CHANNELS", "SCORER_AGREEMENT", "SCORER_AGREEMENT_OVERALL",
           "SubjectTraits", "score_hypnogram", "simulate_hypnogram", "simulate_labels",
           "simulate_recording", "subject_ids", "subject_traits"]
EPOCH_SECONDS = 30.0
_CHUNK_EPOCHS = 40  # 20 minutes per chunk bounds the temporaries (~100 MB at 200 Hz)


def simulate_labels(
    subject: str, *, seed: int, hours: float, epoch_seconds: float = EPOCH_SECONDS
) -> tuple[np.ndarray, np.ndarray]:
    """The stages of ``simulate_recording``'s night without its signals: (true stages, scored
    labels), each (epochs,) int8. The scored labels are the recording's except that the few
    movement epochs (-1 there) keep the scorer's stage here: they are drawn after the signals."""
    num_epochs = int(hours * 3600.0 // epoch_seconds)
    traits = subject_traits(subject, seed)
    stages = simulate_hypnogram(subject_rng(subject, seed, 1), num_epochs, traits, epoch_seconds)
    return stages, score_hypnogram(subject_rng(subject, seed, 2), stages)


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
            f"sampling_rate must be a positive whole number of Hz, got {sampling_rate}")
    num_epochs = int(hours * 3600.0 // EPOCH_SECONDS)
    if num_epochs < 1:
        raise ValueError(f"hours={hours} is shorter than one 30-s epoch")
    epoch_samples = int(EPOCH_SECONDS * fs)
    num_seconds = num_epochs * int(EPOCH_SECONDS)

    # One generator for the whole night, drawn in this order (the order is part of the seed).
    traits = subject_traits(subject, seed)
    rng = subject_rng(subject, seed, 1)
    stages = simulate_hypnogram(rng, num_epochs, traits, EPOCH_SECONDS)
    envelopes = sources.envelopes(rng, stages, traits, EPOCH_SECONDS)
    mixing = electrodes.mixing(rng, traits)
    cortex = sources.Sources(rng, envelopes, sources.events(rng, envelopes, traits, fs), traits,
                             fs)
    noise = electrodes.Noise(rng, traits, fs, num_seconds, _CHUNK_EPOCHS * epoch_samples)

    n_scalp = len(SCALP_CHANNELS)
    scalp = np.empty((num_epochs * epoch_samples, n_scalp), np.float32)
    ear = np.empty((num_epochs * epoch_samples, len(CHANNELS) - n_scalp), np.float32)
    for e0 in range(0, num_epochs, _CHUNK_EPOCHS):
        s0, s1 = e0 * epoch_samples, min(num_epochs, e0 + _CHUNK_EPOCHS) * epoch_samples
        mixed = mixing.T @ cortex.chunk(rng, s0, s1)  # (channels, time)
        noise.add(rng, mixed, envelopes.muscle, s0)
        scalp[s0:s1] = mixed[:n_scalp].T
        ear[s0:s1] = mixed[n_scalp:].T

    # The scorer draws from its own stream, so switching it off leaves every signal as it was.
    labels = (score_hypnogram(subject_rng(subject, seed, 2), stages) if scorer_disagreement
              else stages.copy())
    movement = electrodes.movement_epochs(rng, stages)
    labels[movement] = UNSCORED
    for epoch in movement:
        electrodes.add_movement(rng, scalp, ear, epoch * epoch_samples, epoch_samples, fs)
    electrodes.add_pops(rng, ear, fs, num_seconds)
    rejected = electrodes.kill_electrodes(rng, ear, fs)
    return Recording(
        subject=subject, source=f"simulated:{subject}:seed={seed}", sampling_rate=fs,
        scalp=scalp, scalp_channels=SCALP_CHANNELS, ear=ear, ear_channels=EAR_CHANNELS,
        labels=labels.astype(np.int8), epoch_seconds=EPOCH_SECONDS,
        rejected_channels=frozenset(rejected), true_labels=stages.astype(np.int8),
    )
