"""Checkpoints of a run in ``<workdir>/checkpoints`` (orbax), the run's config beside them, and
restoring a trained teacher from another run's workdir.

Kept: the latest ``keep`` checkpoints plus the one with the best validation kappa. Orbax writes each
step into a temporary directory and renames it when complete, so a run killed at any moment (even
mid-save) leaves only whole checkpoints behind; half-written temporaries are cleaned up on the next
start.
"""

from __future__ import annotations

import json
from absl import logging
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from eegkd_jax.train.state import TrainState

CONFIG_FILE = "config.json"
BEST_METRIC = "kappa"


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def _best_metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


class Checkpointer:
    """Saves and restores ``TrainState``s of one workdir.

    Args:
      workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints``.
      keep: how many of the most recent checkpoints to keep (the best one is kept on top of these).
      read_only: open someone else's checkpoints (a teacher) without touching them.
    """

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no checkpoints directory")
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=max(int(keep), 1)),
            # Only checkpoints saved with validation metrics compete for "best".
            checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            # Synchronous saves: a step's checkpoint is complete when save() returns, which keeps
            # "killed after step k was saved" well defined; the states here are small.
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest validation kappa (the latest if none has metrics)."""
        with_metrics = [s for s in self._manager.all_steps() if self._manager.metrics(s)]
        if not with_metrics:
            return self.latest_step()
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> dict | None:
        return self._manager.metrics(step)

    # ------------------------------------------------------------------ save / restore
    def save(self, state: TrainState, *, metrics: dict | None = None) -> bool:
        """Saves ``state`` under its step. ``metrics`` (JSON-able, with "kappa") ranks it for "best".
        Returns False if that step was saved already (e.g. the final step right after a periodic
        save)."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state.to_dict()))
        return self._manager.save(step, args=args, metrics=metrics)

    def resolve_step(self, which: str | int = "latest") -> int | None:
        """"latest", "best" or an explicit step -> a saved step (None if there are none)."""
        if which == "latest":
            return self.latest_step()
        if which == "best":
            return self.best_step()
        step = int(which)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint for step {step}; saved: {self.all_steps()}")
        return step

    def restore(self, abstract_state: TrainState, which: str | int = "latest") -> TrainState:
        """Restores into the structure, dtypes and shardings of ``abstract_state`` (a TrainState of
        ``jax.ShapeDtypeStruct`` with ``.sharding``, e.g. from ``jax.eval_shape`` + shardings).

        Raises:
          FileNotFoundError: nothing saved (or not that step).
          ValueError: the saved state is laid out differently from ``abstract_state`` (another
            model, mode or optimiser, or an earlier eegkd-jax: see the message).
        """
        step = self.resolve_step(which)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        target = abstract_state.to_dict()
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except ValueError as error:
            if "structures do not match" not in str(error):
                raise
            raise ValueError(
                f"{self.directory}: the state saved at step {step} does not fit this run's: it "
                f"was written for another model, mode or optimiser, or by an eegkd-jax from "
                f"before 2026-12-04, whose Adam kept its moments as one flat vector; train in a "
                f"new --workdir (eval.py still reads the old checkpoint's model)") from error
        return abstract_state.replace(**restored)

    def restore_raw(self, which: str | int = "best") -> tuple[int, dict]:
        """Restores a saved state as a plain dict of arrays without knowing its structure (for
        reading another run's model). Returns (step, state dict)."""
        step = self.resolve_step(which)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        return step, restored

    def close(self) -> None:
        self._manager.close()


# ---------------------------------------------------------------------- config beside the checkpoints
def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes the run's config as JSON to ``<workdir>/checkpoints/config.json`` (process 0 only)."""
    path = checkpoint_dir(workdir) / CONFIG_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        tmp.replace(path)  # atomic, like the checkpoints
    return path


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Reads back what ``save_config`` wrote (tuples come back as lists)."""
    path = checkpoint_dir(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved config; is {workdir} the workdir of a finished run?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


# ---------------------------------------------------------------------- teacher from another run
TRAIN_TEACHER_HINT = (
    "train a scalp teacher first, e.g.\n"
    "  python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher\n"
    "then pass --config.kd.teacher_workdir=runs/teacher"
)


def restore_teacher(teacher_workdir: str | pathlib.Path, which: str | int = "best"
                    ) -> tuple[ml_collections.ConfigDict, dict, dict, int]:
    """Loads the scalp model trained in another workdir (a supervised :scalp run, or the teacher of
    an online-KD run).

    Returns:
      (model config, params, batch_stats, step): host arrays; the caller places them on its mesh.
    Raises:
      FileNotFoundError: no such run / no checkpoint, with the command that trains one.
      ValueError: the run did not train a scalp model.
    """
    if not teacher_workdir:
        raise FileNotFoundError("config.kd.teacher_workdir is empty: " + TRAIN_TEACHER_HINT)
    try:
        saved = load_config(teacher_workdir)
        ckpt = Checkpointer(teacher_workdir, read_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no trained teacher in {teacher_workdir} ({e}); "
                                + TRAIN_TEACHER_HINT) from None
    mode = saved.get("mode")
    if mode == "supervised" and saved.get("supervised_input") == "scalp":
        fields = ("params", "batch_stats")
    elif mode == "online_kd":
        fields = ("teacher_params", "teacher_batch_stats")
    else:
        raise ValueError(
            f"{teacher_workdir} holds a {mode!r} run (input {saved.get('supervised_input')!r}), "
            "not a scalp model; " + TRAIN_TEACHER_HINT)
    try:
        step, state = ckpt.restore_raw(which)
    finally:
        ckpt.close()
    logging.info("teacher: %s step %d (%s)", teacher_workdir, step, which)
    return saved.teacher, state[fields[0]], state.get(fields[1]) or {}, step
