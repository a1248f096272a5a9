"""The LOSO study: fold planning, per-method configs, and a tiny two-fold study end to end (every
method trained for two steps on a three-subject simulated cohort), re-run to check that finished
work is skipped and an interrupted run is picked up again."""

import csv
import json

import jax
import numpy as np
import ml_collections
import pytest

from eegkd_jax.configs import loso
from eegkd_jax import study

METHODS = tuple(loso.METHODS)
DEFAULT = tuple(loso.DEFAULT_METHODS)


def tiny_config(cache_dir):
    config = loso.get_config("tiny")
    config.data.cache_dir = str(cache_dir)
    config.data.sampling_rate = 8.0  # 240 samples per epoch
    config.data.simulated.subjects = 3  # per fold: 1 test, 1 validation, 1 training subject
    config.study.folds = 2
    config.study.seeds = (0,)
    config.max_steps = 2
    config.log_every_steps = 1
    return config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """One built tiny cohort for the whole module (the splits are not part of the shards)."""
    return tmp_path_factory.mktemp("tfds")


def test_plan_folds_never_validates_or_trains_on_the_test_subject():
    subjects = [f"s{i}" for i in range(5)]
    cfg = loso.get_config().study
    folds = study.plan_folds(reversed(subjects), cfg)
    assert [f.test for f in folds] == subjects  # every subject held out once, sorted
    for fold in folds:
        assert fold.test not in fold.validation + fold.train
        assert sorted((fold.test, *fold.validation, *fold.train)) == subjects
        assert len(fold.validation) == 1
    assert sorted(v for f in folds for v in f.validation) == subjects  # each validates once
    assert folds[-1].validation == ("s0",)  # wraps around

    cfg.num_validation_subjects = 2
    cfg.test_subjects = ("s3",)
    (fold,) = study.plan_folds(subjects, cfg)
    assert fold.validation == ("s0", "s4") and fold.train == ("s1", "s2")
    cfg.test_subjects = ("s9",)
    with pytest.raises(ValueError, match=r"\['s9'\] are not in the cohort"):
        study.plan_folds(subjects, cfg)
    cfg.test_subjects = ()
    with pytest.raises(ValueError, match="at least 4 subjects"):
        study.plan_folds(subjects[:3], cfg)


def test_method_configs_follow_the_mode_files(tmp_path):
    from eegkd_jax.data import pipeline

    config = loso.get_config("reduced")
    fold = study.Fold(1, "sim-02", ("sim-03",), ("sim-01", "sim-04"))
    teacher = tmp_path / "fold" / "scalp_teacher"
    made = {m: study.method_config(config, m, fold, teacher) for m in METHODS}
    assert {m: (c.mode, c.supervised_input) for m, c in made.items() if c.mode == "supervised"} == {
        "scalp_teacher": ("supervised", "scalp"), "ear_baseline": ("supervised", "ear"),
        "ear_baseline_matched": ("supervised", "ear")}
    assert made["transfer"].mode == "transfer"
    assert made["transfer"].kd.teacher_workdir == str(teacher)
    assert made["transfer"].model.to_dict() == config.teacher.to_dict()
    assert made["offline_kd"].kd.teacher_workdir == str(teacher)
    assert made["offline_kd"].kd.teacher_checkpoint == "best"
    assert made["online_kd"].kd.variant == "original" and made["mutual"].kd.variant == "mutual"
    assert made["mutual"].kd.response_weight > 0 and made["online_kd"].kd.response_weight == 0
    assert made["online_kd"].kd.teacher_workdir == ""
    # The controls: twice the steps for ear-only, the teacher's targets on the wrong windows.
    matched = made["ear_baseline_matched"]
    assert (matched.mode, matched.supervised_input) == ("supervised", "ear")
    assert matched.max_steps == 600 and matched.num_epochs == 2 * config.num_epochs
    assert made["offline_kd_unpaired"].kd.unpaired and not made["offline_kd"].kd.unpaired
    assert made["offline_kd_unpaired"].kd.teacher_workdir == str(teacher)
    made.pop("ear_baseline_matched")
    for m, c in made.items():
        assert "study" not in c
        # The shared settings are the study's, not the mode file's own CPU defaults.
        assert c.data.simulated.hours == config.data.simulated.hours
        assert c.max_steps == config.max_steps == 300
        assert c.model.depth == config.model.depth == 6
        splits = pipeline.subject_splits([f"sim-0{i}" for i in range(1, 5)], c.data)
        assert splits.test == ("sim-02",) and splits.validation == ("sim-03",)
        assert splits.train == ("sim-01", "sim-04")
    with pytest.raises(ValueError, match="unknown study method 'kd'"):
        study.method_config(config, "kd", fold, teacher)


