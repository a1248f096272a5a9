"""The sleep-staging networks: U-Sleep and the epoch-level cross-modal transformer.

Both are Flax Linen modules. Linen keeps parameters and batch statistics in plain variable pytrees,
which is what the rest of the code wants: they go straight through ``jax.jit`` with explicit
``NamedSharding``s and buffer donation, into Orbax checkpoints, and a teacher and a student sit side
by side in one state pytree. NNX is Flax's recommended API for new code, but its stateful objects
would need a split/merge at every jit boundary for the same result.

Every model is called the same way::

    module = build_model(config.model, in_channels=3, sampling_rate=200.0, epoch_seconds=30.0)
    variables = init_variables(module, jax.random.key(0), (batch, L * 6000, 3))
    (logits, features), updates = module.apply(
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

with x (B, L * S, C) float32 and logits (B, L, 5) float32. ``features`` is what the original
distils: U-Sleep's decoder output (B, L * S, F), the transformer's concatenated CLS vectors
(B, C * d_model), which takes L == 1. Both have "params" and "batch_stats" collections (the
transformer's tokeniser uses batch norm, as in the original).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from eegkd_jax.models import cmt, usleep
from eegkd_jax.models.cmt import CrossModalTransformer
from eegkd_jax.models.usleep import USleep, usleep_widths

# name -> constructor(model_cfg, *, in_channels, epoch_samples) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {
    "usleep": usleep.from_config,
    "cmt": cmt.from_config,
}

__all__ = [
    "MODELS",
    "CrossModalTransformer",
    "USleep",
    "build_model",
    "count_params",
    "init_variables",
    "usleep_widths",
]


def epoch_samples_for(sampling_rate: float, epoch_seconds: float) -> int:
    """Samples per scoring epoch; the rate and length must give a whole number (6000 for 30 s at
    200 Hz)."""
    samples = sampling_rate * epoch_seconds
    if samples <= 0 or abs(samples - round(samples)) > 1e-6:
        raise ValueError(
            f"{epoch_seconds:g}-s epochs at {sampling_rate:g} Hz are {samples:g} samples, not a "
            f"positive whole number"
        )
    return int(round(samples))


def build_model(
    model_cfg, *, in_channels: int, sampling_rate: float = 200.0, epoch_seconds: float = 30.0
) -> nn.Module:
    """The module named by ``model_cfg.name`` ("usleep" or "cmt"), sized from the config group.

    Args:
      model_cfg: a ``config.model`` / ``config.teacher`` group (see configs/common.py).
      in_channels: input derivations C.
      sampling_rate: Hz of the input (the data config's model rate).
      epoch_seconds: scoring epoch length; with the rate it fixes S, the samples per epoch.

    Returns:
      A Linen module taking x (B, L * S, C) and ``train`` and returning (logits (B, L, classes),
      features).
    """
    name = model_cfg.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    if in_channels < 1:
        raise ValueError(f"a model needs at least one input channel, got {in_channels}")
    return MODELS[name](
        model_cfg,
        in_channels=int(in_channels),
        epoch_samples=epoch_samples_for(sampling_rate, epoch_seconds),
    )


def init_variables(module: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict:
    """Initial variables {"params", "batch_stats"} for inputs of ``input_shape`` (B, L * S, C).

    Pure in ``rng`` with a static shape, so it works under ``jax.jit`` (with ``out_shardings`` to
    create replicated parameters in place) and ``jax.eval_shape`` (shapes without any compute).
    """
    params_rng, dropout_rng = jax.random.split(rng)
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    return module.init({"params": params_rng, "dropout": dropout_rng}, x, train=False)


def count_params(variables_or_params) -> int:
    """Number of trainable scalars: the "params" collection if given variables, else the tree."""
    tree = variables_or_params
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))
