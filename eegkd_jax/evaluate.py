"""``evaluate_checkpoint(workdir, ...)``: score a trained run on whole held-out subjects and write
its report.

    workdir/checkpoints/<step> (state + its config, verified) ──restore──▶ model variables
    prepare_cohort ──eval_batches (every epoch once)──▶ jitted sharded forward ──▶ probabilities
    NightCollector ──▶ whole nights ──▶ metrics.evaluate_subjects ──▶ report.write_report
                                                           + one hypnogram TSV per night

The config saved with the restored step decides the data (source, preprocessing, splits, sequence
length) and the model, so an evaluation always sees the inputs the model was trained on (an edited
``checkpoints/config.json`` changes nothing and is warned about). Only the checkpoint
(best validation kappa, latest, or a step), the split or an explicit subject list, and the batch
size can be chosen.

In KD runs (and online KD especially) the checkpoint also holds the scalp teacher; with
``teacher=True`` it is scored on the same nights from scalp EEG and reported beside the student.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import configs
from eegkd_jax import metrics as metrics_lib
from eegkd_jax import model_card
from eegkd_jax import parallel
from eegkd_jax import report as report_lib
from eegkd_jax.train import steps as steps_lib

SPLITS = ("train", "validation", "test")
_PASSED_THROUGH = ("labels", "subject", "epoch", "valid")


def make_predict_fn(module, input_key: str, mesh):
    """Jitted ``(variables, batch) -> {"probabilities": (B, L, 5) float32, labels, subject, epoch,
    valid}``: variables replicated, the batch sharded on ``data``, the output replicated so every
    host holds the whole global batch's predictions."""
    replicated = parallel.replicated_sharding(mesh)

    def predict(variables, batch):
        logits, _ = module.apply(variables, batch[input_key], train=False)
        out = {"probabilities": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}
        out.update({key: batch[key] for key in _PASSED_THROUGH})
        return out

    return jax.jit(
        predict, in_shardings=(replicated, parallel.batch_sharding(mesh)), out_shardings=replicated
    )


def predict_nights(
    predict_fn, variables, batches, input_key: str, collector: metrics_lib.NightCollector, mesh
) -> None:
    """Runs ``predict_fn`` over every batch and hands the global results to ``collector``."""
    for host_batch in batches:
        # Only what the forward pass needs goes to the devices (not the other modality).
        needed = {key: host_batch[key] for key in (input_key, *_PASSED_THROUGH)}
        out = jax.device_get(predict_fn(variables, parallel.host_batch_to_global(needed, mesh)))
        probabilities = np.asarray(out["probabilities"], dtype=np.float64)
        collector.add(
            out["labels"],
            probabilities.argmax(axis=-1),
            out["subject"],
            out["epoch"],
            np.asarray(out["valid"], dtype=bool),
            probabilities=probabilities,
        )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params/encoder_0/conv/kernel": shape} of every array in a variables tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
            for path, leaf in flat}