def fake_predictions(labels, test, method, seed):
    """The stand-in's predictions: the scored labels with the first j epochs moved to the next
    stage, j set by (test subject, method, seed), so every run has its own known kappa."""
    pred = np.where(labels < 0, 0, labels).astype(np.int64)
    j = int(test[-2:]) + 2 * METHODS.index(method) + seed
    pred[:j] = (pred[:j] + 1) % 5
    return pred


def expected_kappa(labels, pred):
    from sklearn.metrics import cohen_kappa_score

    kept = labels >= 0
    return cohen_kappa_score(labels[kept], pred[kept])


def fake_training(monkeypatch, calls):
    """Replaces training and scoring with instant stand-ins that record what they were asked and
    predict :func:`fake_predictions` on the test night."""
    from eegkd_jax import checkpoint as ckpt_lib
    from eegkd_jax import evaluate
    from eegkd_jax.data import pipeline
    from eegkd_jax.train import loop

    def train(cfg, run_dir, announce=None):
        calls.append(("train", run_dir.parent.parent.name, run_dir.name, cfg))
        ckpt_lib.save_config(cfg, run_dir)
        return {"step": 2, "kappa": 0.5}

    def score(run_dir, out_dir, *, checkpoint, split, floor=True):
        cfg = ckpt_lib.load_config(run_dir)
        calls.append(("eval", run_dir.parent.name, run_dir.name, checkpoint, split))
        (test,) = cfg.data.test_subjects
        labels = pipeline.prepare_cohort(cfg.data).labels[test]
        pred = fake_predictions(labels, test, run_dir.name, cfg.seed)
        return {"per_subject": {test: {}}, "predictions": {test: pred}, "step": 2}

    monkeypatch.setattr(loop, "train_and_evaluate", train)
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", score)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_method_every_fold_and_seed_in_order_with_clean_splits(tmp_path, monkeypatch,
                                                                      tfds_dir):
    from eegkd_jax.data import pipeline, simulate

    config = tiny_config(tfds_dir)
    config.study.folds = 0  # all three subjects
    config.study.seeds = (0, 1)
    calls = []
    fake_training(monkeypatch, calls)
    result = study.run_study(config, tmp_path / "loso")

    trained = [c for c in calls if c[0] == "train"]
    assert [(fold, cfg.seed, method) for _, fold, method, cfg in trained] == [
        (f"fold-{i:02d}-sim-0{i + 1}", seed, m) for i in range(3) for seed in (0, 1)
        for m in DEFAULT]
    for _, fold, method, cfg in trained:
        test = fold[-6:]
        assert cfg.data.test_subjects == (test,) and test not in cfg.data.validation_subjects
        if method in ("transfer", "offline_kd", "offline_kd_epoch", "offline_kd_unpaired"):
            # from this fold's own teacher of the same seed
            assert cfg.kd.teacher_workdir == str(
                tmp_path / "loso" / fold / f"seed-{cfg.seed}" / "scalp_teacher")
    assert all(c[3:] == ("best", "test") for c in calls if c[0] == "eval")

    per_run = read_csv(tmp_path / "loso" / "per_run.csv")
    rows = study.FLOORS + DEFAULT
    assert [(r["test_subject"], r["seed"], r["method"]) for r in per_run] == [
        (f"sim-0{i + 1}", str(seed), m) for i in range(3) for seed in (0, 1) for m in rows]
    cohort = pipeline.prepare_cohort(config.data)
    kappa = {}
    for row in per_run:
        assert row["test_subject"] not in row["validation_subjects"].split()
        assert row["test_subject"] not in row["train_subjects"].split()
        if row["method"] in DEFAULT:
            labels = cohort.labels[row["test_subject"]]
            pred = fake_predictions(labels, row["test_subject"], row["method"], int(row["seed"]))
            want = expected_kappa(labels, pred)
            assert float(row["kappa"]) == pytest.approx(want, abs=1e-6)
            truth, _ = simulate.simulate_labels(row["test_subject"], seed=0, hours=0.2)
            assert float(row["true_kappa"]) == pytest.approx(
                expected_kappa(np.where(labels < 0, -1, truth), pred), abs=1e-6)
            kappa[row["test_subject"], int(row["seed"]), row["method"]] = want
    results = {r["method"]: r for r in read_csv(tmp_path / "loso" / "results.csv")}
    assert list(results) == list(rows)
    reference = loso.REFERENCE
    for method in DEFAULT:
        row = results[method]
        assert row["runs"] == "6"
        values = [k for (_, _, m), k in kappa.items() if m == method]
        assert float(row["kappa_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        if method == reference:
            assert row["kappa_minus_reference"] == ""
            continue
        per_subject = [np.mean([kappa[s, seed, method] - kappa[s, seed, reference]
                                for seed in (0, 1)]) for s in ("sim-01", "sim-02", "sim-03")]
        assert float(row["kappa_minus_reference"]) == pytest.approx(np.mean(per_subject), abs=1e-6)
        assert float(row["ci_low"]) <= float(row["kappa_minus_reference"]) <= float(row["ci_high"])
        assert (row["p_holm"] != "") == (method in loso.PRIMARY)
        assert (row["kappa_minus_unpaired"] != "") == (method in loso.PRIMARY)
        assert row["true_kappa_minus_reference"] != ""
    floor = results["floor_scalp"]
    assert floor["runs"] == "6" and 0.0 <= float(floor["kappa_mean"]) <= 1.0
    md = (tmp_path / "loso" / "results.md").read_text()
    assert f"Δκ vs {reference}" in md and "Holm over transfer, offline_kd" in md
    own_rows = [line for line in md.splitlines() if line.startswith(f"| {reference} |")]
    assert len(own_rows) >= 2 and not any("n/a" in line for line in own_rows)  # "–": no pair
    assert "| N1 |" in (tmp_path / "loso" / "confusion.md").read_text()
    assert (tmp_path / "loso" / "results.png").stat().st_size > 1000
    assert result["summary"]["online_kd"]["kappa"]["runs"] == 6

    calls.clear()
    again = study.run_study(config, tmp_path / "loso")  # all finished: nothing runs
    assert calls == [] and again["summary"] == result["summary"]


def test_primary_endpoint_against_scipy_on_a_fixed_table():
    """Δκ, its exact Wilcoxon p and Holm's correction on a fixed table of nine subjects x two
    seeds, against scipy and Holm's step-down rule written out."""
    from scipy import stats

    rng = np.random.default_rng(7)
    subjects = [f"sim-0{i}" for i in range(1, 10)]
    shifts = {"transfer": 0.04, "offline_kd": 0.01, "offline_kd_epoch": -0.02, "online_kd": 0.0}
    records = []
    table = {}
    for subject in subjects:
        for seed in (0, 1):
            base = 0.5 + 0.05 * rng.standard_normal()
            methods = {"ear_baseline_matched": {"test": dict.fromkeys(study.SCORES, base)}}
            for method, shift in shifts.items():
                value = base + shift + 0.02 * rng.standard_normal()
                methods[method] = {"test": dict.fromkeys(study.SCORES, value)}
                table[subject, seed, method] = value - base
            records.append({"test": subject, "seed": seed, "methods": methods})
    end = study.Endpoint("ear_baseline_matched", tuple(shifts), "")
    summary = study.summarize(records, ["ear_baseline_matched", *shifts], end)
    raw = {}
    for method in shifts:
        per_subject = [np.mean([table[s, seed, method] for seed in (0, 1)]) for s in subjects]
        paired = summary[method]["paired"]
        assert paired["mean"] == pytest.approx(np.mean(per_subject))
        raw[method] = stats.wilcoxon(per_subject, method="exact").pvalue
        assert paired["p_wilcoxon"] == pytest.approx(raw[method])
        assert paired["ci_low"] < paired["mean"] < paired["ci_high"]
    order = sorted(shifts, key=raw.get)
    running = 0.0
    for rank, method in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * raw[method]))
        assert summary[method]["paired"]["p_holm"] == pytest.approx(running)
    assert study.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])


