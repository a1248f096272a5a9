"""Checks every metric in eegkd_jax.metrics against scikit-learn on random and adversarial input."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from eegkd_jax import metrics
from eegkd_jax.data.recording import STAGES, DataError

LABELS = list(range(5))


def reference(y_true, y_pred):
    """The same numbers computed by scikit-learn on the scored epochs only."""
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    keep = y_true != -1
    t, p = y_true[keep], y_pred[keep]
    with warnings.catch_warnings():
        # sklearn warns about undefined ratios even with zero_division set; not our concern here.
        warnings.simplefilter("ignore")
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            t, p, labels=LABELS, zero_division=0
        )
        # (5, 2, 2): per class [[tn, fp], [fn, tp]].
        multilabel = skm.multilabel_confusion_matrix(t, p, labels=LABELS)
        tn, fp = multilabel[:, 0, 0], multilabel[:, 0, 1]
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), 0.0)
        out = {
            "confusion": skm.confusion_matrix(t, p, labels=LABELS),
            "accuracy": skm.accuracy_score(t, p) if t.size else 0.0,
            "kappa": skm.cohen_kappa_score(t, p, labels=LABELS, replace_undefined_by=1.0)
            if t.size
            else 0.0,
            "macro_f1": skm.f1_score(t, p, labels=LABELS, average="macro", zero_division=0),
            "precision": precision,
            "sensitivity": recall,
            "specificity": specificity,
            "f1": f1,
            "support": support,
        }
    out["g_mean"] = np.sqrt(recall.mean() * specificity.mean())
    return out


def assert_matches_sklearn(y_true, y_pred):
    cm = metrics.confusion_matrix(y_true, y_pred)
    ref = reference(y_true, y_pred)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, ref["confusion"])
    s = metrics.summarize(cm)
    assert s["num_epochs"] == int(ref["support"].sum())
    for key in ("accuracy", "kappa", "macro_f1", "g_mean"):
        assert s[key] == pytest.approx(ref[key], abs=1e-12), key
        assert np.isfinite(s[key])
    for key in ("precision", "sensitivity", "specificity", "f1"):
        got = [s["per_class"][name][key] for name in STAGES]
        np.testing.assert_allclose(got, ref[key], atol=1e-12, err_msg=key)
    assert [s["support"][name] for name in STAGES] == ref["support"].tolist()
    assert [s["per_class"][name]["support"] for name in STAGES] == ref["support"].tolist()
    assert s["macro_sensitivity"] == pytest.approx(np.mean(ref["sensitivity"]))
    assert s["macro_precision"] == pytest.approx(np.mean(ref["precision"]))
    return s


@pytest.mark.parametrize("seed", range(6))
def test_random_predictions_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y_true = rng.integers(-1, 5, size=n)
    # Mix of right answers and noise so kappa is neither ~0 nor 1.
    y_pred = np.where(rng.random(n) < 0.6, np.clip(y_true, 0, 4), rng.integers(0, 5, size=n))
    assert_matches_sklearn(y_true, y_pred)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        pytest.param([0, 0, 2, 2, 4, 4], [0, 2, 2, 2, 4, 0], id="N1 and N3 never occur"),
        pytest.param([0, 1, 2, 3, 4, 2], [2, 2, 2, 2, 2, 2], id="all predictions one class"),
        pytest.param([2, 2, 2, 2], [0, 1, 3, 4], id="everything wrong, one true class"),
        pytest.param([1, 1, 1], [1, 1, 1], id="perfect on one class (p_e = 1)"),
        pytest.param([3, 3, 3], [0, 0, 0], id="one class each, disagreeing"),
        pytest.param([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], id="reversed"),
        pytest.param([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], id="perfect"),
        pytest.param([-1, -1, 2, 2, -1], [4, 4, 2, 3, 0], id="unscored epochs"),
        pytest.param([4], [4], id="single epoch"),
    ],
)
def test_adversarial_predictions_match_sklearn(y_true, y_pred):
    s = assert_matches_sklearn(np.array(y_true), np.array(y_pred))
    json.dumps(s, allow_nan=False)  # every value finite and JSON-able


def test_perfect_single_class_kappa_is_one_and_documented_degenerate_values():
    s = metrics.summarize(metrics.confusion_matrix([1, 1, 1], [1, 1, 1]))
    assert s["kappa"] == 1.0 and s["accuracy"] == 1.0
    # Only N1 is present: the other four classes contribute F1 0 to the macro mean.
    assert s["macro_f1"] == pytest.approx(0.2)
    # N1's specificity has no true negatives to measure: 0 by the zero_division=0 convention.
    assert s["per_class"]["N1"]["specificity"] == 0.0
    assert s["per_class"]["W"]["specificity"] == 1.0


def test_empty_input_gives_zeros_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty_batch = np.zeros((0, 4), int)
        for y_true, y_pred in (([], []), ([-1, -1], [3, 0]), (empty_batch, empty_batch)):
            cm = metrics.confusion_matrix(y_true, y_pred)
            assert cm.sum() == 0
            s = metrics.summarize(cm)
            assert s["num_epochs"] == 0
            assert s["accuracy"] == s["kappa"] == s["macro_f1"] == s["g_mean"] == 0.0
            json.dumps(s, allow_nan=False)


def test_confusion_orientation_rows_true_columns_predicted():
    cm = metrics.confusion_matrix([0, 0, 0], [4, 4, 1])
    assert cm[0, 4] == 2 and cm[0, 1] == 1 and cm.sum() == 3
    s = metrics.summarize(cm)
    assert s["confusion_matrix"]["note"] == "rows: true, columns: predicted"
    assert s["confusion_matrix"]["labels"] == list(STAGES)
    assert s["confusion_matrix"]["counts"][0][4] == 2
    assert s["per_class"]["REM"]["predicted"] == 2 and s["per_class"]["REM"]["support"] == 0


def test_batched_shapes_are_flattened_and_unscored_predictions_unchecked():
    y_true = np.array([[0, 2, -1], [-1, 3, 4]], dtype=np.int32)
    # Padding epochs (label -1) may carry any prediction, even an out-of-range one.
    y_pred = np.array([[0, 2, 9], [-7, 3, 1]], dtype=np.int32)
    cm = metrics.confusion_matrix(y_true, y_pred)
    assert cm.sum() == 4 and np.trace(cm) == 3


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([0, 1, 5], [0, 1, 2], "label 5"),
        ([0, -2], [0, 1], "label -2"),
        ([0, 1, 2], [0, 1, 5], "prediction 5"),
        ([0, 1, 2], [0, -1, 2], "prediction -1"),
        ([0, 1], [0, 1, 2], "shape"),
        ([0.0, 1.0], [0, 1], "integer"),
        ([0, 1], [True, False], "integer"),
    ],
)
def test_bad_input_raises_data_error(y_true, y_pred, match):
    with pytest.raises(DataError, match=match) as info:
        metrics.confusion_matrix(np.array(y_true), np.array(y_pred), source="ckpt-12")
    assert info.value.source == "ckpt-12"


def test_summarize_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        metrics.summarize(np.zeros((5, 4), int))
    with pytest.raises(ValueError, match="negative"):
        metrics.summarize(-np.eye(5, dtype=int))
    with pytest.raises(ValueError, match="integer"):
        metrics.summarize(np.eye(5) * 0.5)


def test_other_class_counts_use_generic_names():
    s = metrics.summarize(metrics.confusion_matrix([0, 1, 2], [0, 1, 1], num_classes=3))
    assert list(s["per_class"]) == ["0", "1", "2"]
    assert s["macro_f1"] == pytest.approx(
        skm.f1_score([0, 1, 2], [0, 1, 1], labels=[0, 1, 2], average="macro", zero_division=0)
    )


def test_evaluate_subjects_pools_epochs_not_subject_means():
    rng = np.random.default_rng(7)
    # Unequal night lengths make pooling and averaging differ.
    sizes = {"sub-001": 300, "sub-002": 40, "sub-003": 120}
    y_true, y_pred, ids = [], [], []
    for i, (name, n) in enumerate(sizes.items()):
        t = rng.integers(-1, 5, size=n)
        hit = rng.random(n) < (0.9 - 0.3 * i)
        y_true.append(t)
        y_pred.append(np.where(hit, np.clip(t, 0, 4), rng.integers(0, 5, size=n)))
        ids += [name] * n
    y_true, y_pred, ids = np.concatenate(y_true), np.concatenate(y_pred), np.array(ids)
    # Shuffle: the result must not depend on epoch order.
    order = rng.permutation(y_true.size)
    result = metrics.evaluate_subjects(y_true[order], y_pred[order], ids[order])

    assert list(result["per_subject"]) == sorted(sizes)
    overall = result["overall"]
    ref = reference(y_true, y_pred)
    assert overall["accuracy"] == pytest.approx(ref["accuracy"])
    assert overall["kappa"] == pytest.approx(ref["kappa"])
    assert overall["macro_f1"] == pytest.approx(ref["macro_f1"])
    for name in sizes:
        rows = ids == name
        sub_ref = reference(y_true[rows], y_pred[rows])
        got = result["per_subject"][name]
        assert got["num_epochs"] == int(np.sum(y_true[rows] != -1))
        assert got["kappa"] == pytest.approx(sub_ref["kappa"])
        assert got["macro_f1"] == pytest.approx(sub_ref["macro_f1"])
    subject_counts = [result["per_subject"][n]["confusion_matrix"]["counts"] for n in sizes]
    pooled_counts = np.sum(subject_counts, axis=0)
    assert pooled_counts.tolist() == overall["confusion_matrix"]["counts"]
    subject_accuracies = [result["per_subject"][n]["accuracy"] for n in sizes]
    across = result["across_subjects"]["accuracy"]
    assert across["mean"] == pytest.approx(np.mean(subject_accuracies))
    assert across["std"] == pytest.approx(np.std(subject_accuracies))
    assert across["count"] == 3
    # The pooled accuracy is epoch-weighted, so it differs from the mean over subjects here.
    assert abs(overall["accuracy"] - across["mean"]) > 1e-3
    json.dumps(result, allow_nan=False)


def test_evaluate_subjects_with_integer_indices_and_unscored_subject():
    y_true = np.array([0, 2, 2, -1, -1, 4], dtype=np.int32)
    y_pred = np.array([0, 2, 3, 1, 1, 4], dtype=np.int32)
    subject = np.array([0, 0, 0, 1, 1, 2], dtype=np.int32)
    result = metrics.evaluate_subjects(y_true, y_pred, subject, subject_names=("s-a", "s-b", "s-c"))
    assert list(result["per_subject"]) == ["s-a", "s-b", "s-c"]
    assert result["per_subject"]["s-b"]["num_epochs"] == 0  # listed, not dropped
    assert result["across_subjects"]["kappa"]["count"] == 2
    assert result["overall"]["num_epochs"] == 4
    listed = metrics.evaluate_subjects(y_true, y_pred, subject, subject_names=("a", "b", "c", "d"))
    assert listed["per_subject"]["d"]["num_epochs"] == 0
    with pytest.raises(DataError, match="collide"):
        metrics.evaluate_subjects(y_true, y_pred, subject, subject_names=("a", "b", "a"))
    with pytest.raises(DataError, match="outside 0..1"):
        metrics.evaluate_subjects(y_true, y_pred, subject, subject_names=("s-a", "s-b"))
    with pytest.raises(DataError, match="one per epoch"):
        metrics.evaluate_subjects(y_true, y_pred, subject[:3])
    with pytest.raises(DataError, match="subject 2.*prediction 7"):
        metrics.evaluate_subjects(y_true, np.where(subject == 2, 7, y_pred), subject)


def test_evaluate_subjects_empty():
    result = metrics.evaluate_subjects([], [], [])
    assert result["per_subject"] == {}
    assert result["overall"]["num_epochs"] == 0
    assert result["across_subjects"]["accuracy"] == {"mean": 0.0, "std": 0.0, "count": 0}


def test_summary_line():
    # By hand: p_o 3/4, p_e 4/16; F1 (1, 1, 2/3, 0, 0); sens mean 0.5, spec mean 0.95.
    s = metrics.summarize(metrics.confusion_matrix([0, 1, 2, 2], [0, 1, 2, 3]))
    assert metrics.summary_line(s) == "acc 0.750 kappa 0.667 MF1 0.533 G 0.689 (n=4)"


def sequence_batches(nights, seq_len, batch_size, rng):
    """What pipeline.eval_batches yields: every epoch once, in order, as L-epoch sequences; a
    night's last partial sequence and the last batch padded (labels -1, valid False)."""
    rows = []
    for index, (true, pred) in enumerate(nights):
        for start in range(0, true.size, seq_len):
            t = np.full(seq_len, -1)
            p = rng.integers(0, 5, size=seq_len)  # padding predictions are arbitrary
            chunk = slice(start, min(start + seq_len, true.size))
            t[: chunk.stop - start] = true[chunk]
            p[: chunk.stop - start] = pred[chunk]
            rows.append((t, p, index, start, True))
    while len(rows) % batch_size:
        rows.append((np.full(seq_len, -1), np.zeros(seq_len, int), 0, 0, False))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        yield {
            "labels": np.stack([r[0] for r in chunk]).astype(np.int32),
            "prediction": np.stack([r[1] for r in chunk]).astype(np.int32),
            "subject": np.array([r[2] for r in chunk], np.int32),
            "epoch": np.array([r[3] for r in chunk], np.int32),
            "valid": np.array([r[4] for r in chunk]),
        }


