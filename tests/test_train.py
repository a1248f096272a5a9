"""train_and_evaluate end to end on tiny configs: one step of each mode, stop on a non-finite loss,
offline KD / transfer from a trained teacher, and the resumed log. Kills, damaged checkpoints,
concurrent runs and the other faults are in test_faults.py.

Most tests feed the loop from ``FakePipeline``, an in-memory implementation of the pipeline
contract (same functions, same batch dicts, batches a function of (seed, step) only), so they test
the loop and not TFDS; ``test_real_pipeline_one_step`` runs the real pipeline once.
"""

import dataclasses
import json
import logging
import pathlib
import sys

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SAMPLING_RATE = 8.0  # 240 samples per 30-s epoch keeps the models tiny


@dataclasses.dataclass
class FakeCohort:
    subjects: tuple
    num_epochs: dict
    scalp_names: tuple = ("A1-A2", "C3-O1", "C4-O2")
    ear_names: tuple = ("L-R", "L_E", "R_E")
    sampling_rate: float = SAMPLING_RATE
    epoch_samples: int = int(SAMPLING_RATE * 30)
    nights: dict = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> dict:
        return {subject: night[2] for subject, night in self.nights.items()}

    def read_epochs(self, subject, epochs):
        scalp, ear, labels = self.nights[subject]
        s = self.epoch_samples
        per_epoch = [(scalp[e * s:(e + 1) * s], ear[e * s:(e + 1) * s], labels[e]) for e in epochs]
        return tuple(np.stack(x) for x in zip(*per_epoch))


@dataclasses.dataclass
class FakeSplits:
    train: tuple
    validation: tuple
    test: tuple


