"""evaluate_checkpoint and eval.py on a tiny hand-made run: the real pipeline on a small simulated
cohort and a tiny U-Sleep whose checkpoints are written directly (scoring needs no training)."""

import contextlib
import json
import pathlib

import jax
import numpy as np
import pytest

from eegkd_jax.configs import supervised
from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import evaluate, report
from eegkd_jax.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLING_RATE = 8.0  # 240 samples per 30-s epoch keeps the model tiny


def tiny_config(cache_dir):
    config = supervised.get_config("ear,tiny")
    config.data.sampling_rate = SAMPLING_RATE
    config.data.cache_dir = str(cache_dir)
    config.data.simulated.subjects = 3  # 1 train, 1 validation, 1 test
    config.data.sequence_length = 5  # 24-epoch nights end in a padded partial sequence
    return config


# Compilation dominates these tests and they only run forward passes.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def run(tmp_path_factory, fast_compiles):
    """A workdir with two checkpoints: step 1 (validation kappa 0.5, the best) and step 2 (0.1)."""
    from eegkd_jax.data import pipeline
    from eegkd_jax.models import build_model, init_variables

    root = tmp_path_factory.mktemp("eval")
    config = tiny_config(root / "tfds")
    cohort = pipeline.prepare_cohort(config.data)
    module = build_model(config.model, in_channels=len(cohort.ear_names),
                         sampling_rate=SAMPLING_RATE)
    window = config.data.sequence_length * cohort.epoch_samples
    tx = state_lib.make_optimizer(config.optimizer, 10)
    state = jax.jit(lambda key: state_lib.create_state(
        key, lambda k: init_variables(module, k, (1, window, len(cohort.ear_names))), tx))(
        jax.random.PRNGKey(0))
    workdir = root / "run"
    ckpt_lib.save_config(config, workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=5)
    saved = {}
    for step, kappa in ((1, 0.5), (2, 0.1)):
        # Different weights per step, so the wrong checkpoint would give different predictions.
        params = jax.tree.map(lambda p, s=step: p * (1.0 + 0.5 * s), state.params)
        saved[step] = state.replace(step=state.step + step, params=params)
        checkpointer.save(saved[step].to_dict(), metrics={"kappa": kappa})
    checkpointer.close()
    return config, cohort, module, workdir, saved


def direct_predictions(config, cohort, module, state, subject):
    """The subject's night predicted without sharding or the collector, for comparison."""
    from eegkd_jax.data import pipeline

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False)[0].argmax(-1))
    night = np.full(cohort.num_epochs[subject], -1)
    for batch in pipeline.eval_batches(cohort, (subject,), config.data, global_batch_size=8):
        predicted = np.asarray(apply(variables, batch["ear"]))
        for row in np.flatnonzero(batch["valid"]):
            start = batch["epoch"][row]
            stop = min(start + predicted.shape[1], night.size)
            night[start:stop] = predicted[row, : stop - start]
    return night


def test_evaluate_best_checkpoint_on_test_split(run, tmp_path):
    config, cohort, module, workdir, saved = run
    results = evaluate.evaluate_checkpoint(workdir, tmp_path / "out")
    assert results["step"] == 1  # the best validation kappa, not the latest
    (test_subject,) = results["per_subject"]
    assert test_subject == cohort.subjects[-1]
    labels = cohort.labels[test_subject]
    assert results["overall"]["num_epochs"] == int(np.sum(labels != -1))

    out = tmp_path / "out"
    for name in ("report.json", "report.md", "confusion_matrix.png",
                 f"hypnograms/{test_subject}.png", f"hypnograms/{test_subject}.tsv"):
        assert (out / name).is_file(), name
    loaded = json.loads((out / "report.json").read_text())
    assert loaded["overall"] == results["overall"]
    assert loaded["metadata"]["step"] == 1 and loaded["metadata"]["input"] == "ear"

    tsv = out / "hypnograms" / f"{test_subject}.tsv"
    onsets, stages, probabilities = report.read_hypnogram_tsv(tsv)
    assert stages.size == cohort.num_epochs[test_subject]
    np.testing.assert_allclose(onsets, 30.0 * np.arange(stages.size))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    # The sharded, collected predictions are the model's own, epoch for epoch.
    expected = direct_predictions(config, cohort, module, saved[1], test_subject)
    np.testing.assert_array_equal(stages, expected)