def test_parts_run_apart_combine_into_the_one_study(tmp_path, monkeypatch, tfds_dir):
    """Folds run in two workdirs (two machines, say) tabulate exactly as one study of all of them;
    parts of different studies, or holding the same run twice, are refused."""
    fake_training(monkeypatch, [])
    whole = tiny_config(tfds_dir)
    whole.study.folds, whole.study.seeds = 0, (0, 1)
    study.run_study(whole, tmp_path / "whole")
    parts = []
    for name, subjects, seeds in (("a", ("sim-02",), (0, 1)), ("b", ("sim-03", "sim-01"), (1, 0))):
        config = tiny_config(tfds_dir)
        config.study.test_subjects, config.study.seeds = subjects, seeds
        study.run_study(config, tmp_path / name)
        parts.append(tmp_path / name)
    # Part b as an older eegkd wrote it, before steps_per_call existed.
    stored = json.loads((parts[1] / study.STUDY_CONFIG).read_text())
    del stored["steps_per_call"]
    (parts[1] / study.STUDY_CONFIG).write_text(json.dumps(stored))

    result = study.combine_studies(parts, tmp_path / "all")
    for name in ("per_run.csv", "results.csv"):
        assert (tmp_path / "all" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert "Combined from 2 study workdirs" in (tmp_path / "all" / "results.md").read_text()
    assert [(r["fold"], r["test"], r["seed"]) for r in result["folds"]] == [
        (i, f"sim-0{i + 1}", seed) for i in range(3) for seed in (0, 1)]
    combined = json.loads((tmp_path / "all" / study.COMBINED).read_text())
    assert [p["test_subjects"] for p in combined["parts"]] == [["sim-02"], ["sim-01", "sim-03"]]
    assert combined["fields_not_in_every_part"] == {"steps_per_call": {str(parts[0]): 1}}

    overlapping = tiny_config(tfds_dir)
    overlapping.study.test_subjects, overlapping.study.seeds = ("sim-02",), (1,)
    study.run_study(overlapping, tmp_path / "c")
    with pytest.raises(ValueError, match="sim-02 seed 1 is in both"):
        study.combine_studies([*parts, tmp_path / "c"], tmp_path / "all2")
    other = tiny_config(tfds_dir)
    other.study.test_subjects, other.max_steps = ("sim-03",), 3
    study.run_study(other, tmp_path / "d")
    with pytest.raises(ValueError, match=r"differ in max_steps"):
        study.combine_studies([parts[0], tmp_path / "d"], tmp_path / "all3")
    with pytest.raises(ValueError, match="distinct study workdirs"):
        study.combine_studies(parts, parts[0])
    with pytest.raises(ValueError, match="not a study workdir"):
        study.combine_studies([parts[0], tmp_path], tmp_path / "all4")
    monkeypatch.chdir(tmp_path)  # the record names the parts as given, not by this machine's root
    study.combine_studies(["a", "b"], "relative")
    combined = json.loads((tmp_path / "relative" / study.COMBINED).read_text())
    assert [p["workdir"] for p in combined["parts"]] == ["a", "b"]


def test_paired_difference_bootstraps_subjects_then_seeds():
    from scipy import stats

    diffs = {"a": [0.10, 0.12, 0.08], "b": [0.0, 0.02, -0.02], "c": [0.05, 0.05, 0.05],
             "d": [-0.01, 0.03, 0.01]}
    records = [{"test": subject, "methods": {
        "x": {"test": {"kappa": 0.5 + d}}, "ear_baseline": {"test": {"kappa": 0.5}}}}
        for subject, values in diffs.items() for d in values]
    paired = study.paired_difference(records, "x", "ear_baseline", resamples=2000)
    per_subject = [sum(v) / 3 for v in diffs.values()]
    assert paired["mean"] == pytest.approx(sum(per_subject) / 4)
    assert paired["subjects"] == 4 and paired["pairs"] == 12
    assert paired["ci_low"] < paired["mean"] < paired["ci_high"]
    assert paired["ci_low"] >= min(min(v) for v in diffs.values())
    assert paired["p_wilcoxon"] == pytest.approx(stats.wilcoxon(per_subject).pvalue)
    same = [{"test": r["test"], "methods": {"x": r["methods"]["ear_baseline"],
                                            "ear_baseline": r["methods"]["ear_baseline"]}}
            for r in records]
    assert study.paired_difference(same, "x", "ear_baseline")["p_wilcoxon"] is None
    assert study.paired_difference(records, "y", "ear_baseline") is None


def test_teacher_dependent_methods_need_the_teacher(tmp_path, tfds_dir):
    config = tiny_config(tfds_dir)
    config.study.methods = ("ear_baseline", "offline_kd")
    with pytest.raises(ValueError, match="add 'scalp_teacher'"):
        study.run_study(config, tmp_path / "loso")
    config.study.methods = ("ear_baseline", "kd")
    with pytest.raises(ValueError, match="choose from"):
        study.run_study(config, tmp_path / "loso")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, compilation_cache, tfds_dir):
    """Two folds of real two-step training and scoring of the scalp teacher. The other methods run
    through the same train_and_evaluate / evaluate_checkpoint (tested in test_train / test_eval),
    and compiling each one's steps costs ~30 s on a loaded 2-core CPU, so the test above checks
    all six, and their wiring to the fold's teacher, with stand-ins."""
    root = tmp_path_factory.mktemp("study")
    config = tiny_config(tfds_dir)
    config.study.methods = ("scalp_teacher",)
    result = study.run_study(config, root / "loso")
    return config, root / "loso", result


