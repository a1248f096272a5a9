"""The configs of every mode, in the package so the library and the installed `eegkd` command
find them; `configs/*.py` at the top of the repository are the same configs for `--config=`.
Below: what a config says about the networks, read the same way by training, checkpoints and
model cards."""

from __future__ import annotations

import ml_collections


def student_input(config: ml_collections.ConfigDict) -> str:
    """Which signal the trained (non-teacher) model sees: "scalp" only for supervised :scalp."""
    if config.mode == "supervised":
        if config.supervised_input not in ("scalp", "ear"):
            raise ValueError(
                f"config.supervised_input must be scalp or ear, got {config.supervised_input!r}")
        return config.supervised_input
    return "ear"


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The signals a mode's train step reads: the trained input alone, or both for KD."""
    if config.mode in ("offline_kd", "online_kd"):
        return ("scalp", "ear")
    return (student_input(config),)


def trained_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the model the optimiser trains in ``state.params``: the scalp network
    (``config.teacher``) for supervised :scalp, else the ear network (``config.model``)."""
    if config.mode == "supervised" and student_input(config) == "scalp":
        return config.teacher
    return config.model
