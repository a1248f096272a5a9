"""Checkpoints of a run, each bound to its config and verified on restore; the workdir lock; and
restoring a trained teacher from another run's workdir.

One step lives in ``<workdir>/checkpoints/<step>/``::

    state/          the train state as a dict of arrays (orbax, StandardCheckpointHandler)
    config.json     the run's config when the step was saved
    metrics.json    its validation metrics (null when the step had none)
    manifest.json   the size and SHA-256 of every other file of the step

A step is written into ``<step>.tmp`` and renamed when complete: the rename is the commit, so a run
killed at any moment leaves whole steps only, and the next run that holds the workdir removes the
leftovers. Restoring checks the manifest first (orbax verifies only part of what it reads: single
bit flips were restored silently); a step that fails the check or fails to restore is reported by
number and the newest step that passes is used instead. ``best`` only ever names a step that passes.

Kept: the latest ``keep`` intact steps plus the intact one with the best validation kappa; damaged
steps are left where they are for the user to look at.

orbax's CheckpointManager is not used: it reads every step's metrics when it opens (one truncated
file made the whole workdir unreadable), deletes a concurrent run's temporary directories, and
commits a step before a manifest of it could be written.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import socket
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from eegkd_jax import files
from eegkd_jax.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
STATE_DIR = "state"
LOCK_FILE = "run.lock"
BEST_METRIC = "kappa"
_TMP = ".tmp"  # a step being written
_TRASH = ".deleting"  # a step being pruned
_DAMAGED = ".damaged"  # a damaged step moved aside so that its step can be saved again

# A resumed run must train the same networks on the same data in the same mode; these config
# fields say so. Everything else (learning rate, schedule length, logging) may change on resume.
IDENTITY_FIELDS = ("mode", "supervised_input", "model", "teacher", "data", "kd")
# Where the shards are cached, how far ahead tf.data reads, how much device memory the resident
# data may take: not what the model learns from.
FREE_FIELDS = ("data.cache_dir", "data.prefetch", "data.device_budget_gb")


class CheckpointError(UserError):
    """No intact checkpoint to restore, or the one asked for is damaged."""


class ConfigMismatchError(UserError, ValueError):
    """A run's config differs from the one its workdir's checkpoints were trained with."""


class WorkdirBusyError(UserError):
    """Another live run holds the workdir."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def _sync(name: str) -> None:
    """Waits for every process (multi-host runs write the state together, process 0 the rest)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def config_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def _kappa(metrics: dict | None) -> float:
    value = float((metrics or {}).get(BEST_METRIC, math.nan))
    return value if math.isfinite(value) else -math.inf


# ---------------------------------------------------------------------------------- the manifest
def _files(directory: pathlib.Path) -> list[str]:
    """Every regular file under ``directory`` but the manifest, as sorted relative posix paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_FILE)


def _digest(path: pathlib.Path, *, sync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: pathlib.Path, step: int) -> None:
    """Writes ``manifest.json`` (size and SHA-256 of every file) and syncs the step to disk, so
    that a power loss after the commit cannot leave a committed step with data still in memory."""
    listed = {}
    for rel in _files(directory):
        path = directory / rel
        listed[rel] = {"size": path.stat().st_size, "sha256": _digest(path, sync=True)}
    manifest = directory / MANIFEST_FILE
    with open(manifest, "w") as f:
        json.dump({"step": step, "files": listed}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)


def check_manifest(directory: pathlib.Path, step: int) -> str | None:
    """None if every file of the step matches its manifest, else what is wrong (one line)."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        expected = manifest["files"]
        if manifest["step"] != step:
            return f"{MANIFEST_FILE} describes step {manifest['step']}"
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({type(error).__name__})"
    try:
        present = _files(directory)
    except OSError as error:
        return f"cannot list its files ({error})"
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing:
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} file(s) not in its manifest, e.g. {extra[0]}"
    for rel in present:
        path = directory / rel
        try:
            size = path.stat().st_size
            if size != expected[rel]["size"]:
                return f"{rel} has {size} bytes, its manifest says {expected[rel]['size']}"
            if _digest(path) != expected[rel]["sha256"]:
                return f"{rel} does not match its checksum"
        except (OSError, KeyError, TypeError) as error:
            return f"{rel} cannot be checked ({error})"
    return None


# ---------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``Checkpointer.restore_raw`` returns: the step, its state as a dict of arrays, and the
    config it was trained with."""

    step: int
    state: dict
    config: ml_collections.ConfigDict


