"""The model card of a training run: what its networks were trained on and how well they did.

A card is a small JSON object saved as ``<workdir>/model_card.json`` by the training loop, printed
by ``eegkd predict`` and packed beside every exported model::

    card = model_card.build(config, cohort, splits, validation_metrics)  # end of training
    model_card.save(workdir, card)
    model_card.record_test(workdir, overall, step=step)  # after scoring the test split
    card = model_card.load(workdir)  # None for a run without one

It says where the data came from (simulated nights, EESM17 or EDF recordings), the montage and
rate the networks read, the subjects of each split, and the validation and test metrics. A network
trained on simulated nights alone never saw a real recording; ``trained_on_real_recordings`` tells
predict and export to say so.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from eegkd_jax import files

CARD_FILE = "model_card.json"
CARD_VERSION = 1
SOURCES = {"simulated": "simulated nights (eegkd_jax.data.simulate)",
           "eesm17": "EESM17 ear-EEG recordings (OpenNeuro ds004348, BIDS)",
           "edf": "EDF/EDF+ polysomnograms with Sleep-EDF-style hypnograms"}
SIMULATED_WARNING = ("warning: this model was trained on simulated nights only and never saw a "
                     "real recording; its stages show how the tool works, they are not a scoring")
# The same, short enough for a figure.
SIMULATED_CAVEAT = ("Model trained on simulated nights only: these stages show how the tool works, "
                    "they are not a scoring")


def _plain(value: Any) -> Any:
    return files.plain(value, digits=4)


def _network(model_cfg, input_key: str, derivations: Sequence[str]) -> dict:
    return {"architecture": _plain(model_cfg), "input": input_key,
            "derivations": list(derivations)}


def build(config, cohort, splits, validation_metrics: Mapping[str, Any] | None,
          test_metrics: Mapping[str, Any] | None = None, *, step: int | None = None) -> dict:
    """The card of a run.

    Args:
      config: the run's config (``mode``, ``data``, ``model``, ``teacher``, ``kd``).
      cohort: the built cohort (``pipeline.Cohort``: subjects, labels, rate, derivation names).
      splits: ``pipeline.Splits`` (train, validation, test subject tuples).
      validation_metrics: the validation scores of the checkpoint that "best" restores (what
        eval, predict and export use; ``Checkpointer.best_validation``): accuracy, kappa,
        macro_f1, teacher_* in KD modes, num_epochs; None without validation subjects.
      test_metrics: scores on the test subjects, if already known (see ``record_test``).
      step: the checkpoint's step, which the metrics belong to.

    Returns:
      A JSON-able dict (see the module docstring).
    """
    from eegkd_jax import __version__
    from eegkd_jax import configs

    data = config.data
    source = str(data.source)
    data_card: dict[str, Any] = {"source": source, "description": SOURCES.get(source, source),
                                 "real_recordings": source != "simulated"}
    if source == "simulated":
        data_card["simulated"] = _plain(data.simulated)
    else:
        data_card["path"] = str(data.path)

    def scored(subjects):
        return int(sum(int((cohort.labels[s] >= 0).sum()) for s in subjects))

    input_key = configs.student_input(config)
    networks = {"model": _network(configs.trained_model_config(config), input_key,
                                  cohort.ear_names if input_key == "ear" else cohort.scalp_names)}
    if config.mode in ("offline_kd", "online_kd"):
        networks["teacher"] = _network(config.teacher, "scalp", cohort.scalp_names)
    if config.mode in ("offline_kd", "transfer"):
        teacher_dir = str(config.kd.teacher_workdir)
        teacher_card = load(teacher_dir) if teacher_dir else None
        networks["scalp_model_from"] = {
            "workdir": teacher_dir,
            "data_source": teacher_card["data"]["source"] if teacher_card else None}

    return {
        "card_version": CARD_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eegkd_jax_version": __version__,
        "mode": str(config.mode),
        "data": data_card,
        "input": {
            "sampling_rate_hz": float(cohort.sampling_rate),
            "epoch_seconds": float(data.epoch_seconds),
            "epochs_per_input": int(data.sequence_length),
            "scalp_derivations": list(cohort.scalp_names),
            "ear_derivations": list(cohort.ear_names),
            "bandpass_hz": _plain(data.preprocess.bandpass_hz),
            "scaling": str(data.preprocess.scaling),
            "clip_iqr": _plain(data.preprocess.clip_iqr),
        },
        "networks": networks,
        "subjects": {
            name: {"ids": list(ids), "scored_epochs": scored(ids)}
            for name, ids in (("train", splits.train), ("validation", splits.validation),
                              ("test", splits.test))
        },
        "checkpoint_selection": "best validation kappa over whole validation subjects",
        "metrics": {"step": step,
                    "validation": _plain(validation_metrics) if validation_metrics else None,
                    "test": _plain(test_metrics) if test_metrics else None},
    }


def path(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir) / CARD_FILE


def save(workdir: str | pathlib.Path, card: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``<workdir>/model_card.json`` atomically (process 0 only; others return the path)."""
    return files.write_json(path(workdir), card, main_only=True)


