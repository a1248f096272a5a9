"""``train_and_evaluate(config, workdir)``: the whole training run of any mode.

lock the workdir -> check this config against the one saved with the latest intact checkpoint ->
prepare_cohort -> subject splits -> models -> state (fresh, or restored from the latest intact
checkpoint: re-running the same command resumes) -> training data on the devices when it fits
(``data/resident.py``), else streamed by tf.data -> jitted sharded steps, ``steps_per_call`` per
call -> periodic validation over whole validation subjects -> guarded checkpoints (latest + best
kappa) -> CLU writers (TensorBoard + log) and ``<workdir>/metrics.jsonl``.

Guards: one run per workdir (``checkpoint.WorkdirLock``); a rerun whose model, data or mode
settings differ from its checkpoints' is refused before anything is written; a workdir holding only
damaged checkpoints is refused rather than trained from scratch; training stops, naming the last
good checkpoint, when a metric is not finite or a loss jumps above ``divergence_factor`` times its
running level; a state is validated (and its score logged) or checkpointed only when its parameters
are finite and the loss it gives is finite and in range.

Exact resumption: the state carries the step and the run's PRNG key (dropout keys are
``fold_in(key, step)``), and the pipeline's batch at step k depends only on (seed, k), so a run
resumed from step k continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from tqdm import tqdm

from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import configs
from eegkd_jax import errors
from eegkd_jax import files
from eegkd_jax import metrics as metrics_lib
from eegkd_jax import model_card
from eegkd_jax import parallel
from eegkd_jax.data.sampler import Sampler
from eegkd_jax.train import settings
from eegkd_jax.train import state as state_lib
from eegkd_jax.train import steps as steps_lib

KD_MODES = ("offline_kd", "online_kd")
SUMMARY_KEYS = ("accuracy", "kappa", "macro_f1")


# config.divergence_factor when the config has none: a loss 1000 times its running level.
DEFAULT_DIVERGENCE_FACTOR = 1e3
LOSS_KEYS = ("loss", "teacher_loss")
RUNNING_WINDOWS = 10  # logged means that make a loss's running level


class DivergedError(errors.UserError, FloatingPointError):
    """A loss jumped far above its running level; the checkpoints on disk predate it."""


class NonFiniteLossError(DivergedError):
    """Training produced a NaN / infinite loss or parameter; the checkpoints on disk predate it."""


class LossGuard:
    """Decides whether the metrics of a stretch of training are sound.

    Unsound: any metric not finite, or a loss ("loss", "teacher_loss") above ``factor`` times its
    running level, the mean of its last ``RUNNING_WINDOWS`` accepted values but at least 1, so that
    a loss trained to almost zero is not stopped by ordinary noise.

    Args:
      factor: config.divergence_factor.
      history: earlier logged train records (a resumed run's), oldest first.
    """

    def __init__(self, factor: float, history: Sequence[dict] = ()):
        self.factor = float(factor)
        self.recent = {k: collections.deque(maxlen=RUNNING_WINDOWS) for k in LOSS_KEYS}
        for record in history:
            self.accept(record)

    def level(self, key: str) -> float:
        return max(statistics.fmean(self.recent[key]) if self.recent[key] else 1.0, 1.0)

    def problem(self, values: dict[str, float]) -> tuple[type, str] | None:
        """(error type, what is wrong) for unsound ``values``, else None."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            return NonFiniteLossError, f"non-finite {bad}"
        for key in LOSS_KEYS:
            if key in values and values[key] > self.factor * self.level(key):
                return DivergedError, (f"{key} {values[key]:.4g} is over {self.factor:g} times its "
                                       f"running level {self.level(key):.4g}")
        return None

    def accept(self, values: dict) -> None:
        for key in LOSS_KEYS:
            value = values.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.recent[key].append(float(value))


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


def read_log(path: pathlib.Path) -> list[tuple[str, dict]]:
    """The records of a metrics.jsonl as (line, record) pairs. A torn last line (what a crash or
    power loss in the middle of a write leaves) is dropped with a warning; a bad line elsewhere is
    an error naming the file and line."""
    # Only "\n" ends a record: str.splitlines also splits at \r, \x0b, \x0c, \x1c-\x1e and \x85,
    # which would cut a torn tail of random bytes into lines that are then no longer the last.
    lines = [line + b"\n" for line in path.read_bytes().split(b"\n")]
    lines[-1] = lines[-1][:-1]  # what follows the last "\n": nothing, or a torn record
    if not lines[-1]:
        lines.pop()
    records = []
    for number, raw in enumerate(lines, 1):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip(" \t\r\n"):
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                logging.warning("%s: dropping its last line, %d bytes that are not a whole record "
                                "(a write cut short by a crash or power loss)", path, len(raw))
                continue
            raise errors.UserError(f"{path}:{number}: not a metrics record; fix or delete that "
                                   "line to resume") from None
        records.append((line if line.endswith("\n") else line + "\n", record))
    return records


class _Logger:
    """CLU writer (TensorBoard + absl log) plus the JSON-lines file; process 0 writes.

    ``train_history``: the logged train records up to the resumed step (every process reads them,
    so that every process's LossGuard decides alike)."""

    def __init__(self, workdir: pathlib.Path, resume_step: int):
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.is_main)
        self.jsonl = None
        self.train_history: list[dict] = []
        path = workdir / "metrics.jsonl"
        if path.exists():
            # A run killed after logging step k but before checkpointing it resumes below k and
            # logs those steps again: drop the records past the checkpoint it resumes from.
            kept = [(line, r) for line, r in read_log(path) if r["step"] <= resume_step]
            self.train_history = [r for _, r in kept if r.get("split") == "train"]
            if self.is_main:
                files.write_atomic(path, "".join(line for line, _ in kept))
        if self.is_main:
            self.jsonl = path.open("a")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(),
                                         **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        try:
            self.writer.flush()
            self.writer.close()
        finally:
            if self.jsonl:
                self.jsonl.close()