def test_tiny_study_trains_scores_and_tabulates(finished):
    config, workdir, result = finished
    per_fold = [r for r in read_csv(workdir / "per_run.csv") if r["method"] == "scalp_teacher"]
    assert [(r["test_subject"], r["seed"]) for r in per_fold] == [("sim-01", "0"), ("sim-02", "0")]
    for row in per_fold:
        assert row["test_subject"] not in row["validation_subjects"].split()
        assert row["test_subject"] not in row["train_subjects"].split()
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert int(row["test_epochs"]) > 0 and int(row["step"]) == 2  # validated at step 2
    row = read_csv(workdir / "results.csv")[-1]
    assert row["method"] == "scalp_teacher" and row["runs"] == "2"
    kappas = [float(p["kappa"]) for p in per_fold]
    assert float(row["kappa_mean"]) == pytest.approx(sum(kappas) / 2, abs=1e-6)
    saved = json.loads((workdir / "folds" / "fold-01-sim-02-seed-0.json").read_text())
    assert saved["validation"] == ["sim-03"] and saved["train"] == ["sim-01"]
    # The run's own saved config holds the fold's split, and its report the test night.
    run = workdir / "fold-01-sim-02" / "seed-0" / "scalp_teacher"
    run_config = json.loads((run / "checkpoints" / "config.json").read_text())
    assert run_config["data"]["test_subjects"] == ["sim-02"]
    assert run_config["data"]["validation_subjects"] == ["sim-03"]
    report = json.loads((run / "test" / "report.json").read_text())
    assert list(report["per_subject"]) == ["sim-02"] and report["metadata"]["input"] == "scalp"


