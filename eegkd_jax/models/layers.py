"""Pieces both models share: PyTorch-default initialisers, the dtype option, PyTorch's batch norm.

The original project trains PyTorch modules with their default initialisation, and with a fixed
learning rate of 1e-3 the start point matters for how the first epochs go, so the layers here draw
their parameters as PyTorch does:

* ``nn.Conv1d`` / ``nn.Linear`` weights: kaiming-uniform with a = sqrt(5), which works out to
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. ``variance_scaling(1/3, "fan_in", "uniform")``.
* their biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the weight's fan_in; Flax bias initialisers
  see only the bias shape, so the fan-in is bound when the layer is built (:func:`torch_bias_init`).
* batch norm and layer norm: scale 1, bias 0 (the same in both frameworks).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch BatchNorm1d(momentum=0.1) updates running = 0.9 * running + 0.1 * batch; written with
# Flax's convention (momentum = the weight on the old value) that is 0.9. eps is PyTorch's default.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# PyTorch LayerNorm default epsilon (Flax's default is 1e-6).
LN_EPSILON = 1e-5

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def uniform_init(limit: float) -> nn.initializers.Initializer:
    """U(-limit, limit) initialiser (any shape)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def torch_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """PyTorch's default Conv1d / Linear weight initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with fan_in = the product of all but the last axis (Flax kernels are (..., in, out))."""
    fan_in = math.prod(shape[:-1])
    return uniform_init(1.0 / math.sqrt(fan_in))(key, shape, dtype)


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias initialiser for a layer whose weight has ``fan_in`` inputs."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")
    return uniform_init(1.0 / math.sqrt(fan_in))


def compute_dtype(name: Any) -> jnp.dtype:
    """The config's ``model.dtype`` ("float32", "bfloat16", "float16" or a dtype) as a dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"model dtype must be one of {sorted(_DTYPES)}, got {name!r}")
        return jnp.dtype(_DTYPES[name])
    dtype = jnp.dtype(name)
    if dtype not in [jnp.dtype(d) for d in _DTYPES.values()]:
        raise ValueError(f"model dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    return dtype


INITS = ("torch", "glorot")


def _inits(init: str, fan_in: int):
    """(kernel, bias) initialisers: "torch" as PyTorch's layers draw them (above); "glorot" as the
    U-Sleep authors' Keras implementation does (Glorot-uniform kernels, zero biases)."""
    if init == "torch":
        return torch_kernel_init, torch_bias_init(fan_in)
    if init == "glorot":
        return nn.initializers.glorot_uniform(), nn.initializers.zeros
    raise ValueError(f"model init must be one of {INITS}, got {init!r}")


def conv1d(features: int, kernel_size: int, in_features: int, dtype: Any, *, strides: int = 1,
           padding: str = "SAME", init: str = "torch", name: str | None = None) -> nn.Conv:
    """A 1-D convolution over (batch, time, channels), initialised as ``init`` says (_inits).

    "SAME" pads ``k - 1`` samples with the smaller half on the left, as PyTorch's
    ``padding="same"`` does (it matters for U-Sleep's even k=2 decoder kernel).
    """
    kernel_init, bias_init = _inits(init, in_features * kernel_size)
    return nn.Conv(features=features, kernel_size=(kernel_size,), strides=(strides,),
                   padding=padding, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, bias_init=bias_init,
                   conv_general_dilated=shaped_conv, name=name)


def _fold_taps(kernel_size: int, fold: int) -> np.ndarray:
    """0/1 array P (2m + 1, fold, fold, k): P[d, i, o, j] = 1 where input sample i of block
    b + d - m reaches output sample o of block b through tap j of a "same" k-tap convolution."""
    left = (kernel_size - 1) // 2
    m = -(-max(left, kernel_size - 1 - left) // fold)
    taps = np.zeros((2 * m + 1, fold, fold, kernel_size), np.float32)
    for d in range(2 * m + 1):
        for i in range(fold):
            for o in range(fold):
                j = (d - m) * fold + i - o + left
                if 0 <= j < kernel_size:
                    taps[d, i, o, j] = 1.0
    return taps


def shaped_conv(lhs, rhs, window_strides, padding, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` for nn.Conv, with U-Sleep's two kinds of stride-1 "SAME"
    convolution that XLA runs far below their FLOP rate in another form (together measured 1.2 -
    1.4x on the U-Sleep step on an H200, and more on a CPU): a long signal with few channels is
    convolved on blocks of 4 samples, (B, T, C) viewed as (B, T / 4, 4C) with the kernel scattered
    into a block-Toeplitz one, and a signal no longer than the kernel (U-Sleep's deepest levels)
    is one matrix product of its patches. Same sums, in another order."""
    if (lhs.ndim != 3 or tuple(window_strides) != (1,) or padding != "SAME"
            or kwargs.get("feature_group_count", 1) != 1
            or any(v not in (None, (1,)) for v in (kwargs.get("lhs_dilation"),
                                                    kwargs.get("rhs_dilation")))):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    (batch, length, channels), (k, _, features) = lhs.shape, rhs.shape
    left = (k - 1) // 2
    if 2 < k and length <= k:
        padded = jnp.pad(lhs, ((0, 0), (left, k - 1 - left), (0, 0)))
        patches = jnp.concatenate([padded[:, j:j + length] for j in range(k)], axis=-1)
        return patches @ rhs.reshape(k * channels, features)
    if k < 2 or channels > 32 or length < 256 or length % 4:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    fold = 4
    taps = jnp.asarray(_fold_taps(k, fold), rhs.dtype)
    m = taps.shape[0] // 2
    kernel = jnp.einsum("dioj,jcf->dicof", taps, rhs).reshape(
        taps.shape[0], fold * channels, fold * features)
    y = jax.lax.conv_general_dilated(
        lhs.reshape(batch, length // fold, fold * channels), kernel, (1,), [(m, m)],
        dimension_numbers=kwargs.get("dimension_numbers"), precision=kwargs.get("precision"))
    return y.reshape(batch, length, features)


def dense(features: int, in_features: int, dtype: Any, name: str | None = None,
          init: str = "torch") -> nn.Dense:
    """A linear layer (== a 1x1 convolution), initialised as ``init`` says (_inits)."""
    kernel_init, bias_init = _inits(init, in_features)
    return nn.Dense(features=features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, name=name)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm1d over (..., features): every axis but the last is a batch axis.

    Training normalises with the batch mean and biased variance and moves the running averages a
    tenth of the way towards the batch mean and the *unbiased* variance, as PyTorch does; Flax's
    ``nn.BatchNorm`` feeds the biased variance to the running average, which matters at U-Sleep's
    deepest levels (a batch of 32 single epochs has 64 samples per channel there). Evaluation uses
    the running averages. Under jit with the batch sharded across devices the statistics are those
    of the global batch. Statistics are float32 whatever the compute dtype.

    Variables: params "scale", "bias"; batch_stats "mean", "var" (Flax's names).
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
                running_mean.value = (self.momentum * running_mean.value
                                      + (1.0 - self.momentum) * jax.lax.stop_gradient(mean))
                running_var.value = (self.momentum * running_var.value
                                     + (1.0 - self.momentum) * unbiased)
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype if self.dtype is not None else x.dtype)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> BatchNorm:
    """Batch norm with PyTorch's BatchNorm1d defaults (momentum 0.1, eps 1e-5); see BatchNorm."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)
