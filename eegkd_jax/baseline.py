"""The classical floor: band powers and a logistic regression, beside every network in a table.

Each 30-s epoch of each channel becomes ten numbers read off a Welch periodogram (4-s Hann
segments, half overlapping, 0.25 Hz resolution):

* the log absolute power in delta (0.5-4 Hz), theta (4-8), alpha (8-12), sigma (12-16) and beta
  (16-30), and
* the relative power in the same bands, i.e. band power over the 0.5-30 Hz total (the bands tile
  that range, so the five relative powers of a channel sum to 1).

Optionally the features of the epochs t-k..t+k are laid side by side (``with_context``), within one
night only. The features are standardised with statistics of the training epochs, then a
multinomial logistic regression predicts the stage. Epochs labelled -1 (not scored) are left out
of fitting and scoring, but are still computed so that their scored neighbours keep their context.

This is the recipe of YASA's staging features and of the classical literature, kept small on
purpose: it is the floor a network has to clear, not a competitor.

Entry points: ``floor`` on (signal, labels) nights, ``cohort_floor`` on a built ``pipeline.Cohort``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.signal
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from eegkd_jax import metrics
from eegkd_jax.data.recording import UNSCORED

# (name, low Hz, high Hz): each band holds the frequencies low <= f < high.
BANDS: tuple[tuple[str, float, float], ...] = (
    ("delta", 0.5, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 12.0),
    ("sigma", 12.0, 16.0),
    ("beta", 16.0, 30.0),
)
FEATURES_PER_CHANNEL = 2 * len(BANDS)
FEATURE_NAMES: tuple[str, ...] = tuple(f"log_{b[0]}" for b in BANDS) + tuple(
    f"relative_{b[0]}" for b in BANDS
)

# Floors a band power before the log: a flat (dead) channel gives exactly 0, and log(0) = -inf
# would end up in the standardiser's statistics.
_MIN_POWER = 1e-12


def band_power_features(
    signal: np.ndarray, sampling_rate: float, epoch_samples: int, segment_seconds: float = 4.0
) -> np.ndarray:
    """Log absolute and relative band powers of every epoch and channel of one night.

    Args:
      signal: (time, channels), time = n_epochs * epoch_samples.
      sampling_rate: Hz.
      epoch_samples: samples per epoch (S).
      segment_seconds: Welch segment length (capped at one epoch).

    Returns:
      (n_epochs, channels * 10) float64; column ``c * 10 + j`` is feature ``FEATURE_NAMES[j]`` of
      channel c (five log10 absolute powers, then five relative powers). Always finite.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"signal must be (time, channels), got shape {signal.shape}")
    time, channels = signal.shape
    if epoch_samples < 1 or time % epoch_samples:
        raise ValueError(
            f"signal has {time} samples, not a whole number of {epoch_samples}-sample epochs"
        )
    if not np.isfinite(signal).all():
        raise ValueError("signal holds NaN or infinite samples")
    n_epochs = time // epoch_samples
    # A view, no copy: the periodogram runs along the sample axis of (epochs, S, channels).
    epochs = signal.reshape(n_epochs, epoch_samples, channels)
    nperseg = min(int(round(segment_seconds * sampling_rate)), epoch_samples)
    freqs, psd = scipy.signal.welch(epochs, fs=sampling_rate, nperseg=nperseg, axis=1)
    df = freqs[1] - freqs[0]

    power = np.stack(
        [psd[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) * df for _, lo, hi in BANDS],
        axis=-1,
    ).astype(np.float64)  # (epochs, channels, bands)
    total = power.sum(axis=-1, keepdims=True)
    relative = np.divide(power, total, out=np.zeros_like(power), where=total > 0)
    features = np.concatenate([np.log10(np.maximum(power, _MIN_POWER)), relative], axis=-1)
    return features.reshape(n_epochs, channels * FEATURES_PER_CHANNEL)


# The richer set's extra numbers per channel: what a band-power periodogram averages away.
SHAPE_FEATURE_NAMES: tuple[str, ...] = ("log_line_length", "kurtosis", "log_crest_factor",
                                        "power_spread")
_SPREAD_SECONDS = 2.0  # window over which the power's spread within an epoch is measured


