"""One jit-able train step per mode, plus the evaluation step.

Every step has the signature ``step(state, batch) -> (new_state, metrics)`` once its static parts
(models, optimisers, loss weights) are bound with ``functools.partial``; ``build_train_step`` does
that from the config. ``batch`` is the pipeline's dict: "scalp" (B, L*S, n_scalp), "ear"
(B, L*S, n_ear), "labels" (B, L) with -1 = not scored. ``metrics`` is a small dict of scalars that
stays on the device until the loop logs it.

Models follow the shared contract: ``module.apply(variables, x, train=..., rngs=..., mutable=...)``
returns ``(logits (B, L, 5), features)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from eegkd_jax import losses
from eegkd_jax.configs import student_input
from eegkd_jax.train.state import EMPTY, TrainState, apply_gradients

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def model_variables(params: Any, batch_stats: Any) -> dict:
    """The variables dict ``module.apply`` takes; "batch_stats" only for models that have them."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def _forward(module, params, batch_stats, x, *, train: bool, key=None):
    """-> (logits, features, new_batch_stats). In eval mode batch statistics are read, not updated."""
    variables = model_variables(params, batch_stats)
    if not train:
        logits, features = module.apply(variables, x, train=False)
        return logits, features, batch_stats
    (logits, features), mutated = module.apply(
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    new_stats = flax.core.unfreeze(mutated).get("batch_stats", EMPTY) if batch_stats else batch_stats
    return logits, features, new_stats


# --------------------------------------------------------------------------------------------------
# supervised (and transfer): cross-entropy on one input
# --------------------------------------------------------------------------------------------------
def supervised_step(state: TrainState, batch: Batch, *, model, tx, input_key: str,
                    class_weights=None) -> tuple[TrainState, Metrics]:
    """CE(model(batch[input_key]), labels), masked. input_key: "scalp" (teacher) or "ear"."""
    def loss_fn(params):
        logits, _, stats = _forward(model, params, state.batch_stats, batch[input_key],
                                    train=True, key=state.step_key())
        ce = losses.masked_cross_entropy(logits, batch["labels"], class_weights)
        return ce, (stats, logits)

    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    params, opt_state = apply_gradients(tx, grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "ce": loss, "grad_norm": optax.tree.norm(grads),
                       "accuracy": losses.accuracy(logits, batch["labels"])}


# --------------------------------------------------------------------------------------------------
# offline KD: frozen scalp teacher, ear student
# --------------------------------------------------------------------------------------------------
def offline_kd_step(state: TrainState, batch: Batch, *, student, teacher, tx,
                    kd: ml_collections.ConfigDict, class_weights=None) -> tuple[TrainState, Metrics]:
    """loss = CE(student) + fw * MSE(student feats, teacher feats) + rw * T^2 KL(teacher || student).

    The teacher runs in eval mode on scalp; its outputs are constants (stop_gradient), its variables
    are not differentiated and it has no optimiser state, so nothing can change it. With
    ``kd.unpaired`` window i learns from window i - 1's teacher outputs (the unpaired control).
    """
    t_logits, t_feats, _ = _forward(teacher, state.teacher_params, state.teacher_batch_stats,
                                    batch["scalp"], train=False)
    t_logits, t_feats = jax.lax.stop_gradient((t_logits, t_feats))
    if kd.get("unpaired", False):
        # The study's control: each ear window gets the teacher's targets of the next window in
        # the batch (another night or another time), so any gain from dense targets alone shows.
        t_logits, t_feats = jnp.roll(t_logits, 1, axis=0), jnp.roll(t_feats, 1, axis=0)
    labels = batch["labels"]

    def loss_fn(params):
        logits, feats, stats = _forward(student, params, state.batch_stats, batch["ear"],
                                        train=True, key=state.step_key())
        ce = losses.masked_cross_entropy(logits, labels, class_weights)
        mse = (losses.feature_mse(feats, t_feats, labels, kd.feature_level) if kd.feature_weight
               else jnp.zeros(()))
        kl = (losses.softened_kl(logits, t_logits, labels, kd.temperature)
              if kd.response_weight else jnp.zeros(()))
        loss = ce + kd.feature_weight * mse + kd.response_weight * kl
        return loss, (stats, logits, ce, mse, kl)

    (loss, (stats, logits, ce, mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    params, opt_state = apply_gradients(tx, grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "ce": ce, "feature_mse": mse, "kl": kl,
                       "grad_norm": optax.tree.norm(grads),
                       "accuracy": losses.accuracy(logits, labels),
                       "teacher_accuracy": losses.accuracy(t_logits, labels)}


# --------------------------------------------------------------------------------------------------
# online KD: teacher and student trained together, each with its own optimiser state
# --------------------------------------------------------------------------------------------------
def online_kd_step(state: TrainState, batch: Batch, *, student, teacher, tx, teacher_tx,
                   kd: ml_collections.ConfigDict, class_weights=None) -> tuple[TrainState, Metrics]:
    """Both networks see their own input once; one gradient of the summed losses updates both.

    "original": teacher loss = CE(teacher); student loss = CE(student) + fw * MSE(feats, sg(teacher
    feats)) + rw * T^2 KL(sg(teacher) || student).
    "mutual" (deep mutual learning): as "original", plus the teacher learns from the student:
    teacher loss += rw * T^2 KL(sg(student) || teacher).
    Every cross term detaches its target, so d(total)/d(teacher) is exactly the teacher's own loss
    gradient and likewise for the student.
    """
    labels = batch["labels"]
    key = state.step_key()
    t_key, s_key = jax.random.split(key)

    def loss_fn(both):
        t_params, s_params = both
        t_logits, t_feats, t_stats = _forward(teacher, t_params, state.teacher_batch_stats,
                                              batch["scalp"], train=True, key=t_key)
        s_logits, s_feats, s_stats = _forward(student, s_params, state.batch_stats,
                                              batch["ear"], train=True, key=s_key)
        t_ce = losses.masked_cross_entropy(t_logits, labels, class_weights)
        s_ce = losses.masked_cross_entropy(s_logits, labels, class_weights)
        sg = jax.lax.stop_gradient
        mse = (losses.feature_mse(s_feats, sg(t_feats), labels, kd.feature_level)
               if kd.feature_weight else jnp.zeros(()))
        kl = (losses.softened_kl(s_logits, sg(t_logits), labels, kd.temperature)
              if kd.response_weight else jnp.zeros(()))
        student_loss = s_ce + kd.feature_weight * mse + kd.response_weight * kl
        teacher_kl = (losses.softened_kl(t_logits, sg(s_logits), labels, kd.temperature)
                      if kd.variant == "mutual" else jnp.zeros(()))
        teacher_loss = t_ce + kd.response_weight * teacher_kl
        aux = dict(t_stats=t_stats, s_stats=s_stats, t_logits=t_logits, s_logits=s_logits,
                   student_loss=student_loss, teacher_loss=teacher_loss, ce=s_ce,
                   teacher_ce=t_ce, feature_mse=mse, kl=kl, teacher_kl=teacher_kl)
        return teacher_loss + student_loss, aux

    (_, aux), (t_grads, s_grads) = jax.value_and_grad(loss_fn, has_aux=True)(
        (state.teacher_params, state.params))
    s_params, s_opt = apply_gradients(tx, s_grads, state.opt_state, state.params)
    t_params, t_opt = apply_gradients(teacher_tx, t_grads, state.teacher_opt_state,
                                      state.teacher_params)
    new_state = state.replace(
        step=state.step + 1, params=s_params, batch_stats=aux["s_stats"], opt_state=s_opt,
        teacher_params=t_params, teacher_batch_stats=aux["t_stats"], teacher_opt_state=t_opt)
    return new_state, {
        "loss": aux["student_loss"], "ce": aux["ce"], "feature_mse": aux["feature_mse"],
        "kl": aux["kl"], "grad_norm": optax.tree.norm(s_grads),
        "accuracy": losses.accuracy(aux["s_logits"], labels),
        "teacher_loss": aux["teacher_loss"], "teacher_ce": aux["teacher_ce"],
        "teacher_kl": aux["teacher_kl"], "teacher_grad_norm": optax.tree.norm(t_grads),
        "teacher_accuracy": losses.accuracy(aux["t_logits"], labels),
    }


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def eval_step(state: TrainState, batch: Batch, *, student, input_key: str,
              teacher=None) -> dict[str, jax.Array]:
    """Predictions (argmax, (B, L) int32) of the trained model on ``batch[input_key]`` and, when a
    teacher is given, of the teacher on scalp; the batch's bookkeeping keys are passed through so a
    replicated output carries everything the host needs."""
    logits, _, _ = _forward(student, state.params, state.batch_stats, batch[input_key], train=False)
    out = {"prediction": jnp.argmax(logits, -1).astype(jnp.int32)}
    if teacher is not None:
        t_logits, _, _ = _forward(teacher, state.teacher_params, state.teacher_batch_stats,
                                  batch["scalp"], train=False)
        out["teacher_prediction"] = jnp.argmax(t_logits, -1).astype(jnp.int32)
    for key in ("labels", "subject", "epoch", "valid"):
        if key in batch:
            out[key] = batch[key]
    return out


def build_train_step(config: ml_collections.ConfigDict, *, student, tx, teacher=None,
                     teacher_tx=None) -> StepFn:
    """Binds the mode's step function to its models, optimisers and loss weights."""
    weights = tuple(config.class_weights) or None
    mode = config.mode
    if mode in ("supervised", "transfer"):
        return functools.partial(supervised_step, model=student, tx=tx,
                                 input_key=student_input(config), class_weights=weights)
    if config.kd.variant not in ("original", "mutual"):
        raise ValueError(f"config.kd.variant must be original or mutual, got {config.kd.variant!r}")
    if mode == "offline_kd":
        return functools.partial(offline_kd_step, student=student, teacher=teacher, tx=tx,
                                 kd=config.kd, class_weights=weights)
    if mode == "online_kd":
        if config.kd.variant == "mutual" and not config.kd.response_weight:
            raise ValueError("kd.variant='mutual' learns through the softened KL terms; set "
                             "config.kd.response_weight > 0 (e.g. 1.0)")
        return functools.partial(online_kd_step, student=student, teacher=teacher, tx=tx,
                                 teacher_tx=teacher_tx, kd=config.kd, class_weights=weights)
    raise ValueError(f"config.mode must be supervised, offline_kd, online_kd or transfer, got {mode!r}")
