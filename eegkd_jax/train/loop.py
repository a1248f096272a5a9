"""``train_and_evaluate(config, workdir)``: the whole training run of any mode.

prepare_cohort -> subject splits -> models -> state (fresh, or restored from the latest checkpoint:
re-running the same command resumes) -> jitted sharded steps -> periodic validation over whole
validation subjects -> checkpoints (latest + best kappa) -> CLU writers (TensorBoard + log) and
``<workdir>/metrics.jsonl``.

Exact resumption: the state carries the step and the run's PRNG key (dropout keys are
``fold_in(key, step)``), and the pipeline's batch at step k depends only on (seed, k), so a run
resumed from step k continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
from absl import logging
import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from tqdm import tqdm

from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import metrics as metrics_lib
from eegkd_jax import parallel
from eegkd_jax.train import state as state_lib
from eegkd_jax.train import steps as steps_lib

KD_MODES = ("offline_kd", "online_kd")
SUMMARY_KEYS = ("accuracy", "kappa", "macro_f1")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / infinite loss; the checkpoints on disk predate it."""


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    total = int(config.num_epochs) * int(steps_per_epoch)
    if config.max_steps > 0:
        total = min(total, int(config.max_steps)) if total > 0 else int(config.max_steps)
    if total <= 0:
        raise ValueError(f"nothing to train: num_epochs={config.num_epochs}, "
                         f"steps_per_epoch={steps_per_epoch}, max_steps={config.max_steps}")
    return total


def check_same_architecture(saved: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict,
                            where: str, field: str) -> None:
    """Raises unless the model config saved with the teacher run equals ``wanted`` (so that this
    run's config.json describes the networks its checkpoints really hold)."""
    saved_d, wanted_d = saved.to_dict(), wanted.to_dict()
    diff = {k: (saved_d.get(k), wanted_d.get(k)) for k in set(saved_d) | set(wanted_d)
            if saved_d.get(k) != wanted_d.get(k)}
    if diff:
        overrides = " ".join(f"--config.{field}.{k}={v[0]}" for k, v in sorted(diff.items()))
        raise ValueError(f"the scalp model in {where} differs from config.{field}: "
                         f"{ {k: f'{a} vs {b}' for k, (a, b) in sorted(diff.items())} }; "
                         f"pass {overrides}")


def _place_replicated(tree: Any, abstract: Any, mesh, what: str) -> Any:
    """Host arrays -> replicated global arrays, checking them against the expected shapes (works on
    several hosts: each builds its addressable shards from its own copy)."""
    if jax.tree.structure(tree) != jax.tree.structure(abstract):
        raise ValueError(f"{what}: the saved variables do not match the configured model "
                         f"(different kind or size?)")
    sharding = parallel.replicated_sharding(mesh)

    def place(value, spec):
        value = np.asarray(value)
        if value.shape != spec.shape:
            raise ValueError(f"{what}: saved array of shape {value.shape} where the configured model "
                             f"has {spec.shape} (different model size?)")
        value = value.astype(spec.dtype)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    return jax.tree.map(place, tree, abstract)


