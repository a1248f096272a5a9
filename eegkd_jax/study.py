"""The leave-one-subject-out (LOSO) study of the paper as one resumable command.

    eegkd study --workdir=runs/loso [--reduced] [--data_path=DIR] [--config.*=...]

For every fold (one test subject):

1. validation subjects are taken from the fold's training side (the subjects that follow the test
   subject in sorted order, wrapping around), never the test subject;
2. each method is trained with ``train.loop.train_and_evaluate`` on the fold's split, in its own
   sub-workdir ``<workdir>/fold-XX-<subject>/seed-N/<method>``: the scalp teacher (supervised
   :scalp), the ear baseline, the ear baseline at the compute of teacher and student together,
   transfer learning and offline KD (both from that fold's teacher; offline KD also from an
   unpaired teacher, the control), online KD (configs/loso.py lists them);
3. each run is scored on the test subject with ``evaluate.evaluate_checkpoint`` using its best
   checkpoint by *validation* kappa (``study.checkpoint``); nothing is ever chosen on the test
   subject.

Every fold is run for each of ``study.seeds``, so the methods are compared paired by subject and
seed; the classical floors (``eegkd_jax.baseline``) are scored on every fold beside them.

Results: ``<workdir>/results.md``, ``results.csv`` and ``results.png`` (kappa, macro-F1 and accuracy
per method, mean and sample SD over runs; the primary endpoint of configs/loso.py: the paired
kappa difference to the compute-matched ear-only run with a 95% bootstrap CI, an exact Wilcoxon
p and Holm's correction over the KD methods, and the difference to the unpaired control; against
the true stages on simulated nights; per-stage F1), ``confusion.md`` (pooled confusion matrices),
``per_run.csv`` (one row per fold, seed and method, with its train / validation / test subjects),
``folds/<fold>-seed-<seed>.json``.

Parts: studies whose configs differ only in which folds and seeds they run (one machine each, say)
are tabulated as one with ``--combine=DIR,DIR,... --workdir=OUT`` (:func:`combine_studies`).

Resuming: a run whose training finished leaves ``done.json`` and one whose test evaluation finished
``test_result.json``; both are skipped on the next invocation. A run interrupted mid-training has
checkpoints but no ``done.json``: ``train_and_evaluate`` resumes it from its latest checkpoint. The
study's config is stored in ``study_config.json``; re-running the same workdir with a different
config is refused (the finished runs would no longer match it).

The command turns on JAX's persistent compilation cache (``eegkd_jax.compilation_cache``): every
fold compiles the same programs, so only the first fold pays for compiling.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from eegkd_jax import files


SCORES = ("accuracy", "kappa", "macro_f1")
STAGE_NAMES = ("W", "N1", "N2", "N3", "REM")
STUDY_CONFIG = "study_config.json"
DONE = "done.json"
TEST_RESULT = "test_result.json"
# Methods that start from the fold's scalp teacher.
NEEDS_TEACHER = ("transfer", "offline_kd")
TEACHER = "scalp_teacher"


class StudyConfigError(ValueError):
    """The workdir holds a study run with another config, or the study config is inconsistent."""


@dataclasses.dataclass(frozen=True)
class Fold:
    """One LOSO fold: its index, the held-out subject and the subjects it trains / validates on."""

    index: int
    test: str
    validation: tuple[str, ...]
    train: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"fold-{self.index:02d}-{self.test}"


def plan_folds(subjects: Sequence[str], study_cfg) -> list[Fold]:
    """The folds of the study over ``subjects``.

    Test subjects: ``study_cfg.test_subjects`` if given, else the first ``study_cfg.folds`` subjects
    in sorted order (0 = all). Validation: the ``num_validation_subjects`` subjects that follow the
    test subject in sorted order, wrapping around, so each fold validates on subjects of its own
    training side and, over a full LOSO, every subject validates once per validation slot.

    Raises:
      ValueError: unknown or repeated test subjects, or too few subjects to train on.
    """
    ordered = tuple(sorted(subjects))
    n_val = int(study_cfg.num_validation_subjects)
    if len(ordered) < n_val + 2:
        raise ValueError(f"LOSO needs at least {n_val + 2} subjects (1 test, {n_val} validation, "
                         f"1 training); the cohort has {list(ordered)}")
    tests = tuple(study_cfg.test_subjects or ())
    if tests:
        unknown = sorted(set(tests) - set(ordered))
        if unknown:
            raise ValueError(f"study.test_subjects {unknown} are not in the cohort {list(ordered)}")
        if len(set(tests)) != len(tests):
            raise ValueError(f"study.test_subjects repeats subjects: {list(tests)}")
    else:
        count = int(study_cfg.folds) or len(ordered)
        if not 0 < count <= len(ordered):
            raise ValueError(f"study.folds={study_cfg.folds} for a cohort of {len(ordered)}")
        tests = ordered[:count]
    folds = []
    for index, test in enumerate(tests):
        position = ordered.index(test)
        validation = tuple(sorted(ordered[(position + k) % len(ordered)]
                                  for k in range(1, n_val + 1)))
        train = tuple(s for s in ordered if s != test and s not in validation)
        folds.append(Fold(index, test, validation, train))
    return folds


def _mode_configs():
    """Method name -> (mode config file, variant), from configs/loso.py."""
    from eegkd_jax.configs import loso

    return loso.METHODS


def _steps_factor() -> dict[str, int]:
    from eegkd_jax.configs import loso

    return loso.STEPS_FACTOR


def method_config(config: ml_collections.ConfigDict, method: str, fold: Fold,
                  teacher_workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The training config of one method in one fold.

    Everything shared (data, networks, optimiser, steps) comes from the study config; the mode,
    the input and the distillation settings come from the mode's own config file
    (``configs/<mode>.py:<variant>``), so a study run trains what ``train.py`` would.
    """
    import importlib

    methods = _mode_configs()
    if method not in methods:
        raise ValueError(f"unknown study method {method!r}; known: {list(methods)}")
    file, variant = methods[method]
    mode_cfg = importlib.import_module(f"eegkd_jax.configs.{file}").get_config(variant)

    shared = config.to_dict()
    shared.pop("study", None)
    cfg = ml_collections.ConfigDict(shared)
    cfg.mode = mode_cfg.mode
    cfg.supervised_input = mode_cfg.supervised_input
    for field in ("variant", "feature_weight", "feature_level", "response_weight",
                  "temperature", "unpaired"):
        cfg.kd[field] = mode_cfg.kd[field]
    factor = _steps_factor().get(method, 1)
    if factor != 1:  # the compute-matched control: the same schedule stretched over more steps
        cfg.num_epochs = int(cfg.num_epochs) * factor
        if int(cfg.max_steps) > 0:
            cfg.max_steps = int(cfg.max_steps) * factor
    cfg.kd.teacher_workdir = ""
    if cfg.mode in NEEDS_TEACHER:
        cfg.kd.teacher_workdir = str(teacher_workdir)
        cfg.kd.teacher_checkpoint = config.study.checkpoint  # picked on validation, like any run
    if cfg.mode == "transfer":
        cfg.model = cfg.teacher.copy_and_resolve_references()  # initialised from the teacher
    cfg.data.test_subjects = (fold.test,)
    cfg.data.validation_subjects = fold.validation
    return cfg


