"""Sleep-staging metrics computed from a confusion matrix, in plain numpy.

Every number here comes from one confusion matrix accumulated over *all* scored epochs of whatever
is being summarised (a subject, or every subject pooled), never from averaging batch-level scores:
batch means weight a nearly empty last batch like a full one and make kappa meaningless.

Conventions:
  * Labels are 0=W 1=N1 2=N2 3=N3 4=REM (``STAGES``); -1 marks an epoch that was not scored. Such
    epochs are left out of every count, whatever was predicted for them.
  * The confusion matrix has true stages on the rows and predicted stages on the columns.
  * A ratio whose denominator is zero is reported as 0.0, never NaN. This is scikit-learn's
    ``zero_division=0`` convention and what the original PyTorch evaluation did, so numbers are
    comparable with both. In particular a stage that occurs neither in the truth nor in the
    predictions gets precision = sensitivity = F1 = 0, and still counts as one of the five classes
    in every macro average (``macro_f1`` equals ``f1_score(average="macro", labels=range(5),
    zero_division=0)``). Look at ``support`` to see which stages were present.
  * G-mean: ``sqrt(macro_sensitivity * macro_specificity)``, the definition used by the cross-modal
    KD paper's evaluation code (and common in class-imbalanced sleep staging, where it rewards a
    model only if it is both sensitive and specific across stages). Per-class G-means
    ``sqrt(sensitivity_c * specificity_c)`` are reported alongside.
  * Cohen's kappa ``(p_o - p_e) / (1 - p_e)`` is undefined when the expected agreement ``p_e`` is 1,
    which happens only when truth and predictions are all one and the same stage; the agreement is
    then perfect and we report 1.0 (scikit-learn's ``replace_undefined_by=1.0``). With no scored
    epochs at all every metric is 0.0 and ``num_epochs`` is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eegkd_jax.data.recording import NUM_CLASSES, STAGES, UNSCORED, DataError

CONFUSION_NOTE = "rows: true, columns: predicted"

# Metrics that get a mean and standard deviation across subjects in ``evaluate_subjects``.
SUBJECT_LEVEL_METRICS = ("accuracy", "kappa", "macro_f1", "g_mean")


def _as_labels(values: Any, what: str, source: str) -> np.ndarray:
    """Integer numpy view of label-like input (numpy, jax or nested lists), any shape."""
    arr = np.asarray(values)
    if arr.size == 0:
        # np.asarray([]) is float64; an empty input is valid whatever its dtype.
        return arr.astype(np.int64).reshape(-1)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(source, f"{what} must be integer stage indices, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def confusion_matrix(
    y_true: Any, y_pred: Any, num_classes: int = NUM_CLASSES, *, source: str = "evaluation"
) -> np.ndarray:
    """Counts of (true stage, predicted stage) pairs over the scored epochs.

    Args:
      y_true: integer labels of any shape, e.g. (epochs,) or (batch, L); -1 = not scored.
      y_pred: integer predictions, the same shape as ``y_true``.
      num_classes: number of stages (5).
      source: names the input in error messages (a subject, a checkpoint, ...).

    Returns:
      (num_classes, num_classes) int64, rows true and columns predicted. Epochs whose true label is
      -1 are not counted, and their predictions are not checked (padding may hold anything).

    Raises:
      DataError: shapes differ, non-integer input, a true label outside -1..num_classes-1, or a
        prediction for a scored epoch outside 0..num_classes-1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    true_shape, pred_shape = np.shape(y_true), np.shape(y_pred)
    if true_shape != pred_shape:
        raise DataError(source, f"labels have shape {true_shape} but predictions {pred_shape}")
    truth = _as_labels(y_true, "labels", source)
    pred = _as_labels(y_pred, "predictions", source)

    bad_truth = (truth < UNSCORED) | (truth >= num_classes)
    if bad_truth.any():
        i = int(np.flatnonzero(bad_truth)[0])
        raise DataError(
            source,
            f"label {truth[i]} at flat index {i} is outside {UNSCORED}..{num_classes - 1} "
            f"({int(bad_truth.sum())} such labels)",
        )
    scored = truth != UNSCORED
    bad_pred = scored & ((pred < 0) | (pred >= num_classes))
    if bad_pred.any():
        i = int(np.flatnonzero(bad_pred)[0])
        raise DataError(
            source,
            f"prediction {pred[i]} at flat index {i} is outside 0..{num_classes - 1} "
            f"({int(bad_pred.sum())} such predictions on scored epochs)",
        )
    flat = truth[scored] * num_classes + pred[scored]
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator with 0.0 where the denominator is 0 (no warning)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _kappa(confusion: np.ndarray) -> float:
    n = int(confusion.sum())
    if n == 0:
        return 0.0
    true_totals = confusion.sum(axis=1)
    pred_totals = confusion.sum(axis=0)
    # Integer arithmetic decides the degenerate case exactly: p_e == 1 iff sum(r_i c_i) == n^2.
    chance_pairs = int(np.dot(true_totals, pred_totals))
    if chance_pairs == n * n:
        return 1.0
    observed = np.trace(confusion) / n
    expected = chance_pairs / (n * n)
    return float((observed - expected) / (1.0 - expected))


