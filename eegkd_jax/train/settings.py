"""Settings that cannot be meant, refused before a run starts.

A negative learning rate, a batch of zero sequences or a dropout rate of 1.5 parse and even train
(a negative rate ascends the loss for hundreds of steps, saving checkpoints all along), so the
divergence guard is no defence. ``check_config`` names the first such field and its value in one
line, before anything is built or written::

    check_config(config)   # raises ConfigError("config.optimizer.learning_rate=-0.004: ...")

Only values that no run could want are refused; unusual but possible ones (a learning rate of 10,
no weight decay, 0 = "off" where a field documents it) pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot be meant; the message names the field and its value."""


# field -> (test, what the value must be). Fields a config lacks are skipped (older configs).
_POSITIVE = (lambda v: v > 0, "> 0")
_AT_LEAST_ONE = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_BELOW_ONE = (lambda v: 0 <= v < 1, "in [0, 1)")

RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "optimizer.learning_rate": _POSITIVE,
    "batch_size": _AT_LEAST_ONE,
    "num_epochs": _NON_NEGATIVE,  # 0 with max_steps > 0: max_steps steps (see below)
    "log_every_steps": _AT_LEAST_ONE,
    "keep_checkpoints": _AT_LEAST_ONE,
    "steps_per_call": _AT_LEAST_ONE,
    "divergence_factor": _POSITIVE,
    "optimizer.b1": _BELOW_ONE,
    "optimizer.b2": _BELOW_ONE,
    "optimizer.eps": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.warmup_steps": _NON_NEGATIVE,
    "optimizer.grad_clip_norm": _NON_NEGATIVE,
    "model.dropout": _FRACTION,
    "teacher.dropout": _FRACTION,
    "kd.feature_weight": _NON_NEGATIVE,
    "kd.response_weight": _NON_NEGATIVE,
    "kd.temperature": _POSITIVE,
    "data.sampling_rate": _POSITIVE,
    "data.epoch_seconds": _POSITIVE,
    "data.sequence_length": _AT_LEAST_ONE,
    "data.num_test_subjects": _NON_NEGATIVE,
    "data.num_validation_subjects": _NON_NEGATIVE,
    "data.device_budget_gb": _NON_NEGATIVE,
    "data.preprocess.clip_iqr": _POSITIVE,
    "data.simulated.subjects": _AT_LEAST_ONE,
    "data.simulated.hours": _POSITIVE,
}


def _lookup(config: ml_collections.ConfigDict, field: str):
    value = config
    for part in field.split("."):
        if not isinstance(value, (ml_collections.ConfigDict, dict)) or part not in value:
            return None
        value = value[part]
    return value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first field whose value cannot be meant (see ``RULES``:
    rates, sizes and counts that must be positive, probabilities outside [0, 1], class weights
    below 0, a band-pass whose edges are out of order).

    Args:
      config: a training config (``configs/<mode>.py``); fields it lacks are not checked.
    """
    for field, (ok, must) in RULES.items():
        value = _lookup(config, field)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or not ok(value):
            raise ConfigError(f"config.{field}={value!r} cannot be meant: it must be {must}")
    epochs, max_steps = _lookup(config, "num_epochs"), _lookup(config, "max_steps")
    if epochs == 0 and not (isinstance(max_steps, int) and max_steps > 0):
        raise ConfigError(f"config.num_epochs=0 cannot be meant without a step count: it must be "
                          f">= 1, or 0 with config.max_steps > 0 (max_steps={max_steps!r})")
    weights = _lookup(config, "class_weights")
    if weights and any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"config.class_weights={tuple(weights)!r} cannot be meant: every weight "
                          "must be >= 0")
    band = _lookup(config, "data.preprocess.bandpass_hz")
    if band is not None:
        low, high = band
        if (low is not None and low < 0) or (None not in (low, high) and not low < high):
            raise ConfigError(f"config.data.preprocess.bandpass_hz={tuple(band)!r} cannot be "
                              "meant: it must be (low, high) with 0 <= low < high (either None)")