def shape_features(signal: np.ndarray, sampling_rate: float, epoch_samples: int) -> np.ndarray:
    """Waveform-shape features of every epoch and channel of one night (the richer floor).

    Per channel: log10 of the line length (mean absolute sample difference, which grows with fast
    activity and sharp transients), the excess kurtosis and the log10 crest factor (peak over RMS;
    both rise with spindles, K-complexes and artefacts), and the spread of power within the epoch
    (standard deviation of log10 power over 2-s windows: bursts versus steady rhythms).

    Args:
      signal: (time, channels), time = n_epochs * epoch_samples.

    Returns:
      (n_epochs, channels * 4) float64, column ``c * 4 + j`` is ``SHAPE_FEATURE_NAMES[j]`` of
      channel c. Always finite (a flat channel gives the floor values, not NaN).
    """
    signal = np.asarray(signal, dtype=np.float64)
    time, channels = signal.shape
    n_epochs = time // epoch_samples
    epochs = signal.reshape(n_epochs, epoch_samples, channels)
    line_length = np.abs(np.diff(epochs, axis=1)).mean(axis=1)
    centred = epochs - epochs.mean(axis=1, keepdims=True)
    variance = (centred**2).mean(axis=1)
    safe = np.maximum(variance, _MIN_POWER)
    kurtosis = np.where(variance > _MIN_POWER, (centred**4).mean(axis=1) / safe**2 - 3.0, 0.0)
    crest = np.abs(centred).max(axis=1) / np.sqrt(safe)
    window = max(1, int(round(_SPREAD_SECONDS * sampling_rate)))
    windows = epoch_samples // window
    if windows >= 2:
        parts = centred[:, : windows * window].reshape(n_epochs, windows, window, channels)
        spread = np.log10(np.maximum((parts**2).mean(axis=2), _MIN_POWER)).std(axis=1)
    else:
        spread = np.zeros_like(variance)
    features = np.stack([np.log10(np.maximum(line_length, _MIN_POWER)), kurtosis,
                         np.log10(np.maximum(crest, _MIN_POWER)), spread], axis=-1)
    return features.reshape(n_epochs, channels * len(SHAPE_FEATURE_NAMES))


def epoch_features(signal: np.ndarray, sampling_rate: float, epoch_samples: int,
                   feature_set: str = "bands") -> np.ndarray:
    """``"bands"``: :func:`band_power_features`; ``"rich"``: those beside :func:`shape_features`."""
    if feature_set not in ("bands", "rich"):
        raise ValueError(f'feature_set must be "bands" or "rich", got {feature_set!r}')
    bands = band_power_features(signal, sampling_rate, epoch_samples)
    if feature_set == "bands":
        return bands
    return np.concatenate([bands, shape_features(signal, sampling_rate, epoch_samples)], axis=1)


