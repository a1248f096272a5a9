"""The training state pytree and the optimiser.

One ``TrainState`` serves every mode. ``params`` / ``batch_stats`` / ``opt_state`` belong to the model
being trained on its own input (the ear student, or the single model of a supervised / transfer run).
KD modes add the teacher's ``teacher_params`` / ``teacher_batch_stats``; online KD also carries
``teacher_opt_state`` because both networks are trained in the same jitted step. The frozen teacher
of offline KD has no optimiser state at all: it can never be updated by accident.

The optimiser (an ``optax.GradientTransformation``) is deliberately *not* in the state: it is a
function of the config, rebuilt at start-up, so the state is plain arrays that orbax can save.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

# Variables the loop never trains: an empty dict for models without batch norm.
EMPTY: dict = {}

# For jitting ``create_state``: it runs once, so XLA's optimisations would cost seconds of
# compilation and buy nothing (the random draws are the same integer arithmetic either way).
CREATE_STATE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                                 "xla_llvm_disable_expensive_passes": True}


@struct.dataclass
class TrainState:
    """Everything that changes during training. A pytree; every leaf is a jax.Array.

    Attributes:
      step: () int32, optimiser steps taken; also the data position (the pipeline's start_step).
      rng: (2,) uint32 PRNG key of the run; per-step keys are ``fold_in(rng, step)`` so a resumed
        run draws exactly the dropout masks an uninterrupted one would.
      params, batch_stats, opt_state: the trained (student / single) model.
      teacher_params, teacher_batch_stats: KD modes only, else None.
      teacher_opt_state: online KD only, else None.
    """

    step: jax.Array
    rng: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher_params: Any = None
    teacher_batch_stats: Any = None
    teacher_opt_state: Any = None

    def step_key(self) -> jax.Array:
        """This step's dropout key: a function of (run key, step) only, so resuming is exact."""
        return jax.random.fold_in(self.rng, self.step)

    def to_dict(self) -> dict:
        """Checkpointable dict of the non-None fields."""
        # Shallow on purpose: the subtrees keep their types (optax states are named tuples), so a
        # checkpoint restored into this dict's structure is again a valid optimiser state.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in values.items() if v is not None}


def make_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per step: "constant" (after an optional linear warm-up) or "cosine" (linear
    warm-up, then cosine decay to 0 at ``total_steps``)."""
    lr = float(opt_cfg.learning_rate)
    warmup = int(opt_cfg.warmup_steps)
    if opt_cfg.schedule == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if opt_cfg.schedule == "cosine":
        decay_steps = max(int(total_steps), warmup + 1)
        if warmup <= 0:  # optax's warm-up form logs a complaint about a 0-step warm-up
            return optax.cosine_decay_schedule(lr, decay_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=decay_steps, end_value=0.0
        )
    raise ValueError(f"config.optimizer.schedule must be constant or cosine, got {opt_cfg.schedule!r}")


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
    """The original's torch.optim.Adam as an optax chain: optional global-norm clipping, weight
    decay added to the gradient (L2, not AdamW's decoupled decay), Adam(b1, b2, eps), the
    schedule."""
    if opt_cfg.name != "adam":
        raise ValueError(f"only config.optimizer.name='adam' is implemented, got {opt_cfg.name!r}")
    parts = []
    if opt_cfg.grad_clip_norm and float(opt_cfg.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
    if opt_cfg.weight_decay:
        parts.append(optax.add_decayed_weights(float(opt_cfg.weight_decay)))
    parts.append(optax.adam(make_schedule(opt_cfg, total_steps), b1=float(opt_cfg.b1),
                            b2=float(opt_cfg.b2), eps=float(opt_cfg.eps)))
    return optax.chain(*parts)


def apply_gradients(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any]:
    """One optimiser step: -> (new params, new optimiser state)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _split_variables(variables: Any) -> tuple[Any, Any]:
    variables = flax.core.unfreeze(variables)
    return variables["params"], variables.get("batch_stats", EMPTY)


def create_state(
    rng: jax.Array,
    init_student: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    *,
    init_teacher: Callable[[jax.Array], Any] | None = None,
    teacher_tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """Builds a fresh state. Pure and traceable: call it under ``jax.jit`` (with out_shardings) or
    ``jax.eval_shape`` so that start-up never runs the models eagerly.

    Args:
      rng: (2,) PRNG key; split into init keys and the run key kept in the state.
      init_student: key -> variables {"params", ["batch_stats"]} of the trained model.
      tx: its optimiser.
      init_teacher: key -> teacher variables (KD modes), else None.
      teacher_tx: the teacher's optimiser (online KD); None keeps the teacher frozen.
    """
    run_key, student_key, teacher_key = jax.random.split(rng, 3)
    params, batch_stats = _split_variables(init_student(student_key))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=run_key,
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    if init_teacher is not None:
        t_params, t_stats = _split_variables(init_teacher(teacher_key))
        state = state.replace(teacher_params=t_params, teacher_batch_stats=t_stats)
        if teacher_tx is not None:
            state = state.replace(teacher_opt_state=teacher_tx.init(t_params))
    return state
