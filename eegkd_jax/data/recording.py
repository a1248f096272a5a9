"""The two record types that every stage of the data flow passes along.

``Recording`` is one night as read from disk (or simulated): raw electrode signals split into a scalp
group and an ear group, the sampling rate, and one label per scored 30-s epoch. ``PairedNight`` is the
same night after derivation and preprocessing: the scalp derivations the teacher sees and the ear
derivations the student sees, sample-aligned, at the model rate, trimmed to whole epochs.

Conventions (see DESIGN.md): arrays are (time, channels); labels are 0=W 1=N1 2=N2 3=N3 4=REM and
-1 for epochs that were not scored (artefact, movement, unscored), which stay in the data for context
and are masked out of every loss and metric.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STAGES: tuple[str, ...] = ("W", "N1", "N2", "N3", "REM")
NUM_CLASSES = len(STAGES)
UNSCORED = -1


class DataError(ValueError):
    """Bad input data. The message always names the file (or subject) and what is wrong with it."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def _check_labels(source: str, labels: np.ndarray) -> None:
    if labels.ndim != 1:
        raise DataError(source, f"labels must be 1-D (epochs,), got shape {labels.shape}")
    bad = np.setdiff1d(np.unique(labels), np.arange(-1, NUM_CLASSES))
    if bad.size:
        raise DataError(source, f"label values {bad.tolist()} are outside -1..{NUM_CLASSES - 1}")


def _check_signal(source: str, what: str, signal: np.ndarray, names: tuple[str, ...]) -> None:
    if signal.ndim != 2:
        raise DataError(source, f"{what} signals must be (time, channels), got shape {signal.shape}")
    if signal.shape[1] != len(names):
        raise DataError(
            source, f"{what} signals have {signal.shape[1]} channels but {len(names)} names {names}"
        )
    if len(set(names)) != len(names):
        raise DataError(source, f"duplicate {what} channel names in {names}")
    if signal.size and not np.all(np.isfinite(signal)):
        bad_channels = [n for n, ok in zip(names, np.isfinite(signal).all(axis=0)) if not ok]
        raise DataError(source, f"{what} channels {bad_channels} contain NaN or infinite samples")


@dataclasses.dataclass(frozen=True, eq=False)
class Recording:
    """One night of raw electrode signals and its hypnogram.

    Attributes:
      subject: subject id, e.g. ``"sub-001"``.
      source: where it came from (a file path, or ``"simulated:seed=3"``); used in error messages.
      sampling_rate: Hz, the same for every channel.
      scalp: (time, n_scalp) float32 scalp electrode signals in microvolts (may have 0 channels).
      scalp_channels: names of the scalp columns, e.g. ``("C3", "O1", "A1", ...)``.
      ear: (time, n_ear) float32 ear electrode signals in microvolts (may have 0 channels).
      ear_channels: names of the ear columns, e.g. ``("ELA", "ELB", ..., "ERK")``.
      labels: (epochs,) int8 stages per epoch; epoch i covers samples
        ``[i * epoch_samples, (i + 1) * epoch_samples)``.
      epoch_seconds: scoring epoch length, 30 s for AASM scoring.
      rejected_channels: electrodes known to be bad for this night (the per-subject mask); the
        montage leaves them out of every average.
      true_labels: (epochs,) int8 stages the night really went through, where they are known apart
        from the scoring (the simulator's hypnogram before its simulated scorer read it); ``None``
        for real recordings, whose only stages are the scorer's ``labels``. For analysis only: no
        loss or metric of the models reads it.
    """

    subject: str
    source: str
    sampling_rate: float
    scalp: np.ndarray
    scalp_channels: tuple[str, ...]
    ear: np.ndarray
    ear_channels: tuple[str, ...]
    labels: np.ndarray
    epoch_seconds: float = 30.0
    rejected_channels: frozenset[str] = frozenset()
    true_labels: np.ndarray | None = None

    def __post_init__(self):
        if self.sampling_rate <= 0:
            raise DataError(self.source, f"sampling rate must be positive, got {self.sampling_rate}")
        _check_signal(self.source, "scalp", self.scalp, tuple(self.scalp_channels))
        _check_signal(self.source, "ear", self.ear, tuple(self.ear_channels))
        if self.scalp.shape[0] != self.ear.shape[0]:
            raise DataError(
                self.source,
                f"scalp has {self.scalp.shape[0]} samples but ear has {self.ear.shape[0]}",
            )
        _check_labels(self.source, self.labels)
        if self.true_labels is not None:
            _check_labels(self.source, self.true_labels)
            if self.true_labels.shape != self.labels.shape:
                raise DataError(
                    self.source,
                    f"true_labels have shape {self.true_labels.shape} but labels {self.labels.shape}",
                )
        needed = int(round(self.labels.shape[0] * self.epoch_samples))
        if self.num_samples < needed:
            raise DataError(
                self.source,
                f"{self.labels.shape[0]} scored epochs of {self.epoch_seconds:g} s need {needed} "
                f"samples at {self.sampling_rate:g} Hz but the signal has only {self.num_samples}",
            )
        unknown = set(self.rejected_channels) - set(self.scalp_channels) - set(self.ear_channels)
        if unknown:
            raise DataError(self.source, f"rejected channels {sorted(unknown)} are not in the recording")

    @property
    def num_samples(self) -> int:
        return int(self.scalp.shape[0])

    @property
    def epoch_samples(self) -> float:
        return self.epoch_seconds * self.sampling_rate

    @property
    def duration_seconds(self) -> float:
        return self.num_samples / self.sampling_rate

    def stage_counts(self) -> dict[str, int]:
        """Epochs per stage, plus ``"unscored"`` for label -1."""
        counts = {name: int(np.sum(self.labels == i)) for i, name in enumerate(STAGES)}
        counts["unscored"] = int(np.sum(self.labels == UNSCORED))
        return counts


@dataclasses.dataclass(frozen=True, eq=False)
class PairedNight:
    """One night as the models see it: scalp and ear derivations, aligned, whole epochs only.

    Attributes:
      subject: subject id.
      sampling_rate: the model rate in Hz (200 by default).
      epoch_samples: samples per scoring epoch (6000 for 30 s at 200 Hz).
      scalp: (epochs * epoch_samples, n_scalp_derivations) float32, e.g. A1-A2, C3-O1, C4-O2.
      scalp_names: names of the scalp derivations.
      ear: (epochs * epoch_samples, n_ear_derivations) float32, e.g. L-R, L_E, R_E.
      ear_names: names of the ear derivations.
      labels: (epochs,) int8, -1 where not scored.
      source: where the night came from, for error messages.
    """

    subject: str
    sampling_rate: float
    epoch_samples: int
    scalp: np.ndarray
    scalp_names: tuple[str, ...]
    ear: np.ndarray
    ear_names: tuple[str, ...]
    labels: np.ndarray
    source: str = ""

    def __post_init__(self):
        src = self.source or self.subject
        _check_signal(src, "scalp", self.scalp, tuple(self.scalp_names))
        _check_signal(src, "ear", self.ear, tuple(self.ear_names))
        _check_labels(src, self.labels)
        want = self.labels.shape[0] * self.epoch_samples
        for what, arr in (("scalp", self.scalp), ("ear", self.ear)):
            if arr.shape[0] != want:
                raise DataError(
                    src,
                    f"{what} derivations have {arr.shape[0]} samples; {self.labels.shape[0]} epochs "
                    f"of {self.epoch_samples} samples need exactly {want}",
                )

    @property
    def num_epochs(self) -> int:
        return int(self.labels.shape[0])
