"""U-Sleep (Perslev et al., npj Digit. Med. 2021) in Flax Linen, as the ear-EEG KD project uses it.

The original project trains the braindecode port of U-Sleep; this module is written from that
description and matches it layer for layer (3,114,391 parameters for 3 input channels at 200 Hz,
30-s epochs, depth 12, kernel 9, 5 initial filters, complexity factor 1.67):

* widths: ``n = initial_filters``; for each of the depth + 1 levels ``int(n * sqrt(complexity))``,
  then ``n = int(n * sqrt(2))`` -> 6 9 11 15 20 28 40 55 77 108 152 214 302. The widths do not
  depend on the number of input channels (only the first conv's fan-in does).
* encoder block: conv (kernel ``kernel_size`` samples, "same" padding, bias) -> ELU -> batch norm;
  the result is the skip connection; then max-pool by 2. An odd length is padded with one zero on
  the left first: braindecode pads one zero on each side and its floor-mode pooling drops the right
  one, so the windows are (0, x0), (x1, x2), ...
* bottom: conv -> ELU -> batch norm at the widest level.
* decoder block: nearest upsampling x2 -> conv k=2 ("same": pad one sample on the right) -> ELU ->
  batch norm -> crop to the skip's length (keep the first samples) -> concatenate [x, skip] ->
  conv -> ELU -> batch norm.
* segment classifier: 1x1 conv -> tanh -> mean over each scoring epoch's samples -> 1x1 conv to the
  classes -> ELU -> 1x1 conv.

The kernel size is given in samples (the original sets ``time_conv_size_s = 9 / 200`` at 200 Hz, so
9 samples), must be odd, and is not rescaled with the sampling rate.

Input (B, L * S, C) with S = samples per scoring epoch and any L >= 1; output logits (B, L, classes)
in float32 and, as the distillation feature, the decoder output (B, L * S, widths[0]) in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eegkd_jax.models import layers


def usleep_widths(depth: int, initial_filters: int, complexity_factor: float) -> tuple[int, ...]:
    """The encoder widths of the depth + 1 levels (the last one is the bottom).

    >>> usleep_widths(12, 5, 1.67)
    (6, 9, 11, 15, 20, 28, 40, 55, 77, 108, 152, 214, 302)
    """
    if depth < 1 or initial_filters < 1 or complexity_factor <= 0:
        raise ValueError(
            f"U-Sleep needs depth >= 1, initial_filters >= 1 and complexity_factor > 0; got "
            f"{depth}, {initial_filters}, {complexity_factor}"
        )
    widths = []
    n = initial_filters
    for _ in range(depth + 1):
        widths.append(int(n * math.sqrt(complexity_factor)))
        n = int(n * math.sqrt(2))
    if min(widths) < 1:
        raise ValueError(f"U-Sleep widths {widths} include a level with no channels")
    return tuple(widths)


def _max_pool_by_two(x: jnp.ndarray) -> jnp.ndarray:
    """(B, T, C) -> (B, ceil(T / 2), C); an odd T gets one zero on the left (see module doc)."""
    if x.shape[1] % 2:
        x = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))
    # An element-wise maximum of the even and odd samples rather than reshape + max: the gradient of
    # a reduction max divides by the number of elements equal to the result, which came out as 0/0
    # (NaN gradients in the first encoder block) when XLA:CPU compiled without optimisations.
    return jnp.maximum(x[:, 0::2], x[:, 1::2])


class ConvBlock(nn.Module):
    """conv ("same" padding, bias) -> ELU -> batch norm: (B, T, C_in) -> (B, T, features)."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    initializer: str = "torch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = layers.conv1d(self.features, self.kernel_size, x.shape[-1], self.dtype,
                          init=self.initializer, name="conv")(x)
        return layers.batch_norm(train, self.dtype, name="bn")(nn.elu(x))