def summarize(
    confusion: Any, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Every reported metric from one confusion matrix (rows true, columns predicted).

    Args:
      confusion: (K, K) non-negative integer counts, e.g. from ``confusion_matrix``.
      class_names: K names; ``STAGES`` (W, N1, N2, N3, REM) when K == 5 and None, else "0".."K-1".

    Returns:
      A JSON-ready dict (plain Python ints, floats and lists; every float finite)::

        num_epochs          scored epochs counted
        accuracy, kappa     overall agreement, Cohen's kappa
        macro_f1, macro_precision, macro_sensitivity, macro_specificity
                            unweighted means over all K classes (see the module notes)
        g_mean              sqrt(macro_sensitivity * macro_specificity)
        per_class           {name: {precision, sensitivity, specificity, f1, g_mean, support,
                            predicted}} where support = true epochs of the class and predicted =
                            epochs predicted as it
        support             {name: true epochs of the class}
        confusion_matrix    {"note": "rows: true, columns: predicted", "labels": names,
                            "counts": K x K nested lists}
    """
    counts = np.asarray(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {counts.shape}")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise ValueError("confusion matrix has negative counts")
    k = counts.shape[0]
    if class_names is None:
        class_names = STAGES if k == len(STAGES) else tuple(str(i) for i in range(k))
    class_names = tuple(str(name) for name in class_names)
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}x{k} confusion matrix")

    n = int(counts.sum())
    tp = np.diag(counts)
    support = counts.sum(axis=1)  # true epochs per class
    predicted = counts.sum(axis=0)  # epochs predicted as each class
    fp = predicted - tp
    fn = support - tp
    tn = n - tp - fp - fn

    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    class_g_mean = np.sqrt(sensitivity * specificity)

    macro_sensitivity = float(sensitivity.mean()) if k else 0.0
    macro_specificity = float(specificity.mean()) if k else 0.0
    per_class = {
        name: {
            "precision": float(precision[c]),
            "sensitivity": float(sensitivity[c]),
            "specificity": float(specificity[c]),
            "f1": float(f1[c]),
            "g_mean": float(class_g_mean[c]),
            "support": int(support[c]),
            "predicted": int(predicted[c]),
        }
        for c, name in enumerate(class_names)
    }
    return {
        "num_epochs": n,
        "accuracy": float(_ratio(np.trace(counts), n)),
        "kappa": _kappa(counts),
        "macro_f1": float(f1.mean()) if k else 0.0,
        "macro_precision": float(precision.mean()) if k else 0.0,
        "macro_sensitivity": macro_sensitivity,
        "macro_specificity": macro_specificity,
        "g_mean": math.sqrt(macro_sensitivity * macro_specificity),
        "per_class": per_class,
        "support": {name: int(support[c]) for c, name in enumerate(class_names)},
        "confusion_matrix": {
            "note": CONFUSION_NOTE,
            "labels": list(class_names),
            "counts": counts.tolist(),
        },
    }


def _subject_keys(subject_ids: np.ndarray, subject_names: Sequence[str] | None, source: str):
    """Maps each distinct subject id to the string key it gets in the results."""
    distinct = np.unique(subject_ids)
    if subject_names is None:
        keys = {sid: str(sid.item() if hasattr(sid, "item") else sid) for sid in distinct}
    else:
        if distinct.size and not np.issubdtype(distinct.dtype, np.integer):
            raise DataError(source, "subject_names given, so subject ids must be integer indices")
        bad = [int(s) for s in distinct if not 0 <= int(s) < len(subject_names)]
        if bad:
            raise DataError(
                source, f"subject indices {bad} are outside 0..{len(subject_names) - 1}"
            )
        keys = {sid: str(subject_names[int(sid)]) for sid in distinct}
    if len(set(keys.values())) != len(keys):
        raise DataError(source, f"subject ids {sorted(keys.values())} collide as strings")
    return keys


def evaluate_subjects(
    y_true: Any,
    y_pred: Any,
    subject_ids: Any,
    *,
    subject_names: Sequence[str] | None = None,
    num_classes: int = NUM_CLASSES,
    source: str = "evaluation",
) -> dict[str, Any]:
    """Pooled and per-subject summaries of per-epoch predictions.

    Args:
      y_true: (epochs,) integer labels, -1 = not scored (any shape is flattened).
      y_pred: (epochs,) integer predictions, the same shape.
      subject_ids: (epochs,) the subject of each epoch: strings such as "sub-001", or integer
        indices into ``subject_names`` (as ``eval_batches`` yields them).
      subject_names: optional names for integer subject indices.
      num_classes: number of stages.
      source: names the input in error messages.

    Returns:
      ``{"overall": summary, "per_subject": {subject: summary}, "across_subjects": {metric:
      {"mean", "std", "count"}}}``. ``overall`` is computed from the confusion matrix summed over
      every subject's epochs (pooled, as the papers report it); ``across_subjects`` gives the
      unweighted mean and population standard deviation of accuracy, kappa, macro F1 and G-mean
      over the subjects with at least one scored epoch. A subject whose epochs are all unscored
      is still listed, with ``num_epochs`` 0.
    """
    subjects = np.asarray(subject_ids).reshape(-1)
    if np.shape(y_true) != np.shape(y_pred):
        raise DataError(
            source, f"labels have shape {np.shape(y_true)} but predictions {np.shape(y_pred)}"
        )
    if subjects.size != np.size(y_true):
        raise DataError(
            source, f"{subjects.size} subject ids for {np.size(y_true)} labels; need one per epoch"
        )
    truth = np.asarray(y_true).reshape(-1)
    pred = np.asarray(y_pred).reshape(-1)
    keys = _subject_keys(subjects, subject_names, source)

    per_subject_confusion = {}
    for sid, key in keys.items():
        rows = subjects == sid
        per_subject_confusion[key] = confusion_matrix(
            truth[rows], pred[rows], num_classes, source=f"{source}: subject {key}"
        )
    if per_subject_confusion:
        pooled = sum(per_subject_confusion.values())
    else:
        pooled = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_subject = {key: summarize(per_subject_confusion[key]) for key in sorted(keys.values())}

    scored = [s for s in per_subject.values() if s["num_epochs"] > 0]
    across = {}
    for metric in SUBJECT_LEVEL_METRICS:
        values = np.array([s[metric] for s in scored], dtype=np.float64)
        across[metric] = {
            "mean": float(values.mean()) if values.size else 0.0,
            "std": float(values.std()) if values.size else 0.0,
            "count": int(values.size),
        }
    return {"overall": summarize(pooled), "per_subject": per_subject, "across_subjects": across}


def summary_line(summary: Mapping[str, Any]) -> str:
    """One-line text form of a summary for logs.

    e.g. ``acc 0.812 kappa 0.741 MF1 0.702 G 0.823 (n=913)``.
    """
    return (
        f"acc {summary['accuracy']:.3f} kappa {summary['kappa']:.3f} "
        f"MF1 {summary['macro_f1']:.3f} G {summary['g_mean']:.3f} (n={summary['num_epochs']})"
    )