def load(workdir: str | pathlib.Path) -> dict | None:
    """The run's card, or None where the run has none (a run from before cards were saved).

    Raises:
      ValueError naming the file if it is not a card.
    """
    target = path(workdir)
    if not target.is_file():
        return None
    try:
        card = json.loads(target.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{target}: not a model card (invalid JSON: {e})") from None
    if not isinstance(card, dict) or "data" not in card or "card_version" not in card:
        raise ValueError(f"{target}: not a model card (no 'card_version' and 'data')")
    return card


def record_test(workdir: str | pathlib.Path, overall: Mapping[str, Any], *, step: int,
                subjects: Sequence[str] | None = None) -> dict | None:
    """Adds the test scores (``metrics.evaluate_subjects(...)["overall"]``) to the run's card;
    returns the card, or None (and writes nothing) for a run without one."""
    card = load(workdir)
    if card is None:
        return None
    keys = ("accuracy", "kappa", "macro_f1", "g_mean", "num_epochs")
    test = {k: _plain(overall[k]) for k in keys if k in overall}
    test["step"] = int(step)
    if subjects is not None:
        test["subjects"] = list(subjects)
    card["metrics"]["test"] = test
    save(workdir, card)
    return card


def trained_on_real_recordings(card: Mapping[str, Any] | None, config=None) -> bool | None:
    """Whether the run's own networks saw real recordings: from the card, else from the run's
    config (``data.source``); None if neither says."""
    if card is not None:
        return bool(card["data"]["real_recordings"])
    if config is not None:
        return str(config.data.source) != "simulated"
    return None


def _scores(metrics: Mapping[str, Any] | None, prefix: str = "") -> str:
    if not metrics or f"{prefix}kappa" not in metrics:
        return "not scored"
    parts = [f"kappa {metrics[prefix + 'kappa']:.3f}"]
    for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        if prefix + key in metrics:
            parts.append(f"{name} {metrics[prefix + key]:.3f}")
    return ", ".join(parts)


def summary(card: Mapping[str, Any], network: str = "model") -> str:
    """A few lines for people: data, input, subjects, scores of ``network`` ("model" or
    "teacher")."""
    data, inputs = card["data"], card["input"]
    net = card["networks"].get(network) or card["networks"]["model"]
    arch = net["architecture"]
    size = f" depth {arch['depth']}" if "depth" in arch else ""
    band = inputs["bandpass_hz"]
    band_text = f"band-pass {band[0]:g}-{band[1]:g} Hz" if band else "no band-pass"
    trained_on = data["description"]
    if data["source"] == "simulated":
        sim = data.get("simulated", {})
        trained_on += (f": {sim.get('subjects')} subjects, {sim.get('hours')} h each, seed "
                       f"{sim.get('seed')}")
    subjects = card["subjects"]

    def split(name):
        ids = subjects[name]["ids"]
        shown = ", ".join(ids) if len(ids) <= 4 else f"{ids[0]} ... {ids[-1]}"
        return f"{name} {len(ids)} ({shown})" if ids else f"{name} none"

    prefix = "teacher_" if network == "teacher" else ""
    metrics = card["metrics"]
    step = (f" at step {metrics['step']} (the checkpoint used)" if metrics.get("step") is not None
            else "")
    lines = [
        f"trained on: {trained_on}",
        f"network: {arch.get('name')}{size}, {card['mode']} {network}, reads {net['input']} "
        f"{' '.join(net['derivations'])} at {inputs['sampling_rate_hz']:g} Hz, {band_text}, "
        f"{inputs['scaling']} scaling",
        f"subjects: {split('train')}; {split('validation')}; {split('test')}",
        f"validation{step}: {_scores(metrics.get('validation'), prefix)}; "
        f"test: {_scores(metrics.get('test')) if network == 'model' else 'not scored'}",
    ]
    return "\n".join(lines)