def add_all(collector, batches, with_probabilities=False):
    for b in batches:
        probs = None
        if with_probabilities:
            probs = np.eye(5)[b["prediction"]] * 0.9 + 0.02
        collector.add(b["labels"], b["prediction"], b["subject"], b["epoch"], b["valid"], probs)


@pytest.mark.parametrize("seq_len", [1, 4])
def test_night_collector_rebuilds_nights_and_scores_them(seq_len):
    rng = np.random.default_rng(seq_len)
    names = ("sub-002", "sub-005")
    nights = []
    for n in (23, 10):
        true = rng.integers(-1, 5, size=n)
        guess = np.where(rng.random(n) < 0.7, np.clip(true, 0, 4), rng.integers(0, 5, n))
        nights.append((true, guess))
    collector = metrics.NightCollector({"sub-005": 10, "sub-002": 23}, names)
    add_all(collector, sequence_batches(nights, seq_len, 3, rng), with_probabilities=True)

    rebuilt = collector.hypnograms()
    assert list(rebuilt) == list(names)
    for name, (true, pred) in zip(names, nights):
        np.testing.assert_array_equal(rebuilt[name][0], true)
        np.testing.assert_array_equal(rebuilt[name][1], pred)
        assert collector.probabilities()[name].shape == (true.size, 5)
    direct = metrics.evaluate_subjects(
        np.concatenate([t for t, _ in nights]), np.concatenate([p for _, p in nights]),
        np.repeat(names, [t.size for t, _ in nights]),
    )
    assert collector.results() == direct