class Checkpointer:
    """Saves, verifies and restores the train states (dicts of arrays with a "step") of one
    workdir.

    Args:
      workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints``.
      keep: how many of the most recent intact steps to keep (the best one is kept on top).
      read_only: open someone else's checkpoints (eval, predict, a teacher) without touching them.
        A writer must hold the workdir's ``WorkdirLock``.
    """

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = checkpoint_dir(workdir)
        self.keep = max(int(keep), 1)
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            what = "no such directory" if not self.workdir.exists() else "no checkpoints directory"
            raise FileNotFoundError(f"{self.directory}: {what}; is {self.workdir} the workdir of a "
                                    "training run?")
        self._orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self._problems: dict[int, str | None] = {}  # steps never change once committed
        self._cleaned = read_only

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Every committed step on disk, intact or not."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and p.is_dir())

    def problem(self, step: int) -> str | None:
        """None if the step passes its checks, else what is wrong with it (reported once)."""
        if step not in self._problems:
            problem = check_manifest(self.directory / str(step), step)
            if problem:
                logging.warning("checkpoint step %d in %s fails its check: %s; it is skipped",
                                step, self.directory, problem)
            self._problems[step] = problem
        return self._problems[step]

    def intact_steps(self) -> list[int]:
        return [s for s in self.all_steps() if not self.problem(s)]

    def latest_step(self) -> int | None:
        """The newest intact step (None if there is none)."""
        for step in reversed(self.all_steps()):
            if not self.problem(step):
                return step
        return None

    def metrics(self, step: int) -> dict | None:
        path = self.directory / str(step) / METRICS_FILE
        try:
            return json.loads(path.read_text()) or None
        except (OSError, ValueError):
            return None

    def best_step(self) -> int | None:
        """The intact step with the highest validation kappa (the latest intact if none has
        metrics)."""
        scored = [s for s in self.intact_steps() if _kappa(self.metrics(s)) > -math.inf]
        if not scored:
            return self.latest_step()
        return max(scored, key=lambda s: (_kappa(self.metrics(s)), s))

    def best_validation(self) -> tuple[int | None, dict | None]:
        """(``best_step()``, the validation metrics saved with it, or None where it has none):
        what "best" restores and how it scored."""
        step = self.best_step()
        metrics = self.metrics(step) if step is not None else None
        if metrics and "num_epochs" in metrics:
            metrics["num_epochs"] = int(metrics["num_epochs"])  # saved as a float
        return step, metrics

    def config(self, step: int) -> ml_collections.ConfigDict:
        """The config the step was trained with."""
        path = self.directory / str(step) / CONFIG_FILE
        try:
            return ml_collections.ConfigDict(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: unreadable ({error})") from None

    def resolve_step(self, which: str | int = "latest") -> int | None:
        """"latest", "best" or an explicit step -> an intact step (None if there are none)."""
        if which == "latest":
            return self.latest_step()
        if which == "best":
            return self.best_step()
        step = int(which)
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint for step {step}; saved: {self.all_steps()}")
        problem = self.problem(step)
        if problem:
            raise CheckpointError(f"{self.directory}/{step}: {problem}; intact steps: "
                                  f"{self.intact_steps()}")
        return step

    # ------------------------------------------------------------------ save
    def remove_leftovers(self) -> None:
        """Removes what a killed run left (half-written and half-deleted steps); the caller holds
        the workdir lock, so nothing of a live run can be among them."""
        if self._cleaned:
            return
        self._cleaned = True
        if files.is_main() and self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.endswith((_TMP, _TRASH)) or ".orbax-checkpoint-tmp" in path.name:
                    logging.info("removing %s, left by an interrupted run", path)
                    shutil.rmtree(path, ignore_errors=True)
        _sync("eegkd_checkpoint_cleanup")

    def _move_aside(self, step: int) -> None:
        path = self.directory / str(step)
        target, n = path.with_name(f"{step}{_DAMAGED}"), 1
        while target.exists():
            target, n = path.with_name(f"{step}{_DAMAGED}-{n}"), n + 1
        logging.warning("moving damaged %s to %s to save step %d again", path, target.name, step)
        path.rename(target)

    def save(self, state: dict, *, config: ml_collections.ConfigDict | None = None,
             metrics: dict | None = None) -> bool:
        """Saves ``state`` (a dict of arrays, ``state["step"]`` its step) under its step with the
        run's ``config`` (default: the workdir's ``save_config`` copy); ``metrics`` (JSON-able,
        with "kappa") rank it for "best". Returns False if that step is saved already (e.g. the
        final step right after a periodic save)."""
        if self.read_only:
            raise PermissionError(f"{self.directory}: opened read-only")
        config = load_config(self.workdir) if config is None else config
        self.remove_leftovers()
        step = int(jax.device_get(state["step"]))
        final = self.directory / str(step)
        if final.exists():
            if not self.problem(step):
                return False
            if files.is_main():
                self._move_aside(step)
            self._problems.pop(step, None)
        tmp = self.directory / f"{step}{_TMP}"
        if files.is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            if jax.process_count() == 1:  # on several hosts a refusal on one would hang the rest
                self._check_space(state, step)
            tmp.mkdir()
        _sync("eegkd_checkpoint_tmp")
        self._orbax.save(tmp / STATE_DIR, args=ocp.args.StandardSave(state))
        if files.is_main():
            metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
            (tmp / CONFIG_FILE).write_text(config_json(config))
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, sort_keys=True))
            write_manifest(tmp, step)
            tmp.rename(final)
            _fsync_dir(self.directory)
        _sync("eegkd_checkpoint_commit")
        self._problems[step] = None
        self._prune()
        return True

    def _check_space(self, state: dict, step: int) -> None:
        """Refuses a save that cannot fit, before a byte of it is written: on a full disk orbax
        leaves a half-written step and pages of tracebacks from its writer threads. The need is
        the larger of the state's size and the last step's size on disk, plus a half: orbax holds
        about a fifth more while it merges its files."""
        state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state))
        last = self.latest_step()
        stored = [] if last is None else (self.directory / str(last)).rglob("*")
        on_disk = sum(p.stat().st_blocks * 512 for p in stored if p.is_file())
        need = max(state_bytes, on_disk) * 3 // 2
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device for checkpoint step {step} "
                          f"(about {need} bytes needed, {free} free)", str(self.directory))

    def _prune(self) -> None:
        intact = self.intact_steps()
        keep = set(intact[-self.keep:]) | {self.best_step()}
        for step in intact:
            if step in keep:
                continue
            if files.is_main():
                # Renamed first, so that a run killed mid-deletion leaves no half step behind.
                trash = self.directory / f"{step}{_TRASH}"
                (self.directory / str(step)).rename(trash)
                shutil.rmtree(trash)
            self._problems.pop(step, None)
        _sync("eegkd_checkpoint_prune")

    # ------------------------------------------------------------------ restore
    def _candidates(self, which: str | int) -> list[int]:
        if which == "latest":
            return [s for s in reversed(self.all_steps()) if not self.problem(s)]
        if which == "best":
            best = self.best_step()
            rest = sorted(self.intact_steps(), key=lambda s: (_kappa(self.metrics(s)), s),
                          reverse=True)
            return [best] + [s for s in rest if s != best] if best is not None else []
        return [self.resolve_step(which)]

    def _restore(self, which: str | int, restore_fn) -> tuple[int, Any]:
        """Restores the first candidate step that restores. "latest" and "best" fall back to the
        next intact step, reporting the failed one by number; an explicit step does not."""
        explicit = which not in ("latest", "best")
        for step in self._candidates(which):
            try:
                return step, restore_fn(self.directory / str(step) / STATE_DIR)
            except Exception as error:  # orbax / tensorstore errors on damaged data
                if isinstance(error, ValueError) and "structures do not match" in str(error):
                    raise ValueError(
                        f"{self.directory}: the state saved at step {step} does not fit this "
                        "run's: it was written for another model, mode or optimiser; train in a "
                        "new --workdir") from error
                problem = (f"fails to restore ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:300]})")
            self._problems[step] = problem
            if explicit:
                raise CheckpointError(f"{self.directory}/{step}: {problem}")
            logging.warning("checkpoint step %d in %s %s; trying an earlier one", step,
                            self.directory, problem)
        if not self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        damaged = "; ".join(f"step {s}: {self.problem(s)}" for s in self.all_steps()
                            if self.problem(s))
        raise CheckpointError(f"{self.directory}: no intact checkpoint ({damaged})")

    def restore(self, abstract_state: dict, which: str | int = "latest") -> dict:
        """Restores into the structure, dtypes and shardings of ``abstract_state`` (a dict of
        ``jax.ShapeDtypeStruct`` with ``.sharding``, e.g. from ``jax.eval_shape`` + shardings).
        "latest" and "best" fall back to the next intact step when one fails.

        Raises:
          FileNotFoundError: nothing saved (or not that step).
          CheckpointError: no step passes its checks (each is named with its problem).
          ValueError: the saved state is laid out differently from ``abstract_state`` (another
            model, mode or optimiser).
        """
        _, restored = self._restore(which, lambda path: self._orbax.restore(
            path, args=ocp.args.StandardRestore(abstract_state)))
        return restored

    def restore_raw(self, which: str | int = "best") -> Restored:
        """Restores a saved state as a plain dict of arrays without knowing its structure (for
        reading a run's model), with the config it was trained with."""
        step, state = self._restore(which, lambda path: self._orbax.restore(path))
        config = self.config(step)
        _warn_if_edited(self.workdir, step, config)
        return Restored(step, state, config)

    def close(self) -> None:
        self._orbax.close()