class FakePipeline:
    """In-memory stand-in for eegkd_jax.data.pipeline (see the shared contract)."""

    @staticmethod
    def prepare_cohort(data_cfg):
        subjects = tuple(f"sub-{i:03d}" for i in range(1, data_cfg.simulated.subjects + 1))
        cohort = FakeCohort(subjects, {})
        for i, subject in enumerate(subjects):
            rng = np.random.default_rng(100 + i)
            n = 12 + 2 * i
            labels = rng.integers(0, 5, n).astype(np.int32)
            labels[rng.random(n) < 0.15] = -1
            t = np.arange(n * cohort.epoch_samples) / SAMPLING_RATE
            freq = 0.5 + np.repeat(np.maximum(labels, 0), cohort.epoch_samples) * 0.6
            base = np.sin(2 * np.pi * freq * t)[:, None]
            scalp = base + 0.3 * rng.normal(size=(t.size, 3))
            ear = 0.6 * base + 0.8 * rng.normal(size=(t.size, 3))
            cohort.nights[subject] = (scalp.astype(np.float32), ear.astype(np.float32), labels)
            cohort.num_epochs[subject] = n
        return cohort

    @staticmethod
    def subject_splits(subjects, data_cfg):
        subjects = tuple(sorted(subjects))
        nv, nt = data_cfg.num_validation_subjects, data_cfg.num_test_subjects
        return FakeSplits(subjects[: len(subjects) - nv - nt],
                          subjects[len(subjects) - nv - nt: len(subjects) - nt],
                          subjects[len(subjects) - nt:])

    @staticmethod
    def _sequences(cohort, subjects, seq_len):
        return [(s, e) for s in subjects for e in range(0, cohort.num_epochs[s] - seq_len + 1)]

    @staticmethod
    def _example(cohort, subject, first, seq_len):
        scalp, ear, labels = cohort.nights[subject]
        lo, hi = first * cohort.epoch_samples, (first + seq_len) * cohort.epoch_samples
        lab = labels[first:first + seq_len]
        pad = seq_len - lab.size
        if pad:
            width = pad * cohort.epoch_samples
            return (np.pad(scalp[lo:hi], ((0, width), (0, 0))), np.pad(ear[lo:hi], ((0, width), (0, 0))),
                    np.pad(lab, (0, pad), constant_values=-1))
        return scalp[lo:hi], ear[lo:hi], lab

    @classmethod
    def training_windows(cls, cohort, subjects, data_cfg):
        index = {s: i for i, s in enumerate(subjects)}
        return np.array([(index[s], e) for s, e in
                         cls._sequences(cohort, subjects, data_cfg.sequence_length)], np.int64)

    @classmethod
    def train_batches(cls, cohort, subjects, data_cfg, *, global_batch_size, seed, start_step=0,
                      stop_step=None, num_shards=None, process_index=0, process_count=1):
        seq_len = data_cfg.sequence_length
        items = cls._sequences(cohort, subjects, seq_len)
        per_pass = max(1, len(items) // global_batch_size)
        b = global_batch_size // process_count
        step = start_step
        while stop_step is None or step < stop_step:
            order = np.random.default_rng([seed, step // per_pass]).permutation(len(items))
            chosen = order[(step % per_pass) * global_batch_size:][:global_batch_size]
            chosen = chosen[process_index * b:(process_index + 1) * b]
            parts = [cls._example(cohort, *items[j], seq_len) for j in chosen]
            yield {"scalp": np.stack([p[0] for p in parts]), "ear": np.stack([p[1] for p in parts]),
                   "labels": np.stack([p[2] for p in parts]).astype(np.int32)}
            step += 1

    @classmethod
    def eval_batches(cls, cohort, subjects, data_cfg, *, global_batch_size, num_shards=None,
                     process_index=0, process_count=1):
        seq_len = data_cfg.sequence_length
        items = [(i, s, e) for i, s in enumerate(subjects)
                 for e in range(0, cohort.num_epochs[s], seq_len)]
        n_batches = -(-len(items) // global_batch_size)
        b = global_batch_size // process_count
        for k in range(n_batches):
            chunk = items[k * global_batch_size:(k + 1) * global_batch_size]
            parts = [cls._example(cohort, s, e, seq_len) + (i, e, True) for i, s, e in chunk]
            while len(parts) < global_batch_size:
                z = parts[0]
                parts.append((np.zeros_like(z[0]), np.zeros_like(z[1]), np.full(seq_len, -1), 0, 0, False))
            parts = parts[process_index * b:(process_index + 1) * b]
            yield {"scalp": np.stack([p[0] for p in parts]), "ear": np.stack([p[1] for p in parts]),
                   "labels": np.stack([p[2] for p in parts]).astype(np.int32),
                   "subject": np.array([p[3] for p in parts], np.int32),
                   "epoch": np.array([p[4] for p in parts], np.int32),
                   "valid": np.array([p[5] for p in parts], bool)}


def install_fake_pipeline():
    import eegkd_jax.data

    sys.modules["eegkd_jax.data.pipeline"] = FakePipeline
    eegkd_jax.data.pipeline = FakePipeline


def tiny(module_name, arg="tiny", **overrides):
    import importlib

    config = importlib.import_module(f"configs.{module_name}").get_config(arg)
    config.data.sampling_rate = SAMPLING_RATE
    config.data.simulated.subjects = 4
    for model in (config.model, config.teacher):
        model.depth = 1  # compile time dominates these tests; depth 1 still has a skip and pooling
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture
def fake_pipeline(monkeypatch, compilation_cache):
    import eegkd_jax.data

    monkeypatch.setitem(sys.modules, "eegkd_jax.data.pipeline", FakePipeline)
    monkeypatch.setattr(eegkd_jax.data, "pipeline", FakePipeline, raising=False)
    # Not jax_disable_most_optimizations here: with it, XLA:CPU returns NaN gradients for the tiny
    # U-Sleep on one device (measured with JAX 0.10.2; optimised compiles are finite).
    yield FakePipeline


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_online_kd_one_step_end_to_end(fake_pipeline, tmp_path):
    from eegkd_jax.train import loop

    config = tiny("online_kd", max_steps=1)
    result = loop.train_and_evaluate(config, tmp_path)
    assert result["step"] == 1
    for key in ("kappa", "accuracy", "macro_f1", "teacher_kappa", "teacher_accuracy"):
        assert np.isfinite(result[key])
    records = _lines(tmp_path / "metrics.jsonl")
    assert {r["split"] for r in records} == {"train", "validation"}
    train = next(r for r in records if r["split"] == "train")
    assert {"loss", "teacher_loss", "feature_mse", "grad_norm"} <= set(train)
    assert (tmp_path / "checkpoints" / "1" / "manifest.json").is_file()
    assert json.loads((tmp_path / "checkpoints" / "1" / "config.json").read_text())["mode"] == \
        "online_kd"
    assert (tmp_path / "checkpoints" / "config.json").is_file()
    assert list(tmp_path.glob("events.out.tfevents*")), "TensorBoard events missing"
    # Running the finished command again resumes at the end and reports the same metrics.
    again = loop.train_and_evaluate(config, tmp_path)
    assert again == result


def test_teacher_then_offline_kd_and_transfer(fake_pipeline, tmp_path):
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop

    with pytest.raises(FileNotFoundError, match="supervised.py:scalp"):
        loop.train_and_evaluate(tiny("offline_kd", max_steps=1,
                                     **{"kd.teacher_workdir": str(tmp_path / "none")}),
                                tmp_path / "kd0")
    teacher = loop.train_and_evaluate(tiny("supervised", "scalp,tiny", max_steps=2), tmp_path / "t")
    assert "teacher_kappa" not in teacher
    with pytest.raises(ValueError, match="--config.teacher.initial_filters=3"):
        loop.train_and_evaluate(tiny("offline_kd", max_steps=1, **{
            "kd.teacher_workdir": str(tmp_path / "t"), "teacher.initial_filters": 4}),
            tmp_path / "mismatch")
    kd = loop.train_and_evaluate(
        tiny("offline_kd", max_steps=2, **{"kd.teacher_workdir": str(tmp_path / "t"),
                                           "kd.response_weight": 1.0}), tmp_path / "kd")
    # The frozen teacher scores exactly what the scalp run scored at that checkpoint.
    assert kd["teacher_kappa"] == pytest.approx(teacher["kappa"])
    _, t_params, _, _ = checkpoint.restore_teacher(tmp_path / "t")
    ckpt = checkpoint.Checkpointer(tmp_path / "kd", read_only=True)
    saved = ckpt.restore_raw("latest").state
    for a, b in zip(jax.tree.leaves(saved["teacher_params"]), jax.tree.leaves(t_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    transfer = loop.train_and_evaluate(
        tiny("transfer", max_steps=1, **{"kd.teacher_workdir": str(tmp_path / "t")}),
        tmp_path / "tr")
    assert transfer["step"] == 1 and "teacher_kappa" not in transfer


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fake_pipeline, tmp_path,
                                                                  monkeypatch):
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop, steps

    real_build = steps.build_train_step
    poison_from = {"state_step": 3}

    def poisoned(*args, **kwargs):
        step = real_build(*args, **kwargs)

        def wrapped(state, batch):
            new, metrics = step(state, batch)
            # The loss of every state from step poison_from on is NaN (as after a divergence).
            bad = state.step >= poison_from["state_step"]
            return new, dict(metrics, loss=jax.numpy.where(bad, jax.numpy.nan, metrics["loss"]))
        return wrapped

    monkeypatch.setattr(steps, "build_train_step", poisoned)
    config = tiny("supervised", "ear,tiny", max_steps=4, log_every_steps=1)  # 3 steps: 1 epoch
    # The last state's loss is NaN: caught before the final save.
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3: the state of step 3 gives "
                                                      r"non-finite \{'loss': nan\}; the last good "
                                                      r"checkpoint is step 2 in") as info:
        loop.train_and_evaluate(config, tmp_path / "late")
    assert "\n" not in str(info.value)
    assert checkpoint.Checkpointer(tmp_path / "late", read_only=True).all_steps() == [2]
    # The state of step 2 gives a NaN loss itself: it is not saved, and nothing before it was.
    poison_from["state_step"] = 2
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 2: the state of step 2 gives "
                                                      r"non-finite.*no checkpoint was saved"):
        loop.train_and_evaluate(config, tmp_path / "early")
    assert checkpoint.Checkpointer(tmp_path / "early", read_only=True).all_steps() == []


def _final_params(workdir):
    from eegkd_jax import checkpoint

    restored = checkpoint.read_run(workdir, "latest")
    return restored.step, jax.tree.leaves(restored.state["params"])


@pytest.mark.parametrize("resident", ["yes", "no"])
def test_steps_per_call_and_a_resume_inside_a_call_give_the_same_run(fake_pipeline, tmp_path,
                                                                      resident):
    """8 steps as 2 calls of 4 == 8 calls of 1 == 6 steps (a call of 4, then 2 single steps)
    resumed from step 6, which lies inside the second call of 4."""
    from eegkd_jax.train import loop

    every = dict(log_every_steps=8, eval_every_steps=8, checkpoint_every_steps=8, num_epochs=10)
    runs = {
        "k4": dict(steps_per_call=4, max_steps=8, **every),
        "k1": dict(steps_per_call=1, max_steps=8, **every),
        "resumed": dict(steps_per_call=4, max_steps=6, num_epochs=10, log_every_steps=6,
                        eval_every_steps=6,
                        checkpoint_every_steps=6),
    }
    for name, overrides in runs.items():
        config = tiny("supervised", "ear,tiny", **overrides)
        config.data.device_resident = resident
        loop.train_and_evaluate(config, tmp_path / name)
    config = tiny("supervised", "ear,tiny", steps_per_call=4, max_steps=8, **every)
    config.data.device_resident = resident
    loop.train_and_evaluate(config, tmp_path / "resumed")  # from step 6 to 8
    step, want = _final_params(tmp_path / "k4")
    assert step == 8
    for name in ("k1", "resumed"):
        step, got = _final_params(tmp_path / name)
        assert step == 8
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses = {name: [r["loss"] for r in _lines(tmp_path / name / "metrics.jsonl")
                     if r["split"] == "train"] for name in runs}
    np.testing.assert_allclose(losses["k1"], losses["k4"], rtol=1e-5)  # the mean of steps 1-8


@pytest.mark.parametrize("resident", ["yes", "no"])
def test_real_pipeline_one_step(tmp_path, compilation_cache, resident):
    """The tiny supervised config through the real simulated cohort and TFDS shards, with the
    training data on the devices or streamed through tf.data."""
    from eegkd_jax.train import loop

    from eegkd_jax.configs import supervised

    config = supervised.get_config("ear,tiny")
    config.max_steps = 1
    config.data.cache_dir = str(tmp_path / "tfds")
    config.data.device_resident = resident
    result = loop.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 1 and 0.0 <= result["accuracy"] <= 1.0
    assert result["num_epochs"] > 0


def test_resumed_log_drops_records_past_the_checkpoint(tmp_path):
    # A run killed after logging step 4 but before checkpointing it resumes from step 2 and logs
    # steps 3 and 4 again; the log must not hold them twice.
    from eegkd_jax.train import loop

    with (tmp_path / "metrics.jsonl").open("w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "split": "train", "loss": float(step)}) + "\n")
    logger = loop._Logger(tmp_path, resume_step=2)
    logger.write(3, "train", {"loss": 30.0})
    logger.close()
    records = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_resumed_log_drops_a_torn_last_line_and_refuses_a_bad_one_inside(tmp_path, caplog):
    from eegkd_jax import errors
    from eegkd_jax.train import loop

    path = tmp_path / "metrics.jsonl"
    good = "".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in (1, 2))
    path.write_text(good + '{"step": 3, "spl')  # what a power loss mid-write leaves
    with caplog.at_level(logging.WARNING):
        logger = loop._Logger(tmp_path, resume_step=4)
    logger.close()
    assert "dropping its last line" in caplog.text
    assert path.read_text() == good and len(logger.train_history) == 2
    path.write_text('{"step": 1, "spl\n' + good)
    with pytest.raises(errors.UserError, match=r"metrics.jsonl:1: not a metrics record"):
        loop._Logger(tmp_path, resume_step=4)


def test_loss_guard_running_level():
    from eegkd_jax.train import loop

    guard = loop.LossGuard(100.0, [{"loss": 2.0}, {"loss": 4.0}])
    assert guard.level("loss") == 3.0 and guard.problem({"loss": 299.0}) is None
    kind, why = guard.problem({"loss": 301.0, "grad_norm": 1.0})
    assert kind is loop.DivergedError and "over 100 times its running level 3" in why
    assert guard.problem({"loss": float("inf")})[0] is loop.NonFiniteLossError
    low = loop.LossGuard(100.0, [{"loss": 1e-6}])  # trained to ~0: the level is at least 1
    assert low.problem({"loss": 0.5}) is None


def test_the_model_card_names_the_checkpoint_the_other_commands_use(fake_pipeline, tmp_path,
                                                                    monkeypatch):
    """Validation at step 2 scores better than at the last step: the card records step 2 and its
    scores (what eval, predict and export restore as "best"), the result the last step's."""
    import itertools

    from eegkd_jax import checkpoint, model_card
    from eegkd_jax.train import loop

    real = loop.evaluate
    kappas = itertools.chain([0.5], itertools.repeat(0.1))

    def scored(*args):
        return {**real(*args), "kappa": next(kappas)}

    monkeypatch.setattr(loop, "evaluate", scored)
    result = loop.train_and_evaluate(tiny("supervised", max_steps=4), tmp_path)
    assert result["step"] > 2 and result["kappa"] == 0.1
    card = model_card.load(tmp_path)
    assert card["metrics"]["step"] == 2 and card["metrics"]["validation"]["kappa"] == 0.5
    assert isinstance(card["metrics"]["validation"]["num_epochs"], int)
    checkpointer = checkpoint.Checkpointer(tmp_path, read_only=True)
    assert checkpointer.best_step() == 2
    checkpointer.close()