# --------------------------------------------------------------------------------------------------
# Resumable steps


def _write_json(path: pathlib.Path, value: Any) -> None:
    """Process 0 writes the study's files (every process trains; see train.loop); a marker is
    either whole or absent."""
    files.write_json(path, value, main_only=True, sort_keys=True)


def check_study_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Stores the study config in a new workdir; in an existing one, refuses a different config."""
    wanted = json.loads(config.to_json_best_effort(sort_keys=True))
    path = workdir / STUDY_CONFIG
    if path.is_file():
        stored = json.loads(path.read_text())
        old, new = files.flatten(stored), files.flatten(wanted)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise StudyConfigError(
                f"{workdir} holds a study with a different config (changed: {changed[:8]}"
                f"{' ...' if len(changed) > 8 else ''}); its finished runs would not match. "
                "Use a new --workdir, or delete the old one to start over.")
        return
    _write_json(path, wanted)


def train_run(cfg: ml_collections.ConfigDict, run_dir: pathlib.Path,
              announce: Callable[[str], Any] | None = None) -> dict:
    """Trains one run unless its ``done.json`` says it finished; returns the final validation.
    ``announce`` gets one line per run, named by fold, seed and method: skipped, resumed from a
    step, or started fresh."""
    from eegkd_jax.train import loop

    name = "/".join(run_dir.parts[-3:])
    say = (lambda line: announce(f"{name}: {line}")) if announce else None
    done = run_dir / DONE
    if done.is_file():
        logging.info("study: %s finished before, skipped", run_dir)
        if say:
            say("finished before, skipped")
        return json.loads(done.read_text())["validation"]
    started = time.time()
    validation = loop.train_and_evaluate(cfg, run_dir, announce=say)
    _write_json(done, {"validation": validation, "seconds": round(time.time() - started, 1)})
    return validation


def test_scores(labels: np.ndarray, predictions: np.ndarray,
                true_stages: np.ndarray | None = None) -> dict:
    """The study's record of one night's predictions: accuracy, kappa and macro-F1 against the
    scored labels, each stage's F1 and the confusion counts (rows scored, columns predicted),
    and with ``true_stages`` (simulated nights) the same against the true stages on the same
    scored epochs, under "true"."""
    from eegkd_jax import metrics

    def scores(truth):
        summary = metrics.summarize(metrics.confusion_matrix(truth, predictions))
        out = {k: float(summary[k]) for k in SCORES}
        out["f1"] = {stage: float(v["f1"]) for stage, v in summary["per_class"].items()}
        out["confusion"] = summary["confusion_matrix"]["counts"]
        return out

    labels = np.asarray(labels)
    result = scores(labels)
    result["num_epochs"] = int((labels != -1).sum())
    if true_stages is not None:
        result["true"] = scores(np.where(labels == -1, -1, np.asarray(true_stages)))
    return result


def true_stages(data_cfg, subject: str, labels: np.ndarray) -> np.ndarray | None:
    """The stages a simulated night really went through (None for recorded data), checked
    against the cohort's scored labels so a changed simulator cannot pair the wrong nights."""
    if data_cfg.source != "simulated":
        return None
    from eegkd_jax.data import simulate

    sim = data_cfg.simulated
    truth, scored = simulate.simulate_labels(
        subject, seed=int(sim.seed), hours=float(sim.hours),
        epoch_seconds=float(data_cfg.epoch_seconds))
    if not sim.get("scorer_disagreement", True):
        scored = truth  # the cohort was built with the true stages as its labels
    labels = np.asarray(labels)
    kept = labels != -1
    if truth.shape != labels.shape or np.any(scored[kept] != labels[kept]):
        raise RuntimeError(f"{subject}: the simulator's labels no longer match the built cohort; "
                           "rebuild it (delete data.cache_dir)")
    return truth


