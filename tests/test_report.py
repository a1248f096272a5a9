"""report.json / report.md / PNG figures and the hypnogram TSV written by eegkd_jax.report."""

import json

import ml_collections
import numpy as np
import pytest
from matplotlib import image as mpimg

from eegkd_jax import metrics, report
from eegkd_jax.data.recording import STAGES, DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def toy_night(rng, n, accuracy):
    """A cycling night with a block of unscored epochs and noisy predictions."""
    cycle = [0] * 4 + [1] * 2 + [2] * 8 + [3] * 6 + [2] * 4 + [4] * 6
    true = np.array((cycle * (n // len(cycle) + 1))[:n])
    true[n // 3 : n // 3 + 5] = -1
    noise = rng.integers(0, 5, size=n)
    predicted = np.where(rng.random(n) < accuracy, np.clip(true, 0, 4), noise)
    return true, predicted


@pytest.fixture(scope="module")
def evaluation():
    rng = np.random.default_rng(3)
    nights = {"sub-001": toy_night(rng, 120, 0.85), "sub-007": toy_night(rng, 80, 0.6)}
    y_true = np.concatenate([t for t, _ in nights.values()])
    y_pred = np.concatenate([p for _, p in nights.values()])
    ids = np.repeat(list(nights), [len(t) for t, _ in nights.values()])
    return metrics.evaluate_subjects(y_true, y_pred, ids), nights


@pytest.fixture(scope="module")
def written(evaluation, tmp_path_factory):
    results, nights = evaluation
    out = tmp_path_factory.mktemp("report")
    config = ml_collections.ConfigDict({"mode": "offline_kd", "batch_size": 4})
    hypnograms = {
        "sub-001": report.Hypnogram(*nights["sub-001"]),
        "sub-007": nights["sub-007"],  # a plain (true, predicted) pair works too
    }
    paths = report.write_report(
        results, out, hypnograms,
        metadata={"checkpoint": out / "ckpt" / "40", "step": np.int64(40), "config": config},
    )
    return out, paths


def assert_sensible_png(path, min_size=(300, 200), max_size=(2500, 2000)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    height, width = pixels.shape[:2]
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1]
    gray = pixels[..., :3].mean(axis=-1)
    # Not blank: a white background with a fair amount of dark ink (lines, text).
    assert (gray > 0.95).mean() > 0.3
    assert (gray < 0.5).mean() > 0.005
    return width, height


def test_report_files_exist(written):
    out, paths = written
    for name in ("report.json", "report.md", "confusion_matrix.png", "hypnograms/sub-001.png",
                 "hypnograms/sub-007.png"):
        assert (out / name).is_file(), name
    assert paths["json"] == out / "report.json"
    assert paths["hypnogram/sub-007"] == out / "hypnograms" / "sub-007.png"
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_report_json_round_trips_and_matches_metrics(written, evaluation):
    results, _ = evaluation
    out, _ = written
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["overall"] == results["overall"]
    assert loaded["per_subject"] == results["per_subject"]
    assert loaded["across_subjects"] == results["across_subjects"]
    meta = loaded["metadata"]
    assert meta["step"] == 40 and meta["checkpoint"].endswith("ckpt/40")
    assert meta["config"] == {"mode": "offline_kd", "batch_size": 4}
    assert meta["stages"] == list(STAGES)
    assert "g_mean" in meta["definitions"] and meta["created_utc"].endswith("+00:00")
    for rel in [loaded["figures"]["confusion_matrix"], *loaded["figures"]["hypnograms"].values()]:
        assert (out / rel).is_file()
    # The pooled confusion matrix in the file is the sum of the per-subject ones.
    per_subject = [s["confusion_matrix"]["counts"] for s in loaded["per_subject"].values()]
    assert np.sum(per_subject, axis=0).tolist() == loaded["overall"]["confusion_matrix"]["counts"]


def test_markdown_has_the_numbers(written, evaluation):
    results, _ = evaluation
    out, _ = written
    text = (out / "report.md").read_text()
    overall = results["overall"]
    assert f"| accuracy | {overall['accuracy']:.3f} |" in text
    assert f"| Cohen's kappa | {overall['kappa']:.3f} |" in text
    assert f"| macro F1 | {overall['macro_f1']:.3f} |" in text
    assert f"| G-mean | {overall['g_mean']:.3f} |" in text
    for name in STAGES:
        c = overall["per_class"][name]
        assert f"| {name} | {c['support']} | {c['predicted']} | {c['precision']:.3f} |" in text
    w_row = overall["confusion_matrix"]["counts"][0]
    assert f"| **W** | {w_row[0]} (" in text and "rows: true, columns: predicted" in text
    for subject, s in results["per_subject"].items():
        assert f"| {subject} | {s['num_epochs']} | {s['accuracy']:.3f} | {s['kappa']:.3f} |" in text
        assert f"hypnograms/{subject}.png" in text
    assert "confusion_matrix.png" in text and "offline_kd" in text


def test_pngs_are_valid_images_of_sensible_size(written):
    out, _ = written
    width, height = assert_sensible_png(out / "confusion_matrix.png")
    assert 0.7 < width / height < 1.6  # roughly square
    width, height = assert_sensible_png(out / "hypnograms" / "sub-001.png")
    assert width > 2 * height  # a night is wide


def test_stage_levels_follow_clinical_order():
    levels = report.stage_levels(np.array([0, 4, 1, 2, 3, -1]))
    # W above REM above N1 above N2 above N3; unscored is a gap, not a level.
    np.testing.assert_array_equal(levels[:5], [4, 3, 2, 1, 0])
    assert np.isnan(levels[5])
    assert report.HYPNOGRAM_ORDER == ("W", "REM", "N1", "N2", "N3")


def test_plot_hypnogram_with_probabilities(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5), size=60)
    stages = probabilities.argmax(axis=1)
    stages[10:14] = -1
    path = report.plot_hypnogram(
        tmp_path / "night" / "pred.png", stages, probabilities=probabilities, title="sub-x"
    )
    assert_sensible_png(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stages": []}, "no epochs"),
        ({"stages": [0, 7]}, r"\[7\]"),
        ({"stages": [0.0, 1.0]}, "integers"),
        ({"stages": [0, 1], "true_stages": [0, 1, 2]}, "3 true stages but 2"),
        ({"stages": [0, 1], "probabilities": np.full((2, 5), 0.5)}, "sum to"),
        ({"stages": [0, 1], "probabilities": np.full((2, 4), 0.25)}, "shape"),
    ],
)
def test_plot_hypnogram_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match) as info:
        report.plot_hypnogram(tmp_path / "bad.png", **kwargs)
    assert "bad.png" in info.value.source
    assert not (tmp_path / "bad.png").exists()


def test_hypnogram_tsv_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    stages = np.array([0, 1, -1, 2, 3, 4, 2])
    probabilities = rng.dirichlet(np.ones(5), size=stages.size)
    onsets = 1800.0 + 30.0 * np.arange(stages.size)
    path = report.write_hypnogram_tsv(tmp_path / "sub-1_hypno.tsv", onsets, stages, probabilities)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["onset", "duration", "stage", "p_W", "p_N1", "p_N2", "p_N3",
                                    "p_REM"]
    assert lines[3].split("\t")[:3] == ["1860.000", "30", "n/a"]
    read_onsets, read_stages, read_probs = report.read_hypnogram_tsv(path)
    np.testing.assert_array_equal(read_stages, stages)
    np.testing.assert_allclose(read_onsets, onsets)
    np.testing.assert_allclose(read_probs, probabilities, atol=5e-5)

    plain = report.write_hypnogram_tsv(tmp_path / "plain.tsv", onsets, stages, None)
    _, again, none = report.read_hypnogram_tsv(plain)
    assert none is None and again.tolist() == stages.tolist()


@pytest.mark.parametrize(
    "onsets, stages, probabilities, match",
    [
        ([0, 30], [0, 5], None, r"\[5\]"),
        ([0, 30, 60], [0, 1], None, "3 onsets for 2 stages"),
        ([0, 0], [0, 1], None, "increasing"),
        ([0, np.nan], [0, 1], None, "NaN"),
        ([0, 30], [0, 1], [[1, 0, 0, 0, 0], [0.5, 0, 0, 0, 0]], "epoch 1 sum to 0.5"),
        ([0, 30], [0, 1], [[1, 0, 0, 0, 0], [np.nan, 0, 0, 0, 1]], "NaN"),
        ([0, 30], [0, 1], [[1.5, -0.5, 0, 0, 0]] * 2, "outside"),
    ],
)
def test_hypnogram_tsv_rejects_bad_input(tmp_path, onsets, stages, probabilities, match):
    with pytest.raises(DataError, match=match) as info:
        report.write_hypnogram_tsv(tmp_path / "x.tsv", onsets, np.array(stages), probabilities)
    assert info.value.source.endswith("x.tsv")


def test_read_hypnogram_tsv_names_the_bad_line(tmp_path):
    path = tmp_path / "broken.tsv"
    path.write_text("onset\tduration\tstage\n0.0\t30\tW\n30.0\t30\tS4\n")
    with pytest.raises(DataError, match="line 3: unknown stage 'S4'"):
        report.read_hypnogram_tsv(path)
    path.write_text("time\tstage\n")
    with pytest.raises(DataError, match="unexpected columns"):
        report.read_hypnogram_tsv(path)


def test_write_report_rejects_bad_arguments(evaluation, tmp_path):
    results, nights = evaluation
    with pytest.raises(ValueError, match="per_subject"):
        report.write_report({"overall": results["overall"]}, tmp_path)
    with pytest.raises(TypeError, match="not JSON"):
        report.write_report(results, tmp_path / "a", metadata={"model": object()})
    with pytest.raises(ValueError, match="share figure"):
        twins = {"s/1": nights["sub-001"], "s_1": nights["sub-001"]}
        report.write_report(results, tmp_path / "b", twins)
    with pytest.raises(DataError, match="hypnogram of s: .*shape"):
        report.write_report(results, tmp_path / "c", {"s": (np.zeros(3, int), np.zeros(4, int))})
    # Inputs are checked before anything is written.
    assert not any(tmp_path.iterdir())


def test_report_without_hypnograms_or_scored_epochs(tmp_path):
    results = metrics.evaluate_subjects(np.array([-1, -1]), np.array([0, 3]), np.array(["a", "a"]))
    paths = report.write_report(results, tmp_path)
    assert set(paths) == {"json", "markdown", "confusion_matrix"}
    loaded = json.loads(paths["json"].read_text())
    assert loaded["overall"]["num_epochs"] == 0 and loaded["figures"]["hypnograms"] == {}
    assert "| a | 0 | 0.000 |" in paths["markdown"].read_text()