def _close_all(closers: Sequence[Callable[[], Any]], *, failing: bool) -> None:
    """Runs every closer. While another error propagates (``failing``), a closer's own failure
    (the disk is full for its last flush too) is logged rather than raised over that error."""
    for close in closers:
        try:
            close()
        except Exception as error:
            if not failing:
                raise
            logging.warning("while stopping after an error: %s: %s", type(error).__name__, error)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       announce: Callable[[str], Any] | None = None) -> dict:
    """Trains the configured mode in ``workdir`` (resuming from its latest intact checkpoint if
    any) and returns the final validation metrics (flat dict: accuracy, kappa, macro_f1, and
    teacher_* in KD modes, plus step).

    ``announce`` (e.g. ``print``, as ``eegkd train`` passes) is given one line, on process 0: the
    step and checkpoint the run resumed from, of how many steps, or that it starts fresh. The
    line is logged either way.

    Raises:
      checkpoint.WorkdirBusyError: another run holds the workdir.
      checkpoint.ConfigMismatchError: the workdir's checkpoints were trained with other model, data
        or mode settings (nothing is written).
      checkpoint.CheckpointError: the workdir holds checkpoints but none passes its checks.
      DivergedError / NonFiniteLossError: training went wrong; the message names the last good
        checkpoint.
    """
    settings.check_config(config)  # nonsense values are refused before anything starts
    parallel.maybe_initialize_distributed(config.distributed)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with ckpt_lib.WorkdirLock(workdir):
        return _train_and_evaluate(config, workdir, announce)


def _finite_fields(state: state_lib.TrainState) -> dict[str, jax.Array]:
    """{state field: whether every floating-point value in it is finite} (jit it)."""
    def finite(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)

    return {name: finite(tree) for name, tree in state.to_dict().items()}