def _differing(workdir: pathlib.Path, step: int, config: ml_collections.ConfigDict,
               group: str) -> str:
    """How ``config.<group>`` (the step's) differs from the run's other configs
    (``checkpoints/config.json``, then the other steps'), e.g. "model.depth is 3 there, 2 in
    .../checkpoints/config.json"; "" when no other config says otherwise."""
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    others = [(ckpt_lib.checkpoint_dir(workdir) / ckpt_lib.CONFIG_FILE, None)]
    others += [(checkpointer.directory / str(s) / ckpt_lib.CONFIG_FILE, s)
               for s in reversed(checkpointer.all_steps()) if s != step]
    checkpointer.close()
    own = ckpt_lib.flat_config(config)
    for path, _ in others:
        try:
            other = ckpt_lib.flat_config(ml_collections.ConfigDict(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
        fields = sorted(k for k in own.keys() | other.keys()
                        if k.startswith(group + ".") and own.get(k) != other.get(k))
        if fields:
            return "; ".join(f"{k} is {own.get(k)!r} there, {other.get(k)!r} in {path}"
                             for k in fields[:4])
    return ""


def check_variables_fit(workdir: pathlib.Path, step: int, config: ml_collections.ConfigDict,
                        group: str, module, variables: dict, input_shape) -> None:
    """Raises CheckpointError, in one line naming the config field and the step, unless the
    variables saved at ``step`` are exactly those of ``module``, the network that the step's
    config.json describes in ``config.<group>`` (e.g. its model.depth edited and its manifest
    rehashed); flax would fail deep in ``apply`` on a missing parameter, or ignore extra ones."""
    from eegkd_jax.models import init_variables

    wanted = _shapes(jax.eval_shape(lambda key: init_variables(module, key, input_shape),
                                    jax.random.PRNGKey(0)))
    saved = _shapes(variables)
    def ordered(keys):  # parameters before batch statistics: what a reader looks for first
        return sorted(keys, key=lambda k: (not k.startswith("params/"), k))

    problems = [f"{k} is missing" for k in ordered(wanted.keys() - saved.keys())]
    problems += [f"{k} is not in the model" for k in ordered(saved.keys() - wanted.keys())]
    problems += [f"{k} has shape {saved[k]}, the model wants {wanted[k]}"
                 for k in ordered(wanted.keys() & saved.keys()) if wanted[k] != saved[k]]
    if not problems:
        return
    where = ckpt_lib.checkpoint_dir(workdir) / str(step)
    fields = _differing(workdir, step, config, group) or f"see config.{group}"
    raise ckpt_lib.CheckpointError(
        f"{where}: the state saved at step {step} does not fit the network that its "
        f"{ckpt_lib.CONFIG_FILE} describes ({fields}): {problems[0]}"
        f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}; was that "
        f"{ckpt_lib.CONFIG_FILE} edited?")


def classical_floor(cohort, config: ml_collections.ConfigDict, subjects: Sequence[str],
                    signal: str) -> dict[str, Any] | None:
    """The band-power floor (``eegkd_jax.baseline``) on ``subjects``' whole nights from ``signal``,
    trained on the run's other training subjects, without and with +-2 epochs of context; None
    when there are none to fit it on."""
    from eegkd_jax import baseline
    from eegkd_jax.data import pipeline

    # Fitted on the run's training subjects that are not evaluated here (none: no floor).
    train = [s for s in pipeline.subject_splits(cohort.subjects, config.data).train
             if s not in subjects]
    if not train:
        return None
    scores = {}
    for name, context in (("plain", 0), ("+-2 epochs of context", 2)):
        overall = baseline.cohort_floor(cohort, train, subjects, signal, context)["overall"]
        scores[name] = {k: float(overall[k]) for k in ("kappa", "accuracy", "macro_f1")}
    return {"method": f"{signal} band powers", "train_subjects": list(train), "scores": scores}


def _write(
    out_dir: pathlib.Path,
    collector: metrics_lib.NightCollector,
    epoch_seconds: float,
    metadata: dict,
    floor: dict | None = None,
) -> dict[str, Any]:
    results = collector.results()
    if floor:
        results = {**results, "floor": floor}
    nights = collector.hypnograms()
    probabilities = collector.probabilities()
    hypnograms = {
        s: report_lib.Hypnogram(true, pred, epoch_seconds) for s, (true, pred) in nights.items()
    }
    report_lib.write_report(results, out_dir, hypnograms, metadata=metadata)
    for subject, (_, predicted) in nights.items():
        onsets = np.arange(predicted.size) * epoch_seconds
        report_lib.write_hypnogram_tsv(
            out_dir / "hypnograms" / f"{subject}.tsv",
            onsets,
            predicted,
            probabilities[subject],
            duration_s=epoch_seconds,
        )
    return results


def _chosen_subjects(cohort, config, split: str, subjects: Sequence[str] | None, workdir
                     ) -> tuple[tuple[str, ...], str]:
    """(the subjects to score, what they are called in the report: the split or "subjects")."""
    from eegkd_jax.data import pipeline

    label = "subjects"
    if subjects is None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        subjects = getattr(pipeline.subject_splits(cohort.subjects, config.data), split)
        label = split
    subjects = tuple(subjects)
    if not subjects:
        raise ValueError(f"no subjects to evaluate (split {split!r} of {workdir} is empty)")
    unknown = sorted(set(subjects) - set(cohort.subjects))
    if unknown:
        raise ValueError(f"subjects {unknown} are not in the cohort {list(cohort.subjects)}")
    return subjects, label


def _predict_subjects(cohort, config, subjects, module, signal: str, variables, mesh,
                      batch_size: int, source: str) -> metrics_lib.NightCollector:
    """Every epoch of ``subjects`` through ``module``, collected into whole nights."""
    from eegkd_jax.data import pipeline

    collector = metrics_lib.NightCollector({s: cohort.num_epochs[s] for s in subjects}, subjects,
                                           source=source)
    batches = pipeline.eval_batches(
        cohort, subjects, config.data, global_batch_size=batch_size,
        num_shards=mesh.devices.size, process_index=jax.process_index(),
        process_count=jax.process_count())
    predict_nights(make_predict_fn(module, signal, mesh), variables, batches, signal, collector,
                   mesh)
    return collector


def evaluate_checkpoint(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path | None = None,
    *,
    checkpoint: str | int = "best",
    split: str = "test",
    subjects: Sequence[str] | None = None,
    batch_size: int | None = None,
    teacher: bool = False,
    floor: bool = True,
) -> dict[str, Any]:
    """Scores a trained run on whole subjects and writes report.json / report.md / figures / TSVs.

    Args:
      workdir: the training run's directory (``<workdir>/checkpoints``).
      out_dir: where the report goes; default ``<workdir>/eval/<split>-step<step>``.
      checkpoint: "best" (highest validation kappa), "latest", or a step number.
      split: "train", "validation" or "test" subjects of the run's own split; ignored when
        ``subjects`` is given.
      subjects: explicit subject ids to score instead of a split.
      batch_size: global evaluation batch size (a multiple of the device count); default the
        run's ``config.batch_size``.
      teacher: also score the scalp teacher held in a KD checkpoint (its report goes to
        ``out_dir/teacher``).
      floor: also score the classical floor on the same nights (:func:`classical_floor`).

    Returns:
      ``metrics.evaluate_subjects`` output for the trained model, plus "step" (the checkpoint's),
      "out_dir", "predictions" ({subject: (epochs,) predicted stages}) and "teacher" (the
      teacher's results) when asked for.

    Raises:
      FileNotFoundError: no such run or checkpoint.
      checkpoint.CheckpointError: the checkpoint asked for (or every one) fails its checks.
      ValueError: unknown split, an empty subject list, subjects not in the cohort, or
        ``teacher=True`` on a run without a teacher.
    """
    # Imported here so that importing this module stays cheap (TensorFlow, models).
    from eegkd_jax.data import pipeline
    from eegkd_jax.models import build_model

    workdir = pathlib.Path(workdir).absolute()
    # "best" / "latest" fall back to the next intact step when one fails its checks.
    restored = ckpt_lib.read_run(workdir, checkpoint)
    step, state, config = restored.step, restored.state, restored.config
    mesh = parallel.make_mesh()
    batch_size = int(batch_size or config.batch_size)
    parallel.check_global_batch_size(batch_size, mesh)

    cohort = pipeline.prepare_cohort(config.data)
    subjects, label = _chosen_subjects(cohort, config, split, subjects, workdir)
    out_dir = pathlib.Path(out_dir or workdir / "eval" / f"{label}-step{step}")
    logging.info("evaluating %s step %d (%s) on %s", workdir, step, checkpoint, list(subjects))

    input_key = configs.student_input(config)
    n_channels = {"scalp": len(cohort.scalp_names), "ear": len(cohort.ear_names)}
    trained = configs.trained_model_config(config)
    scored = [("", input_key, "teacher" if trained is config.teacher else "model", "params",
               "batch_stats")]
    if teacher:
        if state.get("teacher_params") is None:
            raise ValueError(f"{workdir} ({config.mode}) holds no teacher to evaluate")
        scored.append(("teacher", "scalp", "teacher", "teacher_params", "teacher_batch_stats"))

    results: dict[str, Any] = {}
    for name, signal, group, params_key, stats_key in scored:
        model_cfg = config[group]
        module = build_model(model_cfg, in_channels=n_channels[signal],
                             sampling_rate=cohort.sampling_rate,
                             epoch_seconds=config.data.epoch_seconds)
        saved = steps_lib.model_variables(state[params_key], state.get(stats_key))
        window = int(config.data.sequence_length) * cohort.epoch_samples
        check_variables_fit(workdir, step, config, group, module, saved,
                            (1, window, n_channels[signal]))
        collector = _predict_subjects(cohort, config, subjects, module, signal,
                                      parallel.replicate(saved, mesh), mesh, batch_size,
                                      f"{workdir} step {step}")
        metadata = {
            "workdir": str(workdir),
            "checkpoint": checkpoint,
            "step": int(step),
            "mode": config.mode,
            "model": model_cfg.name,
            "input": signal,
            "evaluated": label,
            "subjects": list(subjects),
            "data_source": config.data.source,
            "sequence_length": int(config.data.sequence_length),
        }
        target = out_dir / name if name else out_dir
        floor_scores = classical_floor(cohort, config, subjects, signal) if floor else None
        if jax.process_index() == 0:
            scores = _write(target, collector, float(config.data.epoch_seconds), metadata,
                            floor_scores)
        else:
            scores = collector.results()
        logging.info("%s%s", f"{name}: " if name else "",
                     metrics_lib.summary_line(scores["overall"]))
        if name:
            results[name] = scores
        else:
            results.update(scores)
            results["predictions"] = {s: pred for s, (_, pred) in collector.hypnograms().items()}
    results["step"] = int(step)
    results["out_dir"] = str(out_dir)
    if label == "test":
        model_card.record_test(workdir, results["overall"], step=int(step), subjects=list(subjects))
    return results