class DecoderBlock(nn.Module):
    """Upsample x2, conv k=2, crop to the skip, concatenate, conv: (B, T, C) -> (B, T_skip, F)."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    initializer: str = "torch"

    @nn.compact
    def __call__(self, x, skip, train: bool):
        x = jnp.repeat(x, 2, axis=1)  # nearest-neighbour upsampling
        x = ConvBlock(self.features, 2, self.dtype, self.initializer, name="upconv")(
            x, train)
        # The encoder padded odd lengths before pooling, so the upsampled signal can be one sample
        # longer than the skip; the original keeps its first samples.
        x = jnp.concatenate([x[:, : skip.shape[1]], skip], axis=-1)
        return ConvBlock(self.features, self.kernel_size, self.dtype, self.initializer,
                         name="conv")(x, train)


class SegmentClassifier(nn.Module):
    """Dense per-sample features -> one score vector per scoring epoch.

    (B, L * S, F) -> (B, L, num_classes): 1x1 conv, tanh, mean over each epoch's S samples, 1x1 conv
    to the classes, ELU, 1x1 conv (a 1x1 conv is a Dense layer over the channel axis).
    """

    epoch_samples: int
    num_classes: int
    dtype: Any = jnp.float32
    initializer: str = "torch"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, t, f = x.shape
        init = self.initializer
        x = jnp.tanh(layers.dense(f, f, self.dtype, name="segment_conv", init=init)(x))
        # Average pooling with window = stride = one epoch. jnp.mean accumulates low-precision
        # inputs in float32, so bfloat16 does not lose the 6000-sample sum.
        x = x.reshape(b, t // self.epoch_samples, self.epoch_samples, f).mean(axis=2)
        x = nn.elu(layers.dense(self.num_classes, f, self.dtype, name="hidden", init=init)(x))
        return layers.dense(self.num_classes, self.num_classes, self.dtype, name="logits",
                            init=init)(x)


class USleep(nn.Module):
    """U-Sleep over (B, L * epoch_samples, in_channels) -> (logits (B, L, C), features).

    Attributes:
      in_channels: number of input derivations (checked at call time).
      widths: encoder widths per level, ``usleep_widths(depth, ...)``; the last is the bottom.
      kernel_size: conv kernel in samples (odd).
      epoch_samples: samples per scoring epoch (6000 = 30 s at 200 Hz).
      num_classes: output classes.
      dtype: compute dtype; parameters are float32 whatever it is.
      initializer: "torch" (PyTorch's layer defaults, as the original project trains) or "glorot"
        (Glorot-uniform kernels and zero biases, as the U-Sleep authors' implementation).
    """

    in_channels: int
    widths: tuple[int, ...] = (6, 9, 11, 15, 20, 28, 40, 55, 77, 108, 152, 214, 302)
    kernel_size: int = 9
    epoch_samples: int = 6000
    num_classes: int = 5
    dtype: Any = jnp.float32
    initializer: str = "torch"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (B, L * S, C) -> logits (B, L, num_classes) float32, features (B, L * S, widths[0]).

        ``train`` selects batch statistics (and, with ``mutable=["batch_stats"]``, updates the
        running averages) versus the running averages.
        """
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            # An even kernel with "same" padding shifts every level by half a sample, and the
            # decoder's crops then misalign the skips; the original rejects it too.
            raise ValueError(
                f"U-Sleep kernel_size must be a positive odd number of samples, got "
                f"{self.kernel_size}"
            )
        if len(self.widths) < 2:
            raise ValueError(f"U-Sleep needs at least 2 widths (depth >= 1), got {self.widths}")
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"U-Sleep expects input (batch, time, {self.in_channels}), got shape {x.shape}"
            )
        if x.shape[1] == 0 or x.shape[1] % self.epoch_samples:
            raise ValueError(
                f"U-Sleep input has {x.shape[1]} samples, not a whole number of "
                f"{self.epoch_samples}-sample epochs"
            )
        x = x.astype(self.dtype)
        skips = []
        for i, width in enumerate(self.widths[:-1]):
            x = ConvBlock(width, self.kernel_size, self.dtype, self.initializer,
                          name=f"encoder_{i}")(x, train)
            skips.append(x)
            x = _max_pool_by_two(x)
        x = ConvBlock(self.widths[-1], self.kernel_size, self.dtype, self.initializer,
                      name="bottom")(x, train)
        for i, (width, skip) in enumerate(zip(reversed(self.widths[:-1]), reversed(skips))):
            block = DecoderBlock(width, self.kernel_size, self.dtype, self.initializer,
                                 name=f"decoder_{i}")
            x = block(x, skip, train)
        logits = SegmentClassifier(
            self.epoch_samples, self.num_classes, self.dtype, self.initializer, name="classifier"
        )(x)
        return logits.astype(jnp.float32), x.astype(jnp.float32)


def from_config(model_cfg, *, in_channels: int, epoch_samples: int) -> USleep:
    """Builds U-Sleep from the ``model`` config group (depth, kernel_size, initial_filters,
    complexity_factor, num_classes, dtype)."""
    return USleep(
        in_channels=in_channels,
        widths=usleep_widths(
            int(model_cfg.depth), int(model_cfg.initial_filters), float(model_cfg.complexity_factor)
        ),
        kernel_size=int(model_cfg.kernel_size),
        epoch_samples=epoch_samples,
        num_classes=int(model_cfg.num_classes),
        dtype=layers.compute_dtype(model_cfg.dtype),
        initializer=str(model_cfg.get("initializer", "torch")),
    )