def _resident_data(config: ml_collections.ConfigDict, cohort, subjects, keys, mesh, sampler):
    """The training subjects' epochs on the devices (data/resident.py) when
    ``data.device_resident`` says so ("auto": when they fit ``data.device_budget_gb`` per
    device), else None (the loop streams them through tf.data)."""
    from eegkd_jax.data import resident

    choice = str(config.data.get("device_resident", "auto")).lower()
    if choice not in ("auto", "yes", "no"):
        raise ValueError(f"config.data.device_resident must be auto, yes or no, got {choice!r}")
    if choice == "no":
        return None
    plan = resident.make_plan(cohort, subjects, config.data, sampler)
    need = resident.nbytes_per_device(plan, cohort, keys, config.data.resident_dtype) / 2**30
    budget = float(config.data.get("device_budget_gb", 0.0))
    if choice == "auto" and need > budget:
        logging.info("training data: %.2f GB per device is over data.device_budget_gb=%g; "
                     "streaming it", need, budget)
        return None
    data = resident.ResidentData(cohort, subjects, config.data, keys=keys, mesh=mesh,
                                 sampler=sampler, plan=plan)
    logging.info("training data on the devices: %d windows, %d epochs x %s per device (%.3f GB), "
                 "%s (largest relative rounding error %.2g)", plan.windows, plan.epochs, keys,
                 need, data.dtype, data.error)
    return data


def _open_checkpoints(config: ml_collections.ConfigDict, workdir: pathlib.Path
                      ) -> tuple[ckpt_lib.Checkpointer, int | None]:
    """The run's checkpoints and the step it resumes from, checked before anything is prepared or
    written: a resumed run must be the same run, and damaged checkpoints are never overwritten."""
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        ckpt_lib.check_resumable(checkpointer.config(resume_step), config,
                                 f"{checkpointer.directory}/{resume_step}")
    elif checkpointer.all_steps():
        problems = "; ".join(f"step {s}: {checkpointer.problem(s)}"
                             for s in checkpointer.all_steps())
        raise ckpt_lib.CheckpointError(
            f"{checkpointer.directory} holds checkpoints but none passes its checks ({problems}); "
            "not starting over: move them away to train from scratch, or use another --workdir")
    checkpointer.remove_leftovers()  # what a killed run left half-written or half-deleted
    return checkpointer, resume_step


@dataclasses.dataclass
class _Networks:
    """The mode's networks and optimisers, and how to make their first state."""

    student: Any
    teacher: Any  # None outside the KD modes
    tx: Any
    teacher_tx: Any  # online KD only
    input_key: str
    init_state: Callable  # jitted: rng -> replicated TrainState
    abstract: state_lib.TrainState  # its shapes, dtypes and shardings
    restored: dict | None  # offline KD / transfer: the scalp model's variables


def _networks(config: ml_collections.ConfigDict, cohort, total_steps: int, mesh) -> _Networks:
    from eegkd_jax.models import build_model, init_variables

    window = config.data.sequence_length * cohort.epoch_samples
    n_in = {"scalp": len(cohort.scalp_names), "ear": len(cohort.ear_names)}

    def make(model_cfg, signal):
        return build_model(model_cfg, in_channels=n_in[signal], sampling_rate=cohort.sampling_rate,
                           epoch_seconds=config.data.epoch_seconds)

    input_key = configs.student_input(config)
    student = make(configs.trained_model_config(config), input_key)
    teacher = restored = None
    teacher_cfg = config.teacher
    if config.mode in ("offline_kd", "transfer"):
        teacher_cfg, t_params, t_stats, t_step = ckpt_lib.restore_teacher(
            config.kd.teacher_workdir, config.kd.teacher_checkpoint)
        restored = {"params": t_params, "batch_stats": t_stats}
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
    return _Networks(student, teacher, tx, teacher_tx, input_key, init_state, abstract, restored)