def _warn_if_edited(workdir: pathlib.Path, step: int, config: ml_collections.ConfigDict) -> None:
    """Says so when ``checkpoints/config.json`` and the config saved with the step disagree
    (either may have been edited, or the run resumed with other settings), naming both files and
    each one's values: the step's own config is the one used."""
    path = checkpoint_dir(workdir) / CONFIG_FILE
    try:
        top = files.flatten(json.loads(path.read_text()))
    except (OSError, ValueError):
        return
    own = flat_config(config)
    changed = sorted(k for k in top.keys() | own.keys() if top.get(k) != own.get(k))
    if changed:
        shown = ", ".join(f"{k} {own.get(k)!r} vs {top.get(k)!r}" for k in changed[:8])
        logging.warning("%s, the config saved with step %d, and %s differ (%s%s); the step's "
                        "config is used", checkpoint_dir(workdir) / str(step) / CONFIG_FILE, step,
                        path, shown, f" and {len(changed) - 8} more" if len(changed) > 8 else "")


# ---------------------------------------------------------------------- the run's config
def save_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes the run's config to ``<workdir>/checkpoints/config.json`` (process 0 only): a copy
    for people and tools; eval, predict and resume read the config saved with the step they
    restore."""
    return files.write_atomic(checkpoint_dir(workdir) / CONFIG_FILE, config_json(config),
                              main_only=True)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Reads back what ``save_config`` wrote (tuples come back as lists)."""
    path = checkpoint_dir(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved config; is {workdir} the workdir of a training "
                                "run?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"{path}: not a readable config ({error})") from None


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted field: value} of a config, as its JSON holds it (tuples as lists)."""
    return files.flatten(json.loads(config_json(config)))


def config_differences(saved: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict
                       ) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, wanted value)} over the fields that define a run
    (``IDENTITY_FIELDS`` less ``FREE_FIELDS``). A field only one side has is skipped: it was added
    or removed by a newer eegkd-jax, and the run could not have set it."""
    old = files.flatten(json.loads(config_json(saved)))
    new = files.flatten(json.loads(config_json(wanted)))

    def counts(key: str) -> bool:
        return (key.split(".")[0] in IDENTITY_FIELDS
                and not any(key == f or key.startswith(f + ".") for f in FREE_FIELDS))

    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if counts(k) and old[k] != new[k]}