def with_context(features: np.ndarray, k: int) -> np.ndarray:
    """Each epoch's features beside those of its k neighbours on either side, within one night.

    Args:
      features: (n_epochs, F) of one night (never several nights concatenated: the context would
        then cross from one subject into the next).
      k: neighbours per side; 0 returns ``features`` unchanged.

    Returns:
      (n_epochs, (2k + 1) * F): the blocks of epochs t-k, ..., t, ..., t+k in that order. Past
      either end of the night the nearest epoch is repeated.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (n_epochs, F), got shape {features.shape}")
    if k < 0:
        raise ValueError(f"context must be >= 0 epochs, got {k}")
    if k == 0:
        return features
    n = features.shape[0]
    rows = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)  # (n, 2k+1)
    return features[rows].reshape(n, -1)


def _scored_rows(features: Sequence[np.ndarray], labels: Sequence[np.ndarray]):
    """Stacks the scored epochs of several nights: (N, F) features and (N,) labels."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature arrays but {len(labels)} label arrays")
    xs, ys = [], []
    for i, (x, y) in enumerate(zip(features, labels)):
        y = np.asarray(y).reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"night {i}: {x.shape[0]} epochs of features but {y.shape[0]} labels")
        keep = y != UNSCORED
        xs.append(x[keep])
        ys.append(y[keep].astype(np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if y.size == 0:
        raise ValueError("no scored epoch to fit on")
    return x, y


def fit(features: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Pipeline:
    """Fits standardisation + logistic regression on the scored epochs of the training nights.

    Args:
      features: one (n_epochs_i, F) array per training night.
      labels: one (n_epochs_i,) array per night, 0..4 or -1 (left out).

    Returns:
      a fitted scikit-learn pipeline, for ``predict``.
    """
    x, y = _scored_rows(features, labels)
    # class_weight=None: the tables report accuracy and kappa, which reward the stages as often
    # as they occur, and the networks are trained with unweighted cross-entropy by default.
    # C=1.0 is plenty of regularisation for a few hundred features against thousands of epochs;
    # lbfgs fits the multinomial loss for more than two classes.
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, class_weight=None, max_iter=5000)
    )
    return model.fit(x, y)


def predict(model: Pipeline, features: np.ndarray) -> np.ndarray:
    """(n_epochs, F) features of one night -> (n_epochs,) int64 predicted stages, every epoch
    included (the scorer leaves out the unscored ones)."""
    return model.predict(np.asarray(features)).astype(np.int64)


def floor(
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    evaluate: Sequence[tuple[np.ndarray, np.ndarray]],
    sampling_rate: float,
    epoch_samples: int,
    context: int = 0,
) -> list[np.ndarray]:
    """Fits the floor on ``train`` nights and predicts every epoch of the ``evaluate`` nights.

    Args:
      train, evaluate: (signal (time, channels), labels (n_epochs,)) per night; evaluation labels
        are only checked for length.
      sampling_rate: Hz. epoch_samples: samples per epoch.
      context: neighbouring epochs per side (see ``with_context``).

    Returns:
      one (n_epochs,) int64 array of predicted stages per evaluated night, in order.
    """

    def night_features(signal, labels):
        x = with_context(band_power_features(signal, sampling_rate, epoch_samples), context)
        if x.shape[0] != np.size(labels):
            raise ValueError(f"night of {x.shape[0]} epochs has {np.size(labels)} labels")
        return x

    model = fit([night_features(s, y) for s, y in train], [y for _, y in train])
    return [predict(model, night_features(s, y)) for s, y in evaluate]


def cohort_floor(
    cohort,
    train_subjects: Sequence[str],
    eval_subjects: Sequence[str],
    signal: str = "scalp",
    context: int = 0,
    feature_set: str = "bands",
    targets: str = "labels",
) -> dict[str, Any]:
    """The floor on a built cohort: fit on ``train_subjects``, score ``eval_subjects``.

    Args:
      cohort: a ``pipeline.Cohort`` (from ``pipeline.prepare_cohort``); nights are read whole,
        preprocessed as the networks see them.
      train_subjects, eval_subjects: subject ids (e.g. from ``pipeline.subject_splits``).
      signal: "scalp" (the teacher's derivations) or "ear" (the student's).
      context: neighbouring epochs per side.
      feature_set: "bands" (the floor) or "rich" (bands and waveform shape, :func:`epoch_features`).
      targets: what the training epochs are fitted to. "labels": the scorer's labels.
        "scalp_floor": the classical distillation, for an ear floor: the plain scalp floor is fitted
        to the training nights' labels and its predictions on those same nights (scalp EEG)
        replace the labels; unscored epochs stay out. Scoring is always against the labels.

    Returns:
      ``metrics.evaluate_subjects``'s dict over the evaluated subjects (``overall`` pooled over
      their whole nights, ``per_subject``, ``across_subjects``) plus ``predictions``:
      {subject: (n_epochs,) int64 stages}.
    """
    if signal not in ("scalp", "ear"):
        raise ValueError(f'signal must be "scalp" or "ear", got {signal!r}')
    if targets not in ("labels", "scalp_floor"):
        raise ValueError(f'targets must be "labels" or "scalp_floor", got {targets!r}')
    if not train_subjects or not eval_subjects:
        raise ValueError(
            f"need subjects to train on and to evaluate, got {list(train_subjects)} and "
            f"{list(eval_subjects)}"
        )
    if set(train_subjects) & set(eval_subjects):
        raise ValueError(
            f"subjects {sorted(set(train_subjects) & set(eval_subjects))} are both trained on "
            "and evaluated"
        )

    def night(subject, which=signal, features=feature_set, k=context):
        # Features are computed one night at a time, so only one raw night is held in memory.
        scalp, ear, labels = cohort.read_epochs(subject, range(cohort.num_epochs[subject]))
        epochs = scalp if which == "scalp" else ear  # (n_epochs, S, channels)
        x = epoch_features(epochs.reshape(-1, epochs.shape[-1]), cohort.sampling_rate,
                           cohort.epoch_samples, features)
        return with_context(x, k), labels

    train = [night(s) for s in train_subjects]
    fit_targets = [y for _, y in train]
    if targets == "scalp_floor":
        scalp_train = [night(s, "scalp", "bands", 0) for s in train_subjects]
        teacher = fit([x for x, _ in scalp_train], [y for _, y in scalp_train])
        fit_targets = [np.where(y == UNSCORED, UNSCORED, predict(teacher, x))
                       for x, y in scalp_train]
        del scalp_train
    model = fit([x for x, _ in train], fit_targets)
    del train
    predictions, truths = {}, {}
    for s in eval_subjects:
        x, truths[s] = night(s)
        predictions[s] = predict(model, x)

    names = list(eval_subjects)
    results = metrics.evaluate_subjects(
        np.concatenate([truths[s] for s in names]),
        np.concatenate([predictions[s] for s in names]),
        np.repeat(np.arange(len(names)), [truths[s].size for s in names]),
        subject_names=names,
        source=f"{signal} floor",
    )
    results["predictions"] = predictions
    return results


def validation_floors(data_cfg, context: int = 0) -> dict[str, float]:
    """{"scalp": kappa, "ear": kappa} of the floor on the validation subjects of ``data_cfg``'s
    split, trained on its training subjects: what a run's validation kappas are read against."""
    from eegkd_jax.data import pipeline

    cohort = pipeline.prepare_cohort(data_cfg)
    splits = pipeline.subject_splits(cohort.subjects, data_cfg)
    if not splits.train or not splits.validation:
        return {}
    return {signal: float(cohort_floor(cohort, splits.train, splits.validation, signal,
                                       context)["overall"]["kappa"])
            for signal in ("scalp", "ear")}