def test_night_collector_catches_lost_and_repeated_epochs():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, size=9)
    batches = list(sequence_batches([(true, true)], 2, 2, rng))

    lost = metrics.NightCollector({"s": 9}, source="val@step5")
    add_all(lost, batches[:-1])
    with pytest.raises(DataError, match=r"val@step5: epochs never evaluated \(s: 1 of 9\)"):
        lost.results()

    repeated = metrics.NightCollector({"s": 9})
    add_all(repeated, batches)
    with pytest.raises(DataError, match="epoch 0 was evaluated twice"):
        add_all(repeated, batches[:1])

    with pytest.raises(DataError, match="scored labels past the night"):
        metrics.NightCollector({"s": 3}).add([[0, 1, 2, 3]], [[0, 1, 2, 3]], [0], [0], [True])
    with pytest.raises(DataError, match="starts at epoch 5"):
        metrics.NightCollector({"s": 3}).add([[0]], [[0]], [0], [5], [True])
    with pytest.raises(DataError, match="subject index 1"):
        metrics.NightCollector({"s": 3}).add([[0]], [[0]], [1], [0], [True])
    with pytest.raises(DataError, match="prediction 6"):
        metrics.NightCollector({"s": 3}).add([[0]], [[6]], [0], [0], [True])
    with pytest.raises(DataError, match=r"predictions \[-1\] near epoch 2"):
        metrics.NightCollector({"s": 3}).add([[-1]], [[-1]], [0], [2], [True])
    # ...but padding past the night's end may hold anything.
    padded = metrics.NightCollector({"s": 3})
    padded.add([[1, 2, -1, -1]], [[1, 2, 3, 9]], [0], [1], [True])
    padded.add([[0]], [[0]], [0], [0], [True])
    assert padded.hypnograms()["s"][1].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="some batches but not others"):
        c = metrics.NightCollector({"s": 3})
        c.add([[0]], [[0]], [0], [0], [True], np.full((1, 1, 5), 0.2))
        c.add([[0]], [[0]], [0], [1], [True])