def check_resumable(saved: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict,
                    where: str) -> None:
    """Raises ConfigMismatchError, naming the fields, unless ``wanted`` trains the same networks
    on the same data in the same mode as ``saved`` (the config of ``where``, a checkpoint)."""
    diff = config_differences(saved, wanted)
    if not diff:
        return
    shown = list(diff.items())[:8]
    changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in shown)
    more = f" and {len(diff) - len(shown)} more" if len(diff) > len(shown) else ""
    flags = " ".join(f"--config.{k}={a!r}" for k, (a, _) in shown)
    raise ConfigMismatchError(
        f"{where} was trained with other settings than this run's: {changes}{more}. Resume it "
        f"with its own ({flags}) or train in a new --workdir")


# ---------------------------------------------------------------------- one run per workdir
class WorkdirLock:
    """One training run per workdir: an exclusive ``flock`` on ``<workdir>/run.lock``, which holds
    the holder's pid and host.

    The kernel releases the lock when its holder exits, however it exits, so the lock of a killed
    run is simply taken over by the next one; a second live run is refused at once. On several
    hosts only process 0 takes it. Use as a context manager.
    """

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir).absolute() / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        if not files.is_main():
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            # The holder writes its name just after it locks: give it a moment to appear.
            deadline = time.monotonic() + 2.0
            while not holder.get("pid") and time.monotonic() < deadline:
                time.sleep(0.05)
                holder = self._holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for that run "
                "to finish or stop it, or use another --workdir") from None
        previous = self._holder(fd)
        if previous.get("pid"):
            logging.info("taking over %s from pid %s on %s, which is no longer running", self.path,
                         previous["pid"], previous.get("host", "?"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:  # being written this very moment
            return {}

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # The file stays: removing it would let a third run lock a new file while a second
            # still waits on this one.
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------- teacher from another run
TRAIN_TEACHER_HINT = (
    "train a scalp teacher first, e.g.\n"
    "  python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher\n"
    "then pass --config.kd.teacher_workdir=runs/teacher"
)


def read_run(workdir: str | pathlib.Path, which: str | int = "best") -> Restored:
    """A step of another run, read-only (eval, predict, a teacher): ``restore_raw`` on a
    Checkpointer opened and closed here, with its fall-back past damaged steps."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.restore_raw(which)
    finally:
        checkpointer.close()


def restore_teacher(teacher_workdir: str | pathlib.Path, which: str | int = "best"
                    ) -> tuple[ml_collections.ConfigDict, dict, dict, int]:
    """Loads the scalp model trained in another workdir (a supervised :scalp run, or the teacher of
    an online-KD run).

    Returns:
      (model config, params, batch_stats, step): host arrays; the caller places them on its mesh.
    Raises:
      FileNotFoundError: no such run / no checkpoint, with the command that trains one.
      CheckpointError: no intact checkpoint there.
      ValueError: the run did not train a scalp model.
    """
    if not teacher_workdir:
        raise FileNotFoundError("config.kd.teacher_workdir is empty: " + TRAIN_TEACHER_HINT)
    try:
        restored = read_run(teacher_workdir, which)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no trained teacher in {teacher_workdir} ({e}); "
                                + TRAIN_TEACHER_HINT) from None
    saved, state = restored.config, restored.state
    mode = saved.get("mode")
    if mode == "supervised" and saved.get("supervised_input") == "scalp":
        fields = ("params", "batch_stats")
    elif mode == "online_kd":
        fields = ("teacher_params", "teacher_batch_stats")
    else:
        raise ValueError(
            f"{teacher_workdir} holds a {mode!r} run (input {saved.get('supervised_input')!r}), "
            "not a scalp model; " + TRAIN_TEACHER_HINT)
    logging.info("teacher: %s step %d (%s)", teacher_workdir, restored.step, which)
    return saved.teacher, state[fields[0]], state.get(fields[1]) or {}, restored.step
