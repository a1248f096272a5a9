"""Sleep-staging metrics (scikit-learn's) over whole nights, and the nights rebuilt from batches.

Every number comes from all scored epochs of what is summarised (a subject, or every subject
pooled), never from averaging batch-level scores: batch means weight a nearly empty last batch
like a full one and make kappa meaningless.

Conventions:
  * Labels are 0=W 1=N1 2=N2 3=N3 4=REM (``STAGES``); -1 marks an epoch that was not scored. Such
    epochs are left out of every count, whatever was predicted for them.
  * Confusion matrices have true stages on the rows and predicted stages on the columns.
  * A ratio whose denominator is zero is 0.0 (scikit-learn's ``zero_division=0``, and what the
    original PyTorch evaluation did); a stage absent from truth and predictions still counts as
    one of the five classes in every macro average. Look at ``support`` to see which were present.
  * Kappa is 1.0 where it is undefined (truth and predictions all one and the same stage:
    ``replace_undefined_by=1.0``); with no scored epochs every metric is 0.0.
  * G-mean: ``sqrt(macro_sensitivity * macro_specificity)``, as the cross-modal KD paper's
    evaluation code defines it; per-class ``sqrt(sensitivity_c * specificity_c)`` beside it.
    Specificity is the one ratio computed here: scikit-learn has no specificity score.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from eegkd_jax.data.recording import NUM_CLASSES, STAGES, UNSCORED, DataError

CONFUSION_NOTE = "rows: true, columns: predicted"

# Metrics that get a mean and standard deviation across subjects in ``evaluate_subjects``.
SUBJECT_LEVEL_METRICS = ("accuracy", "kappa", "macro_f1", "g_mean")


def _as_labels(values: Any, what: str, source: str) -> np.ndarray:
    """Integer numpy view of label-like input (numpy, jax or nested lists), flattened."""
    arr = np.asarray(values)
    if arr.size == 0:  # np.asarray([]) is float64; an empty input is valid whatever its dtype
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
    if np.shape(y_true) != np.shape(y_pred):
        raise DataError(source, f"labels have shape {np.shape(y_true)} but predictions "
                                f"{np.shape(y_pred)}")
    truth = _as_labels(y_true, "labels", source)
    pred = _as_labels(y_pred, "predictions", source)
    _refuse(truth, (truth < UNSCORED) | (truth >= num_classes), "label",
            f"{UNSCORED}..{num_classes - 1}", "labels", source)
    scored = truth != UNSCORED
    _refuse(pred, scored & ((pred < 0) | (pred >= num_classes)), "prediction",
            f"0..{num_classes - 1}", "predictions on scored epochs", source)
    if not scored.any():
        return np.zeros((num_classes, num_classes), np.int64)
    return skm.confusion_matrix(truth[scored], pred[scored],
                                labels=np.arange(num_classes)).astype(np.int64)


def _refuse(values: np.ndarray, bad: np.ndarray, what: str, allowed: str, plural: str,
            source: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(source, f"{what} {values[i]} at flat index {i} is outside {allowed} "
                                f"({int(bad.sum())} such {plural})")


def summarize(
    confusion: Any, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Every reported metric of the epochs one confusion matrix counts (rows true, columns
    predicted), by scikit-learn.

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

    # The epochs the matrix counts, as the (true, predicted) pairs scikit-learn takes.
    pairs = np.repeat(np.arange(k * k), counts.reshape(-1))
    y_true, y_pred = pairs // max(k, 1), pairs % max(k, 1)
    n, labels = int(pairs.size), np.arange(k)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)
    zeros = np.zeros(k)
    precision, sensitivity, f1, accuracy, kappa = zeros, zeros, zeros, 0.0, 0.0
    if n:
        with warnings.catch_warnings():  # zero_division and replace_undefined_by say the value
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            precision, sensitivity, f1, _ = skm.precision_recall_fscore_support(
                y_true, y_pred, labels=labels, zero_division=0)
            kappa = skm.cohen_kappa_score(y_true, y_pred, labels=labels, replace_undefined_by=1.0)
        accuracy = skm.accuracy_score(y_true, y_pred)
    negatives = n - support  # epochs of the other stages
    false_positives = predicted - np.diag(counts)
    specificity = np.divide(negatives - false_positives, negatives, out=np.zeros(k),
                            where=negatives > 0)
    class_g_mean = np.sqrt(sensitivity * specificity)
    macro = {name: float(values.mean()) if k else 0.0 for name, values in
             (("f1", f1), ("precision", precision), ("sensitivity", sensitivity),
              ("specificity", specificity))}
    per_class = {
        name: {"precision": float(precision[c]), "sensitivity": float(sensitivity[c]),
               "specificity": float(specificity[c]), "f1": float(f1[c]),
               "g_mean": float(class_g_mean[c]), "support": int(support[c]),
               "predicted": int(predicted[c])}
        for c, name in enumerate(class_names)
    }
    return {
        "num_epochs": n,
        "accuracy": float(accuracy),
        "kappa": float(kappa),
        "macro_f1": macro["f1"],
        "macro_precision": macro["precision"],
        "macro_sensitivity": macro["sensitivity"],
        "macro_specificity": macro["specificity"],
        "g_mean": math.sqrt(macro["sensitivity"] * macro["specificity"]),
        "per_class": per_class,
        "support": {name: int(support[c]) for c, name in enumerate(class_names)},
        "confusion_matrix": {"note": CONFUSION_NOTE, "labels": list(class_names),
                             "counts": counts.tolist()},
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
        # Every named subject is listed, even one with no epochs here: nothing drops silently.
        keys = {index: str(name) for index, name in enumerate(subject_names)}
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
      subject_names: optional names for integer subject indices; every named subject appears in
        ``per_subject``, with ``num_epochs`` 0 if it has no epochs here.
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


# What the abbreviations of ``summary_line`` stand for, printed beside it by ``eegkd eval``.
SUMMARY_LEGEND = ("acc = accuracy, kappa = Cohen's kappa, MF1 = macro-averaged F1, "
                  "G = sqrt(macro sensitivity x macro specificity), n = scored epochs")


def summary_line(summary: Mapping[str, Any]) -> str:
    """One-line text form of a summary for logs.

    e.g. ``acc 0.812 kappa 0.741 MF1 0.702 G 0.823 (n=913)``.
    """
    return (
        f"acc {summary['accuracy']:.3f} kappa {summary['kappa']:.3f} "
        f"MF1 {summary['macro_f1']:.3f} G {summary['g_mean']:.3f} (n={summary['num_epochs']})"
    )


class NightCollector:
    """Puts evaluation batches of L-epoch sequences back together into whole nights.

    ``pipeline.eval_batches`` yields every epoch of every subject exactly once, as sequences that
    start at ``epoch`` and carry padding (label -1, ``valid`` False) at the end. The collector
    writes each valid sequence into its subject's night, drops the padding past a night's end, and
    insists that every epoch arrives exactly once, so a pipeline bug that repeats or loses epochs
    fails loudly instead of quietly skewing the scores.

    Usage::

        collector = NightCollector(cohort.num_epochs, subjects)
        for batch in batches:
            collector.add(batch["labels"], predictions, batch["subject"], batch["epoch"],
                          batch["valid"], probabilities=probs)
        results = collector.results()          # evaluate_subjects on the whole nights
        nights = collector.hypnograms()        # {subject: (true (n,), predicted (n,))}

    In a multi-host run pass globally gathered arrays (each host sees only its share of a batch).
    """

    def __init__(
        self,
        num_epochs: Mapping[str, int],
        subjects: Sequence[str] | None = None,
        *,
        num_classes: int = NUM_CLASSES,
        source: str = "evaluation",
    ):
        """Args:
        num_epochs: epochs per subject night (``Cohort.num_epochs``).
        subjects: the names that integer ``subject`` indices in batches refer to (the list given
          to ``eval_batches``); defaults to ``sorted(num_epochs)``.
        num_classes: number of stages.
        source: names the evaluation in error messages.
        """
        self.subjects = tuple(sorted(num_epochs) if subjects is None else subjects)
        missing = [s for s in self.subjects if s not in num_epochs]
        if missing:
            raise DataError(source, f"no epoch count for subjects {missing}")
        self.num_classes = num_classes
        self.source = source
        self._true = {s: np.full(int(num_epochs[s]), UNSCORED, np.int64) for s in self.subjects}
        self._pred = {s: np.full(int(num_epochs[s]), UNSCORED, np.int64) for s in self.subjects}
        self._seen = {s: np.zeros(int(num_epochs[s]), bool) for s in self.subjects}
        self._probs: dict[str, np.ndarray] | None = None

    def add(
        self,
        labels: Any,
        predictions: Any,
        subject: Any,
        epoch: Any,
        valid: Any,
        probabilities: Any = None,
    ) -> None:
        """Adds one batch.

        Args:
          labels: (b, L) int, -1 = not scored or padding.
          predictions: (b, L) int predicted stages.
          subject: (b,) int index into ``subjects``.
          epoch: (b,) int first epoch of each sequence within its night.
          valid: (b,) bool, False for padding rows (ignored entirely).
          probabilities: optional (b, L, num_classes) stage probabilities; give them on every
            batch or on none.
        """
        labels = _as_labels(labels, "labels", self.source).reshape(np.shape(labels))
        preds = _as_labels(predictions, "predictions", self.source).reshape(np.shape(predictions))
        if labels.ndim != 2 or preds.shape != labels.shape:
            raise DataError(
                self.source,
                f"labels {labels.shape} and predictions {preds.shape} must both be (batch, L)",
            )
        b, seq_len = labels.shape
        subject = _as_labels(subject, "subject", self.source)
        start = _as_labels(epoch, "epoch", self.source)
        valid = np.asarray(valid).reshape(-1)
        if subject.shape != (b,) or start.shape != (b,) or valid.shape != (b,):
            raise DataError(
                self.source,
                f"subject {subject.shape}, epoch {start.shape} and valid {valid.shape} must be "
                f"({b},) for a batch of {b}",
            )
        if valid.dtype != np.bool_:
            raise DataError(self.source, f"valid must be bool, got dtype {valid.dtype}")
        probs = None
        if probabilities is not None:
            probs = np.asarray(probabilities, dtype=np.float64)
            if probs.shape != (b, seq_len, self.num_classes):
                raise DataError(
                    self.source,
                    f"probabilities must be ({b}, {seq_len}, {self.num_classes}), "
                    f"got {probs.shape}",
                )
        if self._probs is None and probs is not None:
            if any(seen.any() for seen in self._seen.values()):
                raise DataError(self.source, "probabilities given for some batches but not others")
            self._probs = {
                s: np.zeros((n.size, self.num_classes)) for s, n in self._true.items()
            }
        elif self._probs is not None and probs is None:
            raise DataError(self.source, "probabilities given for some batches but not others")

        # Bad labels / predictions on scored epochs raise here, with the batch named.
        confusion_matrix(labels[valid], preds[valid], self.num_classes, source=self.source)
        for row in np.flatnonzero(valid):
            index = int(subject[row])
            if not 0 <= index < len(self.subjects):
                raise DataError(
                    self.source, f"subject index {index} is outside 0..{len(self.subjects) - 1}"
                )
            name = self.subjects[index]
            night = self._seen[name].size
            first = int(start[row])
            if first < 0 or first >= night:
                raise DataError(
                    self.source,
                    f"{name}: sequence starts at epoch {first} of a {night}-epoch night",
                )
            stop = min(first + seq_len, night)
            past_end = labels[row, stop - first :]
            if (past_end != UNSCORED).any():
                raise DataError(
                    self.source,
                    f"{name}: sequence at epoch {first} has scored labels past the night's "
                    f"{night} epochs",
                )
            if self._seen[name][first:stop].any():
                again = first + int(np.flatnonzero(self._seen[name][first:stop])[0])
                raise DataError(self.source, f"{name}: epoch {again} was evaluated twice")
            night_preds = preds[row, : stop - first]
            if ((night_preds < 0) | (night_preds >= self.num_classes)).any():
                # Unscored epochs are still real epochs of the night: their predictions are drawn.
                raise DataError(
                    self.source,
                    f"{name}: predictions {np.unique(night_preds).tolist()} near epoch {first} "
                    f"are outside 0..{self.num_classes - 1}",
                )
            self._seen[name][first:stop] = True
            self._true[name][first:stop] = labels[row, : stop - first]
            self._pred[name][first:stop] = night_preds
            if probs is not None:
                self._probs[name][first:stop] = probs[row, : stop - first]

    def _check_complete(self) -> None:
        gaps = {s: int((~seen).sum()) for s, seen in self._seen.items() if not seen.all()}
        if gaps:
            detail = ", ".join(f"{s}: {n} of {self._seen[s].size}" for s, n in gaps.items())
            raise DataError(self.source, f"epochs never evaluated ({detail})")

    def hypnograms(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{subject: (true (epochs,), predicted (epochs,))} int64; raises unless all epochs came."""
        self._check_complete()
        return {s: (self._true[s].copy(), self._pred[s].copy()) for s in self.subjects}

    def probabilities(self) -> dict[str, np.ndarray] | None:
        """{subject: (epochs, num_classes)} stage probabilities, or None if none were given."""
        self._check_complete()
        if self._probs is None:
            return None
        return {s: p.copy() for s, p in self._probs.items()}

    def results(self) -> dict[str, Any]:
        """``evaluate_subjects`` over the whole nights (every epoch, pooled and per subject)."""
        nights = self.hypnograms()
        names = list(nights)
        return evaluate_subjects(
            np.concatenate([nights[s][0] for s in names]) if names else np.zeros(0, np.int64),
            np.concatenate([nights[s][1] for s in names]) if names else np.zeros(0, np.int64),
            np.repeat(np.arange(len(names)), [nights[s][0].size for s in names]),
            subject_names=names,
            num_classes=self.num_classes,
            source=self.source,
        )