def test_latest_checkpoint_explicit_subjects_and_errors(run, tmp_path):
    config, cohort, module, workdir, saved = run
    subjects = cohort.subjects[:2]
    # floor=False: the classical floor is fitted on the training subjects, which are among these.
    results = evaluate.evaluate_checkpoint(workdir, tmp_path / "latest", checkpoint="latest",
                                           subjects=subjects, floor=False)
    assert results["step"] == 2 and list(results["per_subject"]) == sorted(subjects)
    tsv = tmp_path / "latest" / "hypnograms" / f"{subjects[0]}.tsv"
    _, stages, _ = report.read_hypnogram_tsv(tsv)
    expected = direct_predictions(config, cohort, module, saved[2], subjects[0])
    np.testing.assert_array_equal(stages, expected)

    with pytest.raises(ValueError, match="not in the cohort"):
        evaluate.evaluate_checkpoint(workdir, tmp_path / "x", subjects=["sim-99"])
    with pytest.raises(ValueError, match="no teacher"):
        evaluate.evaluate_checkpoint(workdir, tmp_path / "x", teacher=True)
    with pytest.raises(FileNotFoundError, match="step 7"):
        evaluate.evaluate_checkpoint(workdir, tmp_path / "x", checkpoint=7)
    with pytest.raises(FileNotFoundError, match="nothing-here/checkpoints: no such directory"):
        evaluate.evaluate_checkpoint(tmp_path / "nothing-here")


@contextlib.contextmanager
def _eval_flags():
    """eegkd eval's flags defined for the block; afterwards absl's global flags are as they were
    (train.py defines some of the same names) and common.log_to_file is undone (a file handler on
    the root logger, a filter on absl's handler)."""
    import logging

    from absl import logging as absl_logging

    from eegkd_jax.cli import eval as eval_command
    from test_cli import absl_command

    try:
        with absl_command("eval"):
            eval_command.define_flags()
            yield
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
        absl_handler = absl_logging.get_absl_handler()
        absl_handler.filters[:] = [f for f in absl_handler.filters
                                   if type(f).__name__ != "_OnlyOurWarnings"]


def test_eval_cli(run, tmp_path, capsys):
    """eval.py's command (eegkd eval: eval.py is a wrapper of eegkd_jax/cli/eval.py)."""
    _, _, _, workdir, _ = run
    from absl import flags

    from eegkd_jax.cli import eval as eval_command

    assert "from eegkd_jax.cli import eval as command" in (ROOT / "eval.py").read_text()
    out = tmp_path / "cli"
    with _eval_flags():
        flags.FLAGS([
            "eval.py", f"--workdir={workdir}", f"--out_dir={out}", "--split=validation",
            "--checkpoint=2",
        ])
        eval_command.main(["eval.py"])
    printed = capsys.readouterr().out
    assert printed.startswith("step 2: acc ") and f"{out}/report.md" in printed
    # The summary line's abbreviations are explained on the next line (G above all).
    assert printed.splitlines()[1] == (
        "(acc = accuracy, kappa = Cohen's kappa, MF1 = macro-averaged F1, "
        "G = sqrt(macro sensitivity x macro specificity), n = scored epochs)")
    assert (out / "report.md").is_file()


