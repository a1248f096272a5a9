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

from eegkd_jax import kernels

# Variables the loop never trains: an empty dict for models without batch norm.
EMPTY: dict = {}


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
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=decay_steps, end_value=0.0
        )
    raise ValueError(f"config.optimizer.schedule must be constant or cosine, got {opt_cfg.schedule!r}")


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """What :func:`make_optimizer` built, for :func:`apply_gradients`' one-kernel form of it."""

    b1: float
    b2: float
    eps: float
    weight_decay: float
    max_norm: float  # 0: no clipping
    schedule: optax.Schedule


class Optimizer(optax.GradientTransformationExtraArgs):
    """An optax transformation (``init`` / ``update`` as any other) that also carries its
    :class:`AdamSettings` as ``.adam``."""

    adam: AdamSettings


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> Optimizer:
    """The original's torch.optim.Adam: optional global-norm clipping, then weight decay added to the
    gradient (L2, not AdamW's decoupled decay), then Adam(b1, b2, eps), then the schedule.

    Adam and the schedule run on the gradient flattened into one vector (``optax.flatten``): the
    same element-wise arithmetic, but one update instead of a few small kernels per parameter
    array, and its moments are flat vectors accordingly (checkpoints store them so). Clipping and
    weight decay stay per array: flattening the parameters too for the decay (the whole chain
    flat) cost 4% of every U-Sleep step (a 3.1M-element concatenation of the parameters). Where
    the CPU kernels run, :func:`apply_gradients` does all of it as one kernel instead."""
    if opt_cfg.name != "adam":
        raise ValueError(f"only config.optimizer.name='adam' is implemented, got {opt_cfg.name!r}")
    clip = float(opt_cfg.grad_clip_norm) if opt_cfg.grad_clip_norm else 0.0
    schedule = make_schedule(opt_cfg, total_steps)
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if opt_cfg.weight_decay:
        parts.append(optax.add_decayed_weights(float(opt_cfg.weight_decay)))
    adam = optax.chain(
        optax.scale_by_adam(b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps)),
        optax.scale_by_learning_rate(schedule))
    optimizer = Optimizer(*optax.chain(*parts, optax.flatten(adam)))
    optimizer.adam = AdamSettings(b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                                  eps=float(opt_cfg.eps),
                                  weight_decay=float(opt_cfg.weight_decay or 0.0),
                                  max_norm=max(clip, 0.0), schedule=schedule)
    return optimizer


def apply_gradients(tx: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any]:
    """``tx.update`` then ``optax.apply_updates``: -> (new params, new optimiser state).

    For an :class:`Optimizer` where the CPU kernels run (``kernels.available()``, float32
    parameters), the whole update is one kernel call (``kernels.adam``) that writes the
    parameters and moments in place: XLA:CPU compiled optax's form of it as ~315 small fusions
    per U-Sleep (decay, flattening, the split back and the additions, per parameter array), 3 - 4 s
    of the full-size online-KD step's compile time. Same arithmetic, same state layout, so
    checkpoints move freely between the two forms."""
    settings = getattr(tx, "adam", None)
    leaves, treedef = jax.tree.flatten(params)
    fused = (settings is not None and kernels.available()
             and all(leaf.dtype == jnp.float32 for leaf in leaves))
    # make_optimizer's state: (clipping's and decay's empty states, (Adam's, the schedule's)).
    inner = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
    fused = (fused and isinstance(inner, tuple) and len(inner) == 2
             and isinstance(inner[0], optax.ScaleByAdamState)
             and isinstance(inner[1], optax.ScaleByScheduleState))
    if not fused:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    before, (adam_state, schedule_state) = opt_state[:-1], inner
    grad_leaves = treedef.flatten_up_to(grads)
    count = optax.safe_increment(adam_state.count)
    # As optax computes them: the bias corrections 1 - b^t, the step -1 * learning rate.
    scalars = jnp.stack([
        jnp.asarray(-1 * settings.schedule(schedule_state.count), jnp.float32),
        (1 - settings.b1 ** count).astype(jnp.float32),
        (1 - settings.b2 ** count).astype(jnp.float32),
        kernels.global_norm(grad_leaves) if settings.max_norm > 0 else jnp.zeros((), jnp.float32),
    ])
    new_leaves, mu, nu = kernels.adam(
        grad_leaves, leaves, adam_state.mu, adam_state.nu, scalars, b1=settings.b1,
        b2=settings.b2, eps=settings.eps, eps_root=0.0, weight_decay=settings.weight_decay,
        max_norm=settings.max_norm)
    inner = (optax.ScaleByAdamState(count=count, mu=mu, nu=nu),
             optax.ScaleByScheduleState(count=optax.safe_increment(schedule_state.count)))
    return jax.tree.unflatten(treedef, new_leaves), (*before, inner)


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