def test_rerun_skips_finished_work_and_resumes_an_interrupted_run(finished, monkeypatch):
    config, workdir, result = finished
    from eegkd_jax import evaluate
    from eegkd_jax.train import loop

    calls = {"train": [], "eval": []}
    real_train, real_eval = loop.train_and_evaluate, evaluate.evaluate_checkpoint

    def counting_train(cfg, run_dir, announce=None):
        calls["train"].append(run_dir)
        return real_train(cfg, run_dir, announce=announce)

    def counting_eval(run_dir, *args, **kwargs):
        calls["eval"].append(run_dir)
        return real_eval(run_dir, *args, **kwargs)

    monkeypatch.setattr(loop, "train_and_evaluate", counting_train)
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", counting_eval)
    again = study.run_study(config, workdir)
    assert calls == {"train": [], "eval": []}  # everything was finished
    assert again["summary"] == result["summary"]

    # A run "killed" after its last checkpoint but before it was marked done: only it is trained
    # (resumed from its checkpoint, so no new steps) and scored again, to the same result.
    run = workdir / "fold-00-sim-01" / "seed-0" / "scalp_teacher"
    (run / study.DONE).unlink()
    (run / study.TEST_RESULT).unlink()
    lines = []
    again = study.run_study(config, workdir, announce=lines.append)
    assert calls["train"] == [run] and calls["eval"] == [run]
    # one line per run: the resumed one says from where, the others that they were done
    resumed = [line for line in lines if line.startswith("fold-00-sim-01/seed-0/scalp_teacher: ")]
    assert len(resumed) == 1 and "resumed from step" in resumed[0]
    assert len(lines) == len(again["folds"]) * len(config.study.methods)
    assert all(line.endswith(": finished before, skipped") for line in lines if line not in resumed)
    assert again["summary"] == result["summary"]

    changed = config.copy_and_resolve_references()
    changed.max_steps = 3
    with pytest.raises(ValueError, match=r"different config \(changed: \['max_steps'\]\)"):
        study.run_study(changed, workdir)


def test_cli_flags_reduced_and_overrides(monkeypatch):
    from absl import app, flags

    from eegkd_jax.cli import study as command
    from test_cli import absl_command

    argv = command.expand_reduced(["study", "--reduced", "--workdir=/tmp/x",
                                   "--config.max_steps=7", "--data_path=/data/eesm17"])
    assert argv[1] == f"--config={command.LOSO_CONFIG}:reduced"
    monkeypatch.setattr("sys.argv", argv)  # config_flags finds the --config.* overrides there
    with absl_command("study"):
        holder = command.define_flags()
        flags.FLAGS(argv)
        config = holder.value
        assert config.study.folds == 0 and config.max_steps == 7 and flags.FLAGS.workdir == "/tmp/x"
        assert flags.FLAGS.data_path == "/data/eesm17"
    with pytest.raises(app.UsageError, match="add ':reduced'"):
        command.expand_reduced(["study", "--reduced", "--config=configs/loso.py"])


def test_config_variants():
    assert isinstance(loso.get_config(), ml_collections.ConfigDict)
    assert loso.get_config().study.folds == 0  # full LOSO
    with pytest.raises(ValueError, match="do not combine"):
        loso.get_config("reduced,tiny")