def test_an_edited_config_json_changes_nothing(run, tmp_path, caplog):
    """Sampling rate, band-pass, mode and ear-derivation order edited in checkpoints/config.json:
    evaluation still feeds the model what it was trained on (the config saved with the step) and
    says the copy differs."""
    import logging
    import shutil

    _, _, _, workdir, _ = run
    edited_run = tmp_path / "edited"
    shutil.copytree(workdir, edited_run)
    path = ckpt_lib.checkpoint_dir(edited_run) / "config.json"
    edited = json.loads(path.read_text())
    edited["data"]["sampling_rate"] = 16.0
    edited["data"]["preprocess"]["bandpass_hz"] = [1.0, 3.0]
    edited["data"]["ear_derivations"] = edited["data"]["ear_derivations"][::-1]
    edited["mode"], edited["supervised_input"] = "supervised", "scalp"
    path.write_text(json.dumps(edited))
    want = evaluate.evaluate_checkpoint(workdir, tmp_path / "a", subjects=["sim-01"], floor=False)
    with caplog.at_level(logging.WARNING):
        got = evaluate.evaluate_checkpoint(edited_run, tmp_path / "b", subjects=["sim-01"],
                                           floor=False)
    assert got["overall"] == want["overall"]
    assert (tmp_path / "a" / "hypnograms" / "sim-01.tsv").read_text() == \
        (tmp_path / "b" / "hypnograms" / "sim-01.tsv").read_text()
    for field in ("data.sampling_rate", "data.preprocess.bandpass_hz", "data.ear_derivations",
                  "supervised_input"):
        assert field in caplog.text


def test_eval_never_starts_the_distributed_runtime_named_in_a_saved_config(run, tmp_path,
                                                                           monkeypatch, capsys):
    """A run whose saved config names a coordinator: eval.py evaluates it on this machine."""
    from absl import flags

    config, _, _, workdir, saved = run
    remote = config.copy_and_resolve_references()
    remote.distributed.initialize = "yes"
    remote.distributed.coordinator_address = "10.255.255.1:1234"
    remote.distributed.num_processes = 2
    other = tmp_path / "remote"
    checkpointer = ckpt_lib.Checkpointer(other)
    checkpointer.save(saved[1].to_dict(), config=remote, metrics={"kappa": 0.5})
    checkpointer.close()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    from eegkd_jax.cli import common
    from eegkd_jax.cli import eval as eval_command

    main = common.report_errors(eval_command.main)  # as eval.py runs it
    with _eval_flags():
        flags.FLAGS(["eval.py", f"--workdir={other}", f"--out_dir={tmp_path / 'out'}"])
        main(["eval.py"])
        # A missing workdir: one line, no traceback.
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["eval.py", f"--workdir={tmp_path / 'missing'}"])
        with pytest.raises(SystemExit):
            main(["eval.py"])
    assert calls == []
    out, err = capsys.readouterr()
    assert out.startswith("step 1: acc ")
    assert err.strip().splitlines()[-1] == (f"error: {tmp_path / 'missing'}/checkpoints: no such "
                                            f"directory; is {tmp_path / 'missing'} the workdir of "
                                            "a training run?")


def test_kd_checkpoint_scores_student_and_teacher(run, tmp_path):
    config, cohort, module, _, _ = run
    from eegkd_jax.models import build_model, init_variables

    kd = config.copy_and_resolve_references()
    kd.mode = "online_kd"
    teacher = build_model(kd.teacher, in_channels=len(cohort.scalp_names),
                          sampling_rate=SAMPLING_RATE)
    window = kd.data.sequence_length * cohort.epoch_samples
    tx = state_lib.make_optimizer(kd.optimizer, 10)
    state = jax.jit(lambda key: state_lib.create_state(
        key, lambda k: init_variables(module, k, (1, window, len(cohort.ear_names))), tx,
        init_teacher=lambda k: init_variables(teacher, k, (1, window, len(cohort.scalp_names))),
        teacher_tx=tx))(jax.random.PRNGKey(1))
    workdir = tmp_path / "kd"
    ckpt_lib.save_config(kd, workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir)
    checkpointer.save(state.replace(step=state.step + 3).to_dict())
    checkpointer.close()

    results = evaluate.evaluate_checkpoint(workdir, tmp_path / "kd-out", teacher=True)
    assert results["step"] == 3  # no checkpoint has metrics, so "best" is the latest
    student_report = json.loads((tmp_path / "kd-out" / "report.json").read_text())
    teacher_report = json.loads((tmp_path / "kd-out" / "teacher" / "report.json").read_text())
    assert student_report["metadata"]["input"] == "ear"
    assert teacher_report["metadata"]["input"] == "scalp"
    assert teacher_report["overall"] == results["teacher"]["overall"]
    # Same nights, so the same scored epochs, but a different network and input.
    assert teacher_report["overall"]["num_epochs"] == student_report["overall"]["num_epochs"]
