"""The epoch-level cross-modal transformer (Pradeepkumar et al. 2022) in Flax Linen.

Layout as in the ear-EEG KD project (2,958,853 parameters at d_model 256, d_ff 1024, 3 channels):

* one branch per input channel (the original fed its first channel to the third branch too; here
  branch c always sees channel c):
  - multi-scale convolutional tokeniser, all stride 50 in total so each token covers 0.25 s at
    200 Hz: (a) conv k=s=50 to d/4; (b) convs k=s=5, 5, 2 to d/8, d/4, 3d/8; (c) convs k=s=25, 2 to
    d/4, 3d/8; each conv followed by LeakyReLU(0.01), each path ending in batch norm; the three
    paths concatenate to d channels, then a 1x1 conv -> LeakyReLU -> batch norm;
  - a learned CLS token in front, sinusoidal positions added, dropout;
  - one post-norm self-attention layer: LN(x + dropout(MHA(x))), 8 heads.
* cross-modal attention: a second learned CLS token followed by the branches' CLS tokens,
  LN(x + dropout(MHA(x))); its output at the CLS position replaces every branch's CLS.
* per branch a post-norm feed-forward block LN(x + dropout(W2 dropout(ReLU(W1 x)))), d -> d_ff -> d.
* features: the branches' CLS vectors after their feed-forward blocks, concatenated
  (3 * 256 = 768); logits: one linear layer.

Only the CLS position of each branch ever reaches the output: the feed-forward blocks and layer
norms act on each position separately, and the branch CLS is replaced by the cross-modal one. The
original still runs attention queries and feed-forward blocks for all 121 positions and throws 120
of them away; here the self-attention and cross-attention are computed for the CLS query only (keys
and values are still every token) and the feed-forward blocks for the CLS vector only. The
parameters and the function from input to (logits, features) are the same (the PyTorch parity test
in tests/test_models.py checks it); the wasted work is not done.

Dropout (rate ``dropout``) acts on the embedded tokens, the attention weights, the residual branches
and inside the feed-forward blocks, in training only. Batch norm in the tokeniser keeps running
averages in "batch_stats" like U-Sleep's. Input (B, S, C) with S one epoch (L = 1); output logits
(B, 1, classes) float32 and features (B, C * d_model) float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from eegkd_jax.models import layers

# Total stride of every tokeniser path (50 samples = 0.25 s at 200 Hz), as in the original.
TOKEN_STRIDE = 50


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """(length, d_model) table: sin on even columns, cos on odd ones (wavelengths to 1e4 * 2pi)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    frequency = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * (-math.log(10000.0) / d_model))
    table = np.zeros((length, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency[: d_model // 2])
    return table.astype(np.float32)


def _leaky_relu(x: jnp.ndarray) -> jnp.ndarray:
    return nn.leaky_relu(x, negative_slope=0.01)  # PyTorch's default slope


class Tokenizer(nn.Module):
    """One channel (B, S, 1) -> tokens (B, S // 50, d_model) from three conv paths."""

    d_model: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        d = self.d_model
        wide = (d - d // 4) // 2  # the two multi-step paths share the rest of the width

        def path(h, specs, name):
            # specs: (features, kernel = stride) per conv; LeakyReLU after each, BN at the end.
            for j, (features, k) in enumerate(specs):
                conv = layers.conv1d(
                    features, k, h.shape[-1], self.dtype, strides=k, padding="VALID",
                    name=f"{name}_conv{j}",
                )
                h = _leaky_relu(conv(h))
            return layers.batch_norm(train, self.dtype, name=f"{name}_bn")(h)

        a = path(x, [(d // 4, 50)], "single")
        b = path(x, [(d // 8, 5), (d // 4, 5), (wide, 2)], "fine")
        c = path(x, [(d // 4, 25), (wide, 2)], "coarse")
        h = jnp.concatenate([a, b, c], axis=-1)
        h = layers.conv1d(d, 1, d, self.dtype, name="mix_conv")(h)
        h = _leaky_relu(h)
        return layers.batch_norm(train, self.dtype, name="mix_bn")(h)


def _attention(d_model: int, num_heads: int, dropout: float, dtype: Any, name: str):
    """Multi-head attention initialised like torch.nn.MultiheadAttention.

    PyTorch draws the stacked (3d, d) q/k/v projection from one Xavier-uniform, so each of the
    three has limit sqrt(6 / (d + 3d)); the output projection is a default Linear; biases are 0.
    """
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads,
        qkv_features=d_model,
        out_features=d_model,
        dropout_rate=dropout,
        broadcast_dropout=False,  # PyTorch drops every attention weight independently
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.uniform_init(math.sqrt(6.0 / (4 * d_model))),
        out_kernel_init=layers.torch_kernel_init,
        bias_init=nn.initializers.zeros,
        # Softmax of bfloat16 logits loses the small attention weights; compute it in float32.
        force_fp32_for_softmax=jnp.dtype(dtype) != jnp.float32,
        name=name,
    )


class Branch(nn.Module):
    """One channel's encoder: (B, S, 1) -> its CLS vector after self-attention, (B, d_model)."""

    d_model: int
    num_heads: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        tokens = Tokenizer(self.d_model, self.dtype, name="tokenizer")(x, train)
        batch, length, _ = tokens.shape
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, self.d_model), jnp.float32)
        h = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.d_model)).astype(tokens.dtype),
                             tokens], axis=1)
        h = h + jnp.asarray(sinusoidal_positions(length + 1, self.d_model), h.dtype)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Self-attention for the CLS query only (see the module docstring).
        query = h[:, :1]
        attended = _attention(self.d_model, self.num_heads, self.dropout, self.dtype, "self_attn")(
            query, h, deterministic=not train
        )
        out = query + nn.Dropout(self.dropout, deterministic=not train)(attended)
        out = nn.LayerNorm(epsilon=layers.LN_EPSILON, dtype=self.dtype, name="norm")(out)
        return out[:, 0]


class FeedForward(nn.Module):
    """Post-norm feed-forward block on (B, d_model) vectors: LN(x + drop(W2 drop(relu(W1 x))))."""

    d_model: int
    d_ff: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        h = layers.dense(self.d_ff, self.d_model, self.dtype, name="linear1")(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(h))
        h = layers.dense(self.d_model, self.d_ff, self.dtype, name="linear2")(h)
        out = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.LayerNorm(epsilon=layers.LN_EPSILON, dtype=self.dtype, name="norm")(out)


class CrossModalTransformer(nn.Module):
    """Epoch classifier over (B, epoch_samples, in_channels) -> (logits (B, 1, C), features).

    Attributes:
      in_channels: number of branches, one per input derivation.
      epoch_samples: samples in the one epoch it classifies (6000 = 30 s at 200 Hz); a multiple
        of 50, the tokeniser stride.
      d_model, num_heads, d_ff, dropout, num_classes: as in the original (256, 8, 1024, 0.1, 5).
      dtype: compute dtype; parameters are float32 whatever it is.
    """

    in_channels: int
    epoch_samples: int = 6000
    d_model: int = 256
    num_heads: int = 8
    d_ff: int = 1024
    dropout: float = 0.1
    num_classes: int = 5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x (B, S, C) -> logits (B, 1, num_classes) float32, features (B, C * d_model) float32.

        ``train`` turns dropout on (needs ``rngs={"dropout": key}``) and batch statistics in the
        tokeniser (``mutable=["batch_stats"]`` to update the running averages).
        """
        if self.d_model % 8 or self.d_model % self.num_heads:
            raise ValueError(
                f"d_model must be a multiple of 8 (tokeniser widths) and of num_heads "
                f"{self.num_heads}, got {self.d_model}"
            )
        if self.epoch_samples % TOKEN_STRIDE:
            raise ValueError(
                f"the transformer needs epochs of a multiple of {TOKEN_STRIDE} samples, got "
                f"{self.epoch_samples}"
            )
        if x.ndim != 3 or x.shape[1:] != (self.epoch_samples, self.in_channels):
            raise ValueError(
                f"the transformer classifies one epoch at a time: expected input (batch, "
                f"{self.epoch_samples}, {self.in_channels}), got shape {x.shape}"
            )
        x = x.astype(self.dtype)
        branch_cls = [
            Branch(self.d_model, self.num_heads, self.dropout, self.dtype, name=f"branch_{c}")(
                x[:, :, c : c + 1], train
            )
            for c in range(self.in_channels)
        ]
        batch = x.shape[0]
        cross_token = self.param(
            "cross_cls", nn.initializers.normal(1.0), (1, 1, self.d_model), jnp.float32
        )
        h = jnp.concatenate(
            [jnp.broadcast_to(cross_token, (batch, 1, self.d_model)).astype(self.dtype)]
            + [v[:, None, :] for v in branch_cls],
            axis=1,
        )
        query = h[:, :1]
        attended = _attention(self.d_model, self.num_heads, self.dropout, self.dtype, "cross_attn")(
            query, h, deterministic=not train
        )
        cross = query + nn.Dropout(self.dropout, deterministic=not train)(attended)
        cross = nn.LayerNorm(epsilon=layers.LN_EPSILON, dtype=self.dtype, name="cross_norm")(cross)
        cross = cross[:, 0]
        features = jnp.concatenate(
            [
                FeedForward(self.d_model, self.d_ff, self.dropout, self.dtype, name=f"ff_{c}")(
                    cross, train
                )
                for c in range(self.in_channels)
            ],
            axis=-1,
        )
        feature_size = self.in_channels * self.d_model
        logits = layers.dense(self.num_classes, feature_size, self.dtype, name="head")(features)
        return logits[:, None, :].astype(jnp.float32), features.astype(jnp.float32)


def from_config(model_cfg, *, in_channels: int, epoch_samples: int) -> CrossModalTransformer:
    """Builds the transformer from the ``model`` config group (d_model, num_heads, d_ff, dropout,
    num_classes, dtype)."""
    return CrossModalTransformer(
        in_channels=in_channels,
        epoch_samples=epoch_samples,
        d_model=int(model_cfg.d_model),
        num_heads=int(model_cfg.num_heads),
        d_ff=int(model_cfg.d_ff),
        dropout=float(model_cfg.dropout),
        num_classes=int(model_cfg.num_classes),
        dtype=layers.compute_dtype(model_cfg.dtype),
    )