def _first_state(config, nets: _Networks, checkpointer, resume_step, total_steps: int, mesh
                 ) -> tuple[state_lib.TrainState, str]:
    """The state to train from (the latest intact checkpoint, or a new one, holding the restored
    scalp model in offline KD and transfer) and the line that says which."""
    abstract = nets.abstract
    if resume_step is not None:
        # Falls back to an earlier intact step if the latest one fails to restore.
        state = abstract.replace(**checkpointer.restore(abstract.to_dict(), "latest"))
        restored = int(jax.device_get(state.step))
        opening = (f"resumed from step {restored} of {total_steps}: checkpoint "
                   f"{checkpointer.directory / str(restored)}")
        if restored >= total_steps:
            opening += " (training is finished; validating it again)"
        return state, opening
    opening = (f"starting fresh: no checkpoint in {checkpointer.directory}; {total_steps} steps "
               "to train")
    state = nets.init_state(jax.random.PRNGKey(config.seed))
    if config.mode == "offline_kd":
        placed = _place_replicated(
            nets.restored, {"params": abstract.teacher_params,
                            "batch_stats": abstract.teacher_batch_stats}, mesh, "teacher")
        state = state.replace(teacher_params=placed["params"],
                              teacher_batch_stats=placed["batch_stats"])
    elif config.mode == "transfer":
        placed = _place_replicated(
            nets.restored, {"params": abstract.params, "batch_stats": abstract.batch_stats},
            mesh, "transfer: scalp model -> ear model (config.model must equal the teacher's)")
        state = state.replace(params=placed["params"], batch_stats=placed["batch_stats"])
    return state, opening


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        announce: Callable[[str], Any] | None) -> dict:
    # Imported here so that importing the training library stays cheap (TensorFlow, models).
    from eegkd_jax.data import pipeline

    if config.mode not in ("supervised", "offline_kd", "online_kd", "transfer"):
        raise ValueError(f"unknown config.mode {config.mode!r}")
    checkpointer, resume_step = _open_checkpoints(config, workdir)
    mesh = parallel.make_mesh()
    parallel.check_global_batch_size(config.batch_size, mesh)
    replicated = parallel.replicated_sharding(mesh)
    # ---- data and networks
    cohort = pipeline.prepare_cohort(config.data)
    splits = pipeline.subject_splits(cohort.subjects, config.data)
    # One shard per device: which windows each device trains on, whichever path brings them.
    sampler = Sampler(pipeline.training_windows(cohort, splits.train, config.data).shape[0],
                      config.batch_size, mesh.devices.size, config.seed)
    steps_per_epoch = sampler.per_pass
    total_steps = total_train_steps(config, steps_per_epoch)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                  else steps_per_epoch)
    nets = _networks(config, cohort, total_steps, mesh)
    student, teacher, input_key = nets.student, nets.teacher, nets.input_key
    ckpt_lib.save_config(config, workdir)
    step_fn = steps_lib.build_train_step(config, student=student, tx=nets.tx, teacher=teacher,
                                         teacher_tx=nets.teacher_tx)
    state, opening = _first_state(config, nets, checkpointer, resume_step, total_steps, mesh)
    logging.info("%s", opening)
    if announce is not None and jax.process_index() == 0:
        announce(opening)

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
            num_shards=mesh.devices.size, process_index=jax.process_index(),
            process_count=jax.process_count())
        return evaluate(eval_fn, state, batches, splits.validation, mesh)

    # ---- loop
    start = int(jax.device_get(state.step))
    logger = _Logger(workdir, resume_step=start)
    guard = LossGuard(config.get("divergence_factor", DEFAULT_DIVERGENCE_FACTOR),
                      logger.train_history[-RUNNING_WINDOWS:])
    finite_fields = jax.jit(_finite_fields)
    resident_data = _resident_data(config, cohort, splits.train, configs.batch_keys(config), mesh,
                                   sampler)
    if resident_data is None:
        batches = pipeline.train_batches(
            cohort, splits.train, config.data, global_batch_size=config.batch_size,
            seed=config.seed, start_step=start, stop_step=total_steps,
            num_shards=mesh.devices.size, process_index=jax.process_index(),
            process_count=jax.process_count())

        def call_data(first: int, count: int):  # (data, inputs) of steps first .. first+count-1
            del first  # the stream is read in order
            return None, parallel.host_batches_to_global([next(batches) for _ in range(count)],
                                                         mesh)
    else:
        def call_data(first: int, count: int):  # only the step numbers travel
            steps = np.arange(first, first + count, dtype=np.int32)
            return resident_data.device_data(first), jax.device_put(steps, replicated)
    train_steps = parallel.jit_train_steps(
        step_fn, mesh, gather=None if resident_data is None else resident_data.gather)
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))  # one dispatch for all metrics
    steps_per_call = int(config.get("steps_per_call", 1))
    if steps_per_call < 1:
        raise ValueError(f"config.steps_per_call must be >= 1, got {steps_per_call}")
    # A call never crosses a log, eval or checkpoint step, nor (resident data) a pass.
    boundaries = (config.log_every_steps, eval_every, ckpt_every,
                  *([resident_data.per_pass] if resident_data is not None else []))
    sums, count, validation = None, 0, {}

    def stop(error_type: type, problem: str, when: str) -> None:
        last = checkpointer.latest_step()
        good = (f"the last good checkpoint is step {last} in {checkpointer.directory}"
                if last is not None else "no checkpoint was saved")
        hint = "try a lower --config.optimizer.learning_rate or --config.optimizer.grad_clip_norm"
        if error_type is DivergedError:
            hint += ", or a higher --config.divergence_factor if such a jump is expected"
        raise error_type(f"training stopped {when}: {problem}; {good}; {hint}")

    def check_and_log(step: int) -> None:
        nonlocal sums, count
        if sums is None:
            return
        means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        found = guard.problem(means)
        if found:
            stop(*found, f"between steps {step - count + 1} and {step}")
        guard.accept(means)
        logger.write(step, "train", means)
        sums, count = None, 0

    def check_state(step: int, data, last_input) -> None:
        """The state about to be validated or saved must be sound itself, not only the steps
        before it: its parameters finite, and the loss it gives finite and in range (the step it
        would take next, run on a copy on the same batch and thrown away)."""
        check_and_log(step)
        bad = [k for k, ok in jax.device_get(finite_fields(state)).items() if not ok]
        if bad:
            stop(NonFiniteLossError, f"non-finite values in {bad}", f"at step {step}")
        _, probe = train_steps(jax.tree.map(jnp.copy, state), data, last_input)
        found = guard.problem({k: float(v) for k, v in jax.device_get(probe).items()})
        if found:
            stop(found[0], f"the state of step {step} gives {found[1]}", f"at step {step}")

    progress = tqdm(total=total_steps, initial=start, desc=config.mode, unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    closers = (progress.close, logger.close, checkpointer.close)
    t0 = time.time()
    try:
        step = start
        while step < total_steps:
            # One call runs up to steps_per_call steps but ends at the next boundary; a shorter
            # stretch runs one step per call (two programs at most).
            room = min([total_steps - step] + [every - step % every for every in boundaries])
            n = steps_per_call if room >= steps_per_call else 1
            data, xs = call_data(step, n)
            state, call_metrics = train_steps(state, data, xs)
            # Sums stay on the device; nothing is synchronised until a log step.
            sums = call_metrics if sums is None else add(sums, call_metrics)
            count += n
            step += n
            progress.update(n)
            last = step == total_steps
            if step % config.log_every_steps == 0 or last:
                check_and_log(step)
                progress.set_postfix(steps_per_s=f"{(step - start) / (time.time() - t0):.2f}")
            checked = False
            if step % eval_every == 0 or last:
                # Checked before it is scored: a state the checks reject would leave its score in
                # metrics.jsonl and TensorBoard, though the run stops and saves nothing of it.
                check_state(step, data, jax.tree.map(lambda x: x[-1:], xs))
                checked = True
                validation = run_validation()
                if validation:
                    logger.write(step, "validation", validation)
                    logging.info("step %d validation %s", step, validation)
            if step % ckpt_every == 0 or last:
                if not checked:
                    check_state(step, data, jax.tree.map(lambda x: x[-1:], xs))
                checkpointer.save(state.to_dict(), config=config,
                                  metrics=validation if step % eval_every == 0 or last else None)
        if start >= total_steps:  # already finished: re-evaluate the restored final state
            validation = run_validation()
    except BaseException:
        _close_all(closers, failing=True)
        raise
    _close_all(closers, failing=False)
    final_step = int(jax.device_get(state.step))
    # What the networks were trained on, for predict and export to show (eegkd_jax.model_card),
    # with the scores of the checkpoint they restore: the best, not necessarily the last.
    best_step, best_validation = checkpointer.best_validation()
    model_card.save(workdir, model_card.build(config, cohort, splits, best_validation,
                                              step=best_step))
    return {"step": final_step, **validation}
