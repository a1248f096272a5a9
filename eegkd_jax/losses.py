"""Loss terms of every training mode, all masked so that unscored epochs (label -1) count for nothing.

Shapes: logits (B, L, C) float, labels (B, L) int with -1 where not scored. Every masked mean divides
by the number of scored epochs in the *global* batch (under jit over a sharded batch the sums are
global), so the loss of a batch does not depend on how it is split across devices. A batch with no
scored epoch gives 0 rather than NaN.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from eegkd_jax.data.recording import UNSCORED


def label_mask(labels: jax.Array) -> jax.Array:
    """(B, L) float32: 1 where the epoch is scored, 0 where the label is -1."""
    return (labels != UNSCORED).astype(jnp.float32)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    # max(count, 1): an all-unscored batch contributes 0 instead of 0/0.
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: Sequence[float] | jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy over scored epochs.

    Args:
      logits: (B, L, C) unnormalised scores.
      labels: (B, L) int, -1 where not scored.
      class_weights: optional (C,) weights. As in torch's ``CrossEntropyLoss(weight=...)`` the
        weighted mean divides by the sum of the weights of the scored epochs, not their count.
    Returns:
      scalar float32.
    """
    logits = logits.astype(jnp.float32)
    mask = label_mask(labels)
    safe_labels = jnp.where(labels == UNSCORED, 0, labels)  # any valid index; masked out below
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    if class_weights is not None and len(class_weights) > 0:
        weights = jnp.asarray(class_weights, jnp.float32)
        if weights.shape != (logits.shape[-1],):
            raise ValueError(
                f"class_weights has {weights.shape[0]} entries but the model predicts "
                f"{logits.shape[-1]} classes"
            )
        mask = mask * weights[safe_labels]
    return _masked_mean(nll, mask)


def softened_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: float
) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over scored epochs.

    The T^2 factor (Hinton et al.) keeps the gradient scale of this term comparable to the hard-label
    cross-entropy when T changes. Gradients flow into both arguments: callers detach the target side
    with ``jax.lax.stop_gradient``.

    Args:
      student_logits, teacher_logits: (B, L, C).
      labels: (B, L), only used for the mask.
      temperature: T > 0.
    Returns:
      scalar float32, >= 0, and 0 when the two sets of logits agree.
    """
    if temperature <= 0:
        raise ValueError(f"KD temperature must be positive, got {temperature}")
    t = float(temperature)
    teacher_log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return (t * t) * _masked_mean(kl, label_mask(labels))


def feature_mse(
    student_features: jax.Array, teacher_features: jax.Array, labels: jax.Array,
    level: str = "sample",
) -> jax.Array:
    """Mean squared difference of two feature tensors, over scored epochs only.

    Args:
      student_features, teacher_features: the same shape, either
        (B, L*S, F) per-sample features (U-Sleep decoder output: the samples of unscored epochs are
        masked) or (B, F) per-sequence features (transformer CLS features: a sequence counts when any
        of its epochs is scored).
      labels: (B, L).
      level: "sample" compares per-sample features as the original does; "epoch" first averages
        each epoch's S samples, (B, L*S, F) -> (B, L, F): a target an ear signal can follow when
        it does not carry the scalp waveform itself.
    Returns:
      scalar float32: mean over every kept feature element.
    Raises:
      ValueError: the shapes differ (e.g. a U-Sleep student distilled from a transformer teacher);
        set the feature weight to 0 for such pairs.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            "feature distillation needs student and teacher features of the same shape, got "
            f"student {tuple(student_features.shape)} vs teacher {tuple(teacher_features.shape)}; "
            "use models of the same kind and size or set config.kd.feature_weight=0"
        )
    if level not in ("sample", "epoch"):
        raise ValueError(f"feature level must be sample or epoch, got {level!r}")
    batch, seq_len = labels.shape
    student_features = student_features.astype(jnp.float32)
    teacher_features = teacher_features.astype(jnp.float32)
    if level == "epoch" and student_features.ndim == 3:
        student_features = epoch_means(student_features, seq_len)
        teacher_features = epoch_means(teacher_features, seq_len)
    sq = jnp.square(student_features - teacher_features)
    mask = label_mask(labels)  # (B, L)
    if sq.ndim == 3 and sq.shape[1] % seq_len == 0:
        per_epoch = sq.reshape(batch, seq_len, -1)  # (B, L, S*F): each epoch's samples together
        return _masked_mean(jnp.mean(per_epoch, axis=-1), mask)
    if sq.ndim == 2:
        per_sequence = jnp.max(mask, axis=1)  # (B,)
        return _masked_mean(jnp.mean(sq, axis=-1), per_sequence)
    raise ValueError(
        f"features of shape {tuple(sq.shape)} do not line up with labels of shape {labels.shape}"
    )


def epoch_means(features: jax.Array, seq_len: int) -> jax.Array:
    """(B, L*S, F) per-sample features -> (B, L, F), the mean over each epoch's S samples."""
    batch, samples, width = features.shape
    if samples % seq_len:
        raise ValueError(f"features of {samples} samples do not split into {seq_len} epochs")
    return features.reshape(batch, seq_len, samples // seq_len, width).mean(axis=2)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of scored epochs whose argmax matches the label (a cheap training-time monitor)."""
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _masked_mean(hits, label_mask(labels))