class _Logger:
    """CLU writer (TensorBoard + absl log) plus the JSON-lines file; process 0 writes."""

    def __init__(self, workdir: pathlib.Path, resume_step: int):
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.is_main)
        self.jsonl = None
        if self.is_main:
            path = workdir / "metrics.jsonl"
            if path.exists():
                # A run killed after logging step k but before checkpointing it resumes below k and
                # logs those steps again: drop the records past the checkpoint it resumes from.
                kept = [line for line in path.read_text().splitlines(keepends=True)
                        if line.strip() and json.loads(line)["step"] <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(path)
            self.jsonl = path.open("a")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(),
                                         **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self.jsonl:
            self.jsonl.close()


def evaluate(eval_fn: Callable, state: state_lib.TrainState, batches, subjects, mesh) -> dict:
    """Runs ``eval_fn`` over every batch and scores the pooled predictions of whole subjects.

    Returns a flat dict: accuracy / kappa / macro_f1 of the trained model (and teacher_* when the
    eval step predicts with a teacher too), plus num_epochs.
    """
    collected: dict[str, list[np.ndarray]] = {}
    for host_batch in batches:
        out = jax.device_get(eval_fn(state, parallel.host_batch_to_global(host_batch, mesh)))
        valid = np.asarray(out["valid"], bool)
        seq_len = out["labels"].shape[1]
        per_epoch = {
            "labels": out["labels"][valid].reshape(-1),
            "subject": np.repeat(out["subject"][valid], seq_len),
            "prediction": out["prediction"][valid].reshape(-1),
        }
        if "teacher_prediction" in out:
            per_epoch["teacher_prediction"] = out["teacher_prediction"][valid].reshape(-1)
        for k, v in per_epoch.items():
            collected.setdefault(k, []).append(v)
    if not collected:
        raise ValueError(f"validation subjects {list(subjects)} gave no evaluation batches")
    arrays = {k: np.concatenate(v) for k, v in collected.items()}
    result = {}
    for prefix, key in (("", "prediction"), ("teacher_", "teacher_prediction")):
        if key not in arrays:
            continue
        scores = metrics_lib.evaluate_subjects(arrays["labels"], arrays[key], arrays["subject"],
                                               subject_names=list(subjects))["overall"]
        result.update({prefix + k: float(scores[k]) for k in SUMMARY_KEYS})
        result["num_epochs"] = int(scores["num_epochs"])
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains the configured mode in ``workdir`` (resuming from its latest checkpoint if any) and
    returns the final validation metrics (flat dict: accuracy, kappa, macro_f1, and teacher_* in KD
    modes, plus step)."""
    # Imported here so that importing the training library stays cheap (TensorFlow, models).
    from eegkd_jax.data import pipeline
    from eegkd_jax.models import build_model, init_variables

    parallel.maybe_initialize_distributed(config.distributed)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    parallel.check_global_batch_size(config.batch_size, mesh)
    if config.mode not in ("supervised", "offline_kd", "online_kd", "transfer"):
        raise ValueError(f"unknown config.mode {config.mode!r}")

    # ---- data
    cohort = pipeline.prepare_cohort(config.data)
    splits = pipeline.subject_splits(cohort.subjects, config.data)
    steps_per_epoch = pipeline.steps_per_epoch(cohort, splits.train, config.data, config.batch_size)
    total_steps = total_train_steps(config, steps_per_epoch)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                  else steps_per_epoch)
    window = config.data.sequence_length * cohort.epoch_samples
    n_in = {"scalp": len(cohort.scalp_names), "ear": len(cohort.ear_names)}

    # ---- models
    def make(model_cfg, signal):
        return build_model(model_cfg, in_channels=n_in[signal], sampling_rate=cohort.sampling_rate,
                           epoch_seconds=config.data.epoch_seconds)

    input_key = steps_lib.student_input(config)
    student = make(steps_lib.trained_model_config(config), input_key)
    teacher = teacher_params = None
    teacher_cfg = config.teacher
    if config.mode in ("offline_kd", "transfer"):
        teacher_cfg, t_params, t_stats, t_step = ckpt_lib.restore_teacher(
            config.kd.teacher_workdir, config.kd.teacher_checkpoint)
        teacher_params = {"params": t_params, "batch_stats": t_stats}
        check_same_architecture(teacher_cfg, config.teacher if config.mode == "offline_kd"
                                else config.model, config.kd.teacher_workdir,
                                "teacher" if config.mode == "offline_kd" else "model")
        logging.info("restored scalp model from %s (step %d)", config.kd.teacher_workdir, t_step)
    if config.mode in KD_MODES:
        teacher = make(teacher_cfg, "scalp")
    tx = state_lib.make_optimizer(config.optimizer, total_steps)
    teacher_tx = tx if config.mode == "online_kd" else None

    def init(rng):
        return state_lib.create_state(
            rng, lambda k: init_variables(student, k, (1, window, n_in[input_key])), tx,
            init_teacher=(lambda k: init_variables(teacher, k, (1, window, n_in["scalp"])))
            if teacher is not None else None,
            teacher_tx=teacher_tx)

    replicated = parallel.replicated_sharding(mesh)
    # The state is created on the devices, already replicated; its shapes serve the restore.
    init_state = jax.jit(init, out_shardings=replicated,
                         compiler_options=state_lib.CREATE_STATE_COMPILER_OPTIONS)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            abstract)

    ckpt_lib.save_config(config, workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume_step = checkpointer.latest_step()

    step_fn = steps_lib.build_train_step(config, student=student, tx=tx, teacher=teacher,
                                         teacher_tx=teacher_tx)
    train_step = parallel.jit_train_step(step_fn, mesh)

    # ---- state: resume or start
    if resume_step is not None:
        state = checkpointer.restore(abstract, "latest")
        logging.info("resumed from %s at step %d", checkpointer.directory, int(state.step))
    else:
        state = init_state(jax.random.PRNGKey(config.seed))
        if config.mode == "offline_kd":
            placed = _place_replicated(
                teacher_params, {"params": abstract.teacher_params,
                                 "batch_stats": abstract.teacher_batch_stats}, mesh, "teacher")
            state = state.replace(teacher_params=placed["params"],
                                  teacher_batch_stats=placed["batch_stats"])
        elif config.mode == "transfer":
            placed = _place_replicated(
                teacher_params, {"params": abstract.params, "batch_stats": abstract.batch_stats},
                mesh, "transfer: scalp model -> ear model (config.model must equal the teacher's)")
            state = state.replace(params=placed["params"], batch_stats=placed["batch_stats"])

    # ---- steps
    eval_fn = jax.jit(
        lambda s, b: steps_lib.eval_step(s, b, student=student, input_key=input_key,
                                         teacher=teacher),
        in_shardings=(replicated, parallel.batch_sharding(mesh)), out_shardings=replicated)

    def run_validation() -> dict:
        if not splits.validation:
            return {}
        batches = pipeline.eval_batches(
            cohort, splits.validation, config.data, global_batch_size=config.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count())
        return evaluate(eval_fn, state, batches, splits.validation, mesh)

    # ---- loop
    start = int(jax.device_get(state.step))
    logger = _Logger(workdir, resume_step=start)
    batches = pipeline.train_batches(
        cohort, splits.train, config.data, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start, stop_step=total_steps, process_index=jax.process_index(),
        process_count=jax.process_count())
    sums, count, validation = None, 0, {}

    def check_and_log(step: int) -> None:
        nonlocal sums, count
        if sums is None:
            return
        means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        if not all(math.isfinite(v) for v in means.values()):
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"non-finite training loss between steps {step - count + 1} and {step}: {means}. "
                f"Stopped; the last good checkpoint is step {last} in {checkpointer.directory}. "
                "Try a lower --config.optimizer.learning_rate or --config.optimizer.grad_clip_norm.")
        logger.write(step, "train", means)
        sums, count = None, 0

    progress = tqdm(total=total_steps, initial=start, desc=config.mode, unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    t0 = time.time()
    try:
        for step in range(start + 1, total_steps + 1):
            state, step_metrics = train_step(state, parallel.host_batch_to_global(next(batches), mesh))
            # Sums stay on the device; nothing is synchronised until a log step.
            sums = step_metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, step_metrics)
            count += 1
            progress.update(1)
            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
                check_and_log(step)
                progress.set_postfix(steps_per_s=f"{(step - start) / (time.time() - t0):.2f}")
            if step % eval_every == 0 or last:
                check_and_log(step)
                validation = run_validation()
                if validation:
                    logger.write(step, "validation", validation)
                    logging.info("step %d validation %s", step, validation)
            if step % ckpt_every == 0 or last:
                check_and_log(step)  # never save a state that produced a non-finite loss
                checkpointer.save(state, metrics=validation if step % eval_every == 0 or last
                                  else None)
        if start >= total_steps:  # already finished: re-evaluate the restored final state
            validation = run_validation()
    finally:
        progress.close()
        logger.close()
        checkpointer.close()
    return {"step": int(jax.device_get(state.step)), **validation}