def score_run(run_dir: pathlib.Path, fold: Fold, checkpoint: str, labels: np.ndarray,
              truth: np.ndarray | None = None) -> dict:
    """Scores one run on its fold's test subject unless ``test_result.json`` exists; returns
    :func:`test_scores` of the test night plus "step"."""
    from eegkd_jax import evaluate

    marker = run_dir / TEST_RESULT
    if marker.is_file():
        return json.loads(marker.read_text())
    # The fold's floors are scored once for all its runs (fold_floors).
    results = evaluate.evaluate_checkpoint(run_dir, run_dir / "test", checkpoint=checkpoint,
                                           split="test", floor=False)
    scored = sorted(results["per_subject"])
    if scored != [fold.test]:  # the run's own split must hold exactly the fold's test subject
        raise RuntimeError(f"{run_dir}: evaluated {scored}, expected [{fold.test!r}]")
    summary = test_scores(labels, results["predictions"][fold.test], truth)
    summary["step"] = int(results["step"])
    _write_json(marker, summary)
    return summary


# --------------------------------------------------------------------------------------------------
# The study


def run_study(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
              announce: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the whole LOSO study in ``workdir`` and writes its tables.

    Args:
      config: a ``configs/loso.py`` config (the shared settings plus the ``study`` group).
      workdir: the study's directory.
      announce: gets one line per run (see ``train_run``).

    Returns:
      {"folds": [fold records], "summary": {method: {metric: {"mean", "sd", "folds"}}},
       "files": {name: path}}. A fold record holds test / validation / train subjects and, per
      method, the validation result, the test scores and the subjects its run actually used.
    """
    from eegkd_jax import parallel
    from eegkd_jax.data import pipeline

    # Before anything touches a device: a multi-host study starts like each of its runs does.
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    methods = tuple(config.study.methods)
    known = _mode_configs()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise StudyConfigError(f"study.methods {list(methods)}: choose from {list(known)}")
    if any(m in NEEDS_TEACHER for m in methods) and TEACHER not in methods:
        raise StudyConfigError(f"study.methods {list(methods)} include {list(NEEDS_TEACHER)}, which "
                         f"start from the fold's teacher: add {TEACHER!r}")
    # The teacher first: transfer and offline KD restore it.
    methods = tuple(sorted(methods, key=lambda m: list(known).index(m)))
    check_study_config(config, workdir)

    cohort = pipeline.prepare_cohort(config.data)  # built once; every run reuses the shards
    folds = plan_folds(cohort.subjects, config.study)
    seeds = tuple(int(x) for x in config.study.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyConfigError(f"study.seeds must be distinct seeds, got {list(seeds)}")
    logging.info("study: %d folds x %d seeds x %d methods over %s", len(folds), len(seeds),
                 len(methods), list(cohort.subjects))
    records = []
    for fold in folds:
        fold_dir = workdir / fold.name
        labels = cohort.labels[fold.test]
        truth = true_stages(config.data, fold.test, labels)
        floors = fold_floors(cohort, fold, fold_dir, truth)
        for seed in seeds:
            seed_dir = fold_dir / f"seed-{seed}"
            record = {"fold": fold.index, "seed": seed, "test": fold.test,
                      "validation": list(fold.validation), "train": list(fold.train),
                      "methods": dict(floors)}
            for method in methods:
                run_dir = seed_dir / method
                cfg = method_config(config, method, fold, seed_dir / TEACHER)
                cfg.seed = seed
                splits = pipeline.subject_splits(cohort.subjects, cfg.data)
                if fold.test in splits.train + splits.validation or splits.test != (fold.test,):
                    raise RuntimeError(f"{run_dir}: split {splits} leaks the test subject "
                                       f"{fold.test}")
                logging.info("study: %s seed %d %s", fold.name, seed, method)
                validation = train_run(cfg, run_dir, announce)
                scores = score_run(run_dir, fold, str(config.study.checkpoint), labels, truth)
                record["methods"][method] = {
                    "test": scores, "validation": validation,
                    "train_subjects": list(splits.train),
                    "validation_subjects": list(splits.validation),
                    "test_subjects": list(splits.test),
                }
            _write_json(workdir / "folds" / f"{fold.name}-seed-{seed}.json", record)
            records.append(record)
            # partial tables as we go
            tables = write_tables(workdir, records, FLOORS + methods, endpoint(config.study))
    summary = summarize(records, FLOORS + methods, endpoint(config.study))
    return {"folds": records, "summary": summary, "files": tables}


# --------------------------------------------------------------------------------------------------
# Several workdirs, one study

# The fields that choose which runs a study holds, not how any run is trained: studies that differ
# only in these (e.g. each machine running its own folds) are parts of one study.
PART_FIELDS = ("study.test_subjects", "study.folds", "study.seeds")
COMBINED = "combined_from.json"


def combine_studies(workdirs: Sequence[str | pathlib.Path],
                    out: str | pathlib.Path) -> dict[str, Any]:
    """Tabulates the finished (fold, seed) runs of several study workdirs as one study in ``out``.

    The workdirs' configs must agree in every field except :data:`PART_FIELDS`. A field that only
    some of them have (added to eegkd after the others ran) is allowed and written, with its values,
    to ``<out>/combined_from.json`` beside the list of parts. Folds are renumbered in sorted order
    of their test subjects.

    Returns:
      {"folds": [fold records], "summary": ..., "files": ...} as :func:`run_study`.

    Raises:
      StudyConfigError: a workdir that holds no study, ``out`` among the parts, configs that
        differ, or one (test subject, seed) in two parts.
    """
    parts = [pathlib.Path(w).absolute() for w in workdirs]
    named = dict(zip(parts, map(str, workdirs)))  # as given, so the record holds no machine's root
    out = pathlib.Path(out).absolute()
    if len(parts) < 2 or len(set(parts)) != len(parts) or out in parts:
        raise StudyConfigError(f"combine: give two or more distinct study workdirs and a new "
                               f"--workdir for the table; got {[str(p) for p in parts]} -> {out}")
    configs = {}
    for part in parts:
        path = part / STUDY_CONFIG
        if not path.is_file():
            raise StudyConfigError(f"{part}: no {STUDY_CONFIG}, so not a study workdir")
        configs[part] = {k: v for k, v in files.flatten(json.loads(path.read_text())).items()
                         if k not in PART_FIELDS}
    not_everywhere = {}
    for key in sorted(set().union(*configs.values())):
        values = {named[p]: c[key] for p, c in configs.items() if key in c}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            raise StudyConfigError(f"combine: the studies differ in {key} ({values}); their runs "
                                   "are not one study")
        if len(values) < len(parts):
            not_everywhere[key] = values
    records, source = [], {}
    for part in parts:
        for path in sorted((part / "folds").glob("*.json")):
            record = json.loads(path.read_text())
            key = (record["test"], record["seed"])
            if key in source:
                raise StudyConfigError(f"combine: {key[0]} seed {key[1]} is in both {source[key]} "
                                       f"and {part}")
            source[key] = part
            records.append(record)
    if not records:
        raise StudyConfigError(f"combine: no finished (fold, seed) in {[str(p) for p in parts]}")
    subjects = sorted({r["test"] for r in records})
    records.sort(key=lambda r: (r["test"], r["seed"]))
    for r in records:
        r["fold"] = subjects.index(r["test"])
    out.mkdir(parents=True, exist_ok=True)
    if not_everywhere:
        logging.warning("combine: fields not in every part's config (newer eegkd): %s",
                        sorted(not_everywhere))
    _write_json(out / COMBINED, {
        "parts": [{"workdir": named[p],
                   "test_subjects": sorted({t for (t, _), q in source.items() if q == p}),
                   "seeds": sorted({s for (_, s), q in source.items() if q == p})}
                  for p in parts],
        "fields_not_in_every_part": not_everywhere})
    methods = FLOORS + tuple(_mode_configs())
    end = endpoint(ml_collections.ConfigDict(
        json.loads((parts[0] / STUDY_CONFIG).read_text())).get("study", {}))
    tables = write_tables(out, records, methods, end,
                          note=f"Combined from {len(parts)} study workdirs ({COMBINED}).")
    return {"folds": records, "summary": summarize(records, [m for m in methods if any(
        m in r["methods"] for r in records)], end), "files": tables}


# The classical floors (eegkd_jax.baseline) on each fold: trained on the fold's training subjects
# (the networks' validation subject only picks their checkpoint), scored on its test subject. Band
# powers without and with +-2 neighbouring epochs, the richer set (band powers and waveform shape),
# and the classical distillation: the ear floor fitted to the plain scalp floor's predictions on
# the training nights instead of their labels. They have no seed.
FLOORS = ("floor_scalp", "floor_scalp_context", "floor_scalp_rich", "floor_ear",
          "floor_ear_context", "floor_ear_rich", "floor_ear_distilled")
_FLOOR_SETTINGS = {  # name -> (signal, context, feature set, fitted to)
    "floor_scalp": ("scalp", 0, "bands", "labels"),
    "floor_scalp_context": ("scalp", 2, "bands", "labels"),
    "floor_scalp_rich": ("scalp", 0, "rich", "labels"),
    "floor_ear": ("ear", 0, "bands", "labels"),
    "floor_ear_context": ("ear", 2, "bands", "labels"),
    "floor_ear_rich": ("ear", 0, "rich", "labels"),
    "floor_ear_distilled": ("ear", 0, "bands", "scalp_floor"),
}


def fold_floors(cohort, fold: Fold, fold_dir: pathlib.Path,
                truth: np.ndarray | None = None) -> dict[str, dict]:
    """{floor method: {"test": scores}} of one fold, computed once and kept in the fold's folder."""
    from eegkd_jax import baseline

    marker = fold_dir / "floors.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    floors = {}
    for name, (signal, context, features, targets) in _FLOOR_SETTINGS.items():
        result = baseline.cohort_floor(cohort, fold.train, [fold.test], signal, context,
                                       features, targets)
        scores = test_scores(cohort.labels[fold.test], result["predictions"][fold.test], truth)
        floors[name] = {"test": {**scores, "step": 0},
                        "train_subjects": list(fold.train), "validation_subjects": [],
                        "test_subjects": [fold.test]}
    _write_json(marker, floors)
    return floors


# --------------------------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """The comparison fixed before the run (configs/loso.py): every method's paired difference is
    taken against ``reference``; Holm's correction runs over ``primary``; KD methods are also
    compared with the ``unpaired`` control."""

    reference: str
    primary: tuple[str, ...]
    unpaired: str


def endpoint(study_cfg) -> Endpoint:
    """The study config's endpoint; a study stored before the endpoint existed compared every
    method with ear-only and corrected nothing."""
    return Endpoint(str(study_cfg.get("reference", "ear_baseline")),
                    tuple(study_cfg.get("primary", ())), str(study_cfg.get("unpaired", "")))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and is not counted)."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


def summarize(records: Sequence[dict], methods: Sequence[str],
              end: Endpoint | None = None) -> dict[str, dict]:
    """{method: {metric: {"mean", "sd", "runs"}, "true_kappa": ..., "f1": {stage: mean},
    "confusion": pooled counts, "paired": ..., "paired_true": ..., "vs_unpaired": ...}} over the
    test scores of every (fold, seed) run; "sd" is the sample standard deviation (ddof=1), None
    for one run. "paired" is :func:`paired_difference` of the kappas against the endpoint's
    reference (with "p_holm" for the primary methods), "paired_true" the same against the true
    stages, "vs_unpaired" against the unpaired control (KD methods)."""
    end = end or Endpoint("ear_baseline", (), "")
    out = {}
    for method in methods:
        tests = [r["methods"][method]["test"] for r in records if method in r["methods"]]
        out[method] = {}
        for metric in SCORES:
            values = np.array([t[metric] for t in tests], dtype=np.float64)
            out[method][metric] = _mean_sd(values)
        trues = [t["true"]["kappa"] for t in tests if "true" in t]
        out[method]["true_kappa"] = _mean_sd(np.array(trues, dtype=np.float64))
        with_f1 = [t["f1"] for t in tests if "f1" in t]
        out[method]["f1"] = ({stage: float(np.mean([f[stage] for f in with_f1]))
                              for stage in with_f1[0]} if with_f1 else {})
        confusions = [t["confusion"] for t in tests if "confusion" in t]
        out[method]["confusion"] = (np.sum(confusions, axis=0).astype(int).tolist()
                                    if confusions else None)
        own = method == end.reference
        out[method]["paired"] = None if own else paired_difference(records, method, end.reference)
        out[method]["paired_true"] = (None if own else paired_difference(
            records, method, end.reference, truth=True))
        out[method]["vs_unpaired"] = (paired_difference(records, method, end.unpaired)
                                      if method in end.primary and end.unpaired else None)
    adjusted = holm([(out[m]["paired"] or {}).get("p_wilcoxon") if m in out else None
                     for m in end.primary])
    for method, p in zip(end.primary, adjusted):
        if method in out and out[method]["paired"]:
            out[method]["paired"]["p_holm"] = p
    return out


def _mean_sd(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()) if values.size else None,
            "sd": float(values.std(ddof=1)) if values.size > 1 else None,
            "runs": int(values.size)}


def paired_difference(records: Sequence[dict], method: str, reference: str,
                      metric: str = "kappa", resamples: int = 10_000,
                      truth: bool = False) -> dict | None:
    """method - reference on the same (test subject, seed), over every run that has both
    (``truth``: scored against the true stages, where the records have them).

    Returns {"mean", "ci_low", "ci_high", "p_wilcoxon", "subjects", "pairs"} or None without
    pairs. The 95% CI is a two-level bootstrap (subjects with replacement, then seeds within each
    drawn subject), since runs of one subject are not independent (written here: scipy's
    ``stats.bootstrap`` resamples one level only). The Wilcoxon signed-rank test
    is exact, on the per-subject mean differences (n = subjects, two-sided; subjects whose mean
    difference is 0 are dropped; None under 2 subjects or when every difference is 0).
    """
    from scipy import stats

    def value(test):
        return test["true"][metric] if truth else test[metric]

    by_subject: dict[str, list[float]] = {}
    for r in records:
        if method in r["methods"] and reference in r["methods"]:
            a, b = r["methods"][method]["test"], r["methods"][reference]["test"]
            if truth and ("true" not in a or "true" not in b):
                continue
            by_subject.setdefault(r["test"], []).append(float(value(a) - value(b)))
    if not by_subject:
        return None
    groups = [np.asarray(v) for v in by_subject.values()]
    rng = np.random.default_rng(0)
    n = len(groups)
    # resampled[g, r, s]: subject g's mean over its seeds drawn with replacement, for slot s of
    # replicate r; each replicate then draws which subject fills each of its n slots.
    resampled = np.stack([g[rng.integers(g.size, size=(resamples, n, g.size))].mean(-1)
                          for g in groups])
    drawn = rng.integers(n, size=(resamples, n))
    means = resampled[drawn, np.arange(resamples)[:, None], np.arange(n)[None, :]].mean(1)
    per_subject = np.array([g.mean() for g in groups])
    nonzero = per_subject[per_subject != 0]
    p = None
    if nonzero.size >= 2:
        p = float(stats.wilcoxon(nonzero, method="exact").pvalue)
    return {"mean": float(np.mean([g.mean() for g in groups])),
            "ci_low": float(np.percentile(means, 2.5)), "ci_high": float(np.percentile(means, 97.5)),
            "p_wilcoxon": p, "subjects": len(groups), "pairs": int(sum(g.size for g in groups))}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(workdir: pathlib.Path, records: Sequence[dict], methods: Sequence[str],
                 end: Endpoint | None = None, note: str = "") -> dict[str, pathlib.Path]:
    """Writes results.md (with ``note`` under its description), results.csv, per_run.csv,
    confusion.md (each method's confusion matrix pooled over its runs) and results.png for the
    runs in ``records``."""
    end = end or Endpoint("ear_baseline", (), "")
    methods = [m for m in methods if any(m in r["methods"] for r in records)]
    summary = summarize(records, methods, end)
    texts = {"results.md": _results_md(records, summary, methods, end, note),
             "results.csv": _results_csv(summary, methods),
             "per_run.csv": _per_run_csv(records, methods),
             "confusion.md": _confusion_md(summary, methods)}
    written = {name: files.write_atomic(workdir / name, text, main_only=True)
               for name, text in texts.items()}
    if files.is_main():
        written["results.png"] = plot_results(workdir / "results.png", summary, methods,
                                              end.reference)
    return written


def _per_run_csv(records: Sequence[dict], methods: Sequence[str]) -> str:
    rows = []
    for r in records:
        for method in methods:
            entry = r["methods"][method]
            test = entry["test"]
            true = test.get("true", {})
            rows.append([
                r["fold"], r["test"], r["seed"], method, " ".join(entry["validation_subjects"]),
                " ".join(entry["train_subjects"]), test["step"], test["num_epochs"],
                *(f"{test[m]:.6f}" for m in SCORES),
                *(f"{test['f1'][st]:.6f}" if "f1" in test else "" for st in STAGE_NAMES),
                f"{true['kappa']:.6f}" if true else ""])
    return _csv_text(["fold", "test_subject", "seed", "method", "validation_subjects",
                      "train_subjects", "step", "test_epochs", *SCORES,
                      *(f"f1_{st}" for st in STAGE_NAMES), "true_kappa"], rows)


def _results_csv(summary: dict, methods: Sequence[str]) -> str:
    def cell(value):
        return "" if value is None else f"{value:.6f}"

    def paired_cells(paired, keys=("mean", "ci_low", "ci_high", "p_wilcoxon")):
        return [cell((paired or {}).get(k)) for k in keys]

    rows = []
    for method in methods:
        m = summary[method]
        row = [method, m["kappa"]["runs"]]
        for metric in SCORES:
            row += [cell(m[metric]["mean"]), cell(m[metric]["sd"])]
        row += [cell(m["true_kappa"]["mean"]), cell(m["true_kappa"]["sd"])]
        row += [cell(m["f1"].get(st)) for st in STAGE_NAMES]
        row += paired_cells(m["paired"], ("mean", "ci_low", "ci_high", "p_wilcoxon", "p_holm"))
        row += paired_cells(m["paired_true"]) + paired_cells(m["vs_unpaired"])
        rows.append(row)
    return _csv_text(
        ["method", "runs", *(f"{m}_{k}" for m in SCORES for k in ("mean", "sd")),
         "true_kappa_mean", "true_kappa_sd", *(f"f1_{st}" for st in STAGE_NAMES),
         "kappa_minus_reference", "ci_low", "ci_high", "p_wilcoxon", "p_holm",
         "true_kappa_minus_reference", "true_ci_low", "true_ci_high", "true_p_wilcoxon",
         "kappa_minus_unpaired", "unpaired_ci_low", "unpaired_ci_high", "unpaired_p_wilcoxon"],
        rows)


def _results_md(records: Sequence[dict], summary: dict, methods: Sequence[str], end: Endpoint,
                note: str) -> str:
    stages = list(STAGE_NAMES)

    def mean_sd(m):
        return _fmt(m["mean"]) + ("" if m["sd"] is None else f" ± {_fmt(m['sd'])}")

    def diff(paired):
        if not paired:
            return "–"
        return f"{paired['mean']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]"

    subjects = sorted({r["test"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    primary = ", ".join(end.primary) or "none"
    lines = [
        "# Leave-one-subject-out study",
        "",
        f"{len(subjects)} test subject(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). "
        "Each network is scored on its fold's held-out subject with its best checkpoint by "
        "validation kappa; the floors (logistic regression on band powers, with +-2 epochs of "
        "context, on band powers and waveform shape, and fitted to the scalp floor's "
        "predictions) are trained on the same training subjects. Mean ± sample SD over runs.",
        "",
        f"Primary endpoint (fixed before the run): Δκ = kappa of the method minus kappa of "
        f"{end.reference} on the same subject and seed, against the scored labels; 95% "
        "two-level bootstrap CI (subjects, then seeds); exact Wilcoxon signed-rank p over the "
        f"subjects' mean differences; Holm over {primary}."
        + (f" Δκ vs unpaired: the same against {end.unpaired}." if end.unpaired else "")
        + (f" {note}" if note else ""),
        "",
        f"| Method | Kappa | Macro-F1 | Δκ vs {end.reference} [95% CI] | p | p (Holm) | "
        "Δκ vs unpaired [95% CI] | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        m = summary[method]
        paired = m["paired"] or {}
        lines.append(
            f"| {method} | {mean_sd(m['kappa'])} | {mean_sd(m['macro_f1'])} | "
            f"{diff(m['paired'])} | {_fmt(paired.get('p_wilcoxon')) if paired else '–'} | "
            f"{_fmt(paired['p_holm']) if 'p_holm' in paired else '–'} | "
            f"{diff(m['vs_unpaired'])} | {m['kappa']['runs']} |")
    if any(summary[m]["true_kappa"]["runs"] for m in methods):
        lines += ["", "Secondary: against the true stages (simulated nights only; same epochs).",
                  "", f"| Method | Kappa (true stages) | Δκ vs {end.reference} [95% CI] | p |",
                  "|---|---|---|---|"]
        for method in methods:
            m = summary[method]
            paired = m["paired_true"]
            lines.append(f"| {method} | {mean_sd(m['true_kappa'])} | {diff(paired)} | "
                         f"{_fmt(paired.get('p_wilcoxon')) if paired else '–'} |")
    if any(summary[m]["f1"] for m in methods):
        lines += ["", "Secondary: per-stage F1 (mean over runs, against the scored labels).", "",
                  "| Method | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        for method in methods:
            f1 = summary[method]["f1"]
            lines.append(f"| {method} | " + " | ".join(_fmt(f1.get(st)) for st in stages) + " |")
    return "\n".join(lines) + "\n"


def _confusion_md(summary: dict, methods: Sequence[str]) -> str:
    stages = list(STAGE_NAMES)
    confusion_lines = ["# Confusion matrices, pooled over each method's runs",
                       "", "Rows: scored stage; columns: predicted stage.", ""]
    for method in methods:
        counts = summary[method]["confusion"]
        if counts is None:
            continue
        confusion_lines += [f"## {method}", "", "| scored \\ predicted | " + " | ".join(stages)
                            + " |", "|---|" + "---|" * len(stages)]
        confusion_lines += [f"| {st} | " + " | ".join(str(c) for c in row) + " |"
                            for st, row in zip(stages, counts)]
        confusion_lines.append("")
    return "\n".join(confusion_lines)


def plot_results(path: pathlib.Path, summary: dict, methods: Sequence[str],
                 reference: str) -> pathlib.Path:
    """Two panels: each method's kappa (mean ± SD), and its paired Δκ to the reference with the
    CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods)
    y = np.arange(len(methods))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(methods) + 1.4), sharey=True)
    means = [summary[m]["kappa"]["mean"] for m in methods]
    sds = [summary[m]["kappa"]["sd"] or 0.0 for m in methods]
    left.errorbar(means, y, xerr=sds, fmt="o", color="black", capsize=3)
    left.set_yticks(y, methods)
    left.set_xlabel("test kappa (mean ± SD)")
    for i, m in enumerate(methods):
        paired = summary[m]["paired"]
        if paired:
            right.errorbar([paired["mean"]], [y[i]], fmt="o", color="tab:blue", capsize=3,
                           xerr=[[paired["mean"] - paired["ci_low"]],
                                 [paired["ci_high"] - paired["mean"]]])
    right.axvline(0.0, color="grey", linewidth=1)
    right.set_xlabel(f"Δκ vs {reference} (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
