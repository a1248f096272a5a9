"""Small pieces both models share: PyTorch-default initialisers, the dtype option, batch norm.

The original project trains PyTorch modules with their default initialisation. Flax's defaults
(LeCun-normal kernels, zero biases) are different, and with a fixed learning rate of 1e-3 the start
point matters for how the first epochs go, so the models here reproduce the PyTorch defaults:

* ``nn.Conv1d`` / ``nn.Linear`` weights: kaiming-uniform with a = sqrt(5), which works out to
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. ``variance_scaling(1/3, "fan_in", "uniform")``.
* their biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the same fan_in; Flax bias initialisers see
  only the bias shape, so the fan-in is bound when the layer is built (:func:`torch_bias_init`).
* batch norm and layer norm: scale 1, bias 0 (the same in both frameworks).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from eegkd_jax import kernels

# PyTorch BatchNorm1d(momentum=0.1) updates running = 0.9 * running + 0.1 * batch; written with
# Flax's convention (momentum = the weight on the old value) that is 0.9. eps is PyTorch's default.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# PyTorch LayerNorm default epsilon (Flax's default is 1e-6).
LN_EPSILON = 1e-5

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------------
# Uniform draws for initialisation. Drawn one by one, every parameter costs two threefry calls (the
# key Flax derives for it, then the draw), which on CPU are a rolled loop of small kernels each: a
# depth-8 U-Sleep's initialiser was ~760 kernels, 4 s of compilation even without optimisations
# and ~2 s to load from the compilation cache. Inside ``uniform_pool`` the uniform initialisers
# instead cut consecutive slices out of a few large draws (chunks of ``_POOL_CHUNK`` numbers, chunk
# i drawn with ``fold_in(key, i)``); the per-parameter keys are then unused and XLA drops them.
# The draws stay U(-limit, limit), independent, and a pure function of the key (threefry gives the
# same numbers on every backend); only which numbers land in which parameter differs from
# drawing them one by one.

_POOL_CHUNK = 1 << 20
_POOL = threading.local()


class _UniformPool:
    def __init__(self, key: jax.Array):
        self._key = key
        self._chunks = 0
        self._numbers = None
        self._used = 0

    def take(self, shape, limit: float, dtype) -> jax.Array:
        n = math.prod(shape)
        if self._numbers is None or self._used + n > self._numbers.shape[0]:
            self._numbers = jax.random.uniform(
                jax.random.fold_in(self._key, self._chunks), (max(n, _POOL_CHUNK),), jnp.float32,
                minval=-1.0, maxval=1.0)
            self._chunks += 1
            self._used = 0
        numbers = self._numbers[self._used:self._used + n]
        self._used += n
        return (numbers.reshape(shape) * limit).astype(dtype)


@contextlib.contextmanager
def uniform_pool(key: jax.Array):
    """Within this block (in this thread), :func:`uniform_init` and :func:`torch_kernel_init` draw
    from a few large uniform draws made from ``key`` instead of their own keys (see above)."""
    previous = getattr(_POOL, "pool", None)
    _POOL.pool = _UniformPool(key)
    try:
        yield
    finally:
        _POOL.pool = previous


def uniform_init(limit: float) -> nn.initializers.Initializer:
    """U(-limit, limit) initialiser (any shape)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        pool = getattr(_POOL, "pool", None)
        if pool is not None:
            return pool.take(tuple(shape), limit, dtype)
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def torch_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """PyTorch's default Conv1d / Linear weight initialiser, kaiming-uniform with a = sqrt(5):
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = the product of all but the last axis (the
    kernel is (..., in, out)); the same as ``variance_scaling(1/3, "fan_in", "uniform")``."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over (..., F): (y float32, batch mean (F,), biased variance (F,)).

    Every axis but the last is a batch axis. The same function as writing the formula out (two
    passes for the variance, no cancellation), with the backward pass written by hand: autodiff of
    the formula took 5-6 passes over each activation and was the largest item of the U-Sleep step
    profile (BN backward 31 ms of 151 ms of traced thunk time, 2-core CPU). The hand-written
    backward reads the input and the output gradient twice: one pass for the two per-channel sums,
    one for the input gradient (BN backward 31 -> 19 ms; the whole step 4-5% faster, in 69 of 80
    alternating steps). Gradients flowing into the returned mean and variance are included.
    """
    y, mean, var, _ = _batch_norm_forward(x, scale, bias, epsilon)
    return y, mean, var


def _normalize(x, mean, rstd, scale, bias):
    """(x - mean) / std * scale + bias in float32, with rstd = 1 / std."""
    return (x.astype(jnp.float32) - mean) * (rstd * scale) + bias


def _statistics(x, epsilon):
    """Per-channel mean, biased variance and 1 / std of x over every axis but the last, in
    float32 (two passes: the variance of the centred values)."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    return mean, var, jax.lax.rsqrt(var + epsilon)


def _batch_norm_forward(x, scale, bias, epsilon):
    mean, var, rstd = _statistics(x, epsilon)
    return _normalize(x.astype(jnp.float32), mean, rstd, scale, bias), mean, var, rstd


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    y, mean, var, rstd = _batch_norm_forward(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, rstd)


def _affine_grads(x, dy, mean, rstd):
    """(dy in float32, bias gradient, scale gradient) of y = (x - mean) rstd scale + bias.

    The scale's, sum dy (x - m) r, is taken as (sum dy x - m sum dy) r, from x itself: XLA then
    computes x - m inside each fusion that needs it instead of keeping it from the forward pass
    (2% of the U-Sleep step, 23 of 30 alternating steps; with the fused kernels' sums, 1.04 ->
    1.10x, 30 of 30)."""
    axes = tuple(range(x.ndim - 1))
    dy = dy.astype(jnp.float32)
    dbias = jnp.sum(dy, axis=axes)
    dscale = (jnp.sum(dy * x.astype(jnp.float32), axis=axes) - mean * dbias) * rstd
    return dy, dbias, dscale


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, scale, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    count = math.prod(x.shape[:-1])
    dy, dbias, dscale = _affine_grads(x, dy, mean, rstd)
    centred = x.astype(jnp.float32) - mean
    # d/dx of y = (x - m) r s + b through x, m and r (= (v + eps)^-1/2), then the direct
    # cotangents of m (1/N each) and v (2 (x - m) / N each).
    dx = ((scale * rstd) * (dy - dbias / count - centred * (rstd * dscale / count))
          + dmean / count + centred * (2.0 * dvar / count))
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_from_sums(x: jax.Array, total: jax.Array, total_sq: jax.Array, scale: jax.Array,
                         bias: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`batch_norm_train` for an ``x`` (float32) whose per-channel sum and sum of squares
    over every axis but the last come with it (``kernels.conv1d_elu`` computes them while it
    writes x), so the statistics cost no pass over x: mean = total / N, biased variance =
    total_sq / N - mean^2. The normalisation is x s + t (s = scale / std, t = bias - mean s),
    differentiated as such (dx = dy s, ds = sum dy x, dt = sum dy: XLA fuses each with its
    producer); gradients reach x directly and, through s and t, the two sums."""
    mean, var, rstd = _statistics_from_sums(x, total, total_sq, epsilon)
    return _affine(x, mean, rstd, scale, bias).value(jnp.float32), mean, var


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm1d over (..., features): every axis but the last is a batch axis.

    Training normalises with the batch mean and the biased batch variance and moves the running
    averages a tenth of the way towards the batch mean and the *unbiased* batch variance
    (n / (n - 1) times the biased one), as PyTorch does; Flax's ``nn.BatchNorm`` feeds the biased
    variance to the running average, which matters at U-Sleep's deepest levels, where a batch of
    32 single epochs has only 64 samples per channel. Evaluation uses the running averages.
    Under jit with the batch sharded across devices the statistics are those of the global batch.
    Statistics are computed in float32 whatever the compute dtype.

    Variables: params "scale", "bias"; batch_stats "mean", "var" (the names Flax uses).

    ``sums=(total, total_sq)``, the per-channel sums of x and x^2 over every axis but the last,
    lets training take the statistics from them instead of from x (:func:`batch_norm_from_sums`);
    evaluation ignores them. ``affine=True`` returns the result unevaluated, as a
    :class:`Normalised` (x with the per-channel scale and shift that normalise it), for a CPU-kernel
    conv that applies it as it reads (U-Sleep's conv blocks).
    """

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, sums: tuple[jax.Array, jax.Array] | None = None,
                 affine: bool = False):
        """The normalised x; with ``affine``, the same as :class:`Normalised` (x, its per-channel
        scale and shift), computed by whoever reads it."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if self.use_running_average:
            mean, rstd = running_mean.value, jax.lax.rsqrt(running_var.value + self.epsilon)
            if affine:
                return _affine(x, mean, rstd, scale, bias)
            y = _normalize(x, mean, rstd, scale, bias)
        else:
            if sums is None and not affine:
                y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            else:
                if sums is not None:
                    mean, var, rstd = _statistics_from_sums(x, *sums, self.epsilon)
                else:
                    mean, var, rstd = _statistics(x, self.epsilon)
                # x s + t (see batch_norm_from_sums); the few per-channel statistics are
                # differentiated by JAX.
                y = _affine(x, mean, rstd, scale, bias)
                if not affine:
                    y = y.value(jnp.float32)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                unbiased = jax.lax.stop_gradient(var) * (count / max(count - 1, 1))
                running_mean.value = (self.momentum * running_mean.value
                                      + (1.0 - self.momentum) * jax.lax.stop_gradient(mean))
                running_var.value = (self.momentum * running_var.value
                                     + (1.0 - self.momentum) * unbiased)
            if affine:
                return y
        return y.astype(self.dtype if self.dtype is not None else x.dtype)


@flax.struct.dataclass
class Normalised:
    """``x * scale + shift`` per channel (the last axis), not yet computed: batch norm's output
    in affine form. A conv on the CPU kernels applies it while it reads x
    (``kernels.conv1d_elu_affine``), so the normalised array is never written; anything else
    takes :meth:`value` (or :func:`materialise`), which XLA fuses into its consumer."""

    x: jax.Array
    scale: jax.Array
    shift: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def value(self, dtype: Any = None) -> jax.Array:
        y = self.x.astype(jnp.float32) * self.scale + self.shift
        return y.astype(dtype if dtype is not None else self.x.dtype)


def materialise(x, dtype: Any = None) -> jax.Array:
    """The value of a :class:`Normalised` x, or x itself; in ``dtype`` if one is given."""
    if isinstance(x, Normalised):
        return x.value(dtype)
    return x if dtype is None else x.astype(dtype)


def _affine(x, mean, rstd, scale, bias) -> Normalised:
    """Batch norm as x * s + t: s = scale / std, t = bias - mean s."""
    s = rstd * scale
    return Normalised(x, s, bias - mean * s)


def _statistics_from_sums(x, total, total_sq, epsilon):
    count = math.prod(x.shape[:-1])
    mean = total / count
    var = jnp.maximum(total_sq / count - jnp.square(mean), 0.0)
    return mean, var, jax.lax.rsqrt(var + epsilon)


@jax.custom_jvp
def elu(x: jax.Array) -> jax.Array:
    """ELU with alpha 1 (PyTorch's ``nn.ELU()``): x for x > 0, exp(x) - 1 otherwise.

    Written with ``exp(x) - 1`` rather than ``expm1`` (as ``nn.elu`` is): XLA:CPU's expm1 is the
    slow part of that fusion (1.5 -> 1.1 ms forward on a (32, 3000, 9) array, 2-core CPU). Near 0,
    where expm1 is more accurate, the absolute difference is below 1e-7: float32 rounding of x.
    The derivative is taken from the output (1 where y > 0, y + 1 elsewhere), so the backward pass
    needs no second exp (grad 1.96 -> 1.19 ms on that array).
    """
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0)) - 1)


@elu.defjvp
def _elu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = elu(x)
    return y, t * jnp.where(y > 0, jnp.ones_like(y), y + 1)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> BatchNorm:
    """Batch norm with PyTorch's BatchNorm1d defaults (momentum 0.1, eps 1e-5); see BatchNorm."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def conv1d(
    features: int,
    kernel_size: int,
    in_features: int,
    dtype: Any,
    *,
    strides: int = 1,
    padding: str = "SAME",
    upsample: int = 1,
    name: str | None = None,
) -> Conv1D:
    """A 1-D convolution over (batch, time, channels) with PyTorch's default initialisation.

    ``padding="SAME"`` pads ``k - 1`` samples in total with the smaller half on the left, which is
    what PyTorch's ``padding="same"`` does (it matters for the decoder's even k=2 kernel).
    """
    return Conv1D(
        features=features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        upsample=upsample,
        dtype=dtype,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features * kernel_size),
        name=name,
    )


class Pointwise(nn.Module):
    """A 1x1 convolution over (B, T, C) with nn.Dense's parameters ("kernel" (C, F), "bias") and
    PyTorch's default initialisation. Over long signals on the CPU kernels it is their k=1
    convolution: XLA's matrix product of a (B * T, C) x (C, F) with a handful of channels (U-Sleep's
    segment classifier, 6 x 6 over every sample) and its two gradient products were slower (the
    step 2 - 3% faster, 30 of 40 alternating steps)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", torch_bias_init(in_features), (self.features,), jnp.float32)
        dtype = self.dtype if self.dtype is not None else x.dtype
        x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
        if x.ndim == 3 and _kernels_take(x):
            return kernels.conv1d(x, kernel[None], 0) + bias
        return x @ kernel + bias


def dense(features: int, in_features: int, dtype: Any, name: str | None = None) -> nn.Dense:
    """A linear layer (== a 1x1 convolution) with PyTorch's default initialisation."""
    return nn.Dense(
        features=features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(in_features),
        name=name,
    )


# --------------------------------------------------------------------------------------------------
# 1-D convolution. The arithmetic is a plain cross-correlation; *how* it is handed to XLA is chosen
# from the shapes, because XLA's CPU convolution is slow on exactly the shapes U-Sleep is made of.
# Measured on the 2-core CPU (forward + backward of one conv at batch 32, best of 7, loaded machine):
#   thin full-resolution convs, T=6000 C=12->6 k=9: 95 ms -> 51 ms folded by 4; T=6000 C=3->6:
#     50 -> 16 ms; the decoder's k=2 conv T=6000 C=9->6: 56 -> 20 ms; T=1500 C=22->11: 27 -> 11 ms;
#   short wide convs, T=6 C=304->152 k=9: 110 ms -> 6.6 ms as one matmul; T=6 C=108->152: 27 ->
#     1.7 ms (XLA's conv loops over taps that only see padding).
# All three forms compute the same sums (only their order differs, so results agree to float32
# rounding), and the parameters are nn.Conv's: "kernel" (k, C_in, F), "bias" (F,).
# Where the hand-written CPU kernels apply (eegkd_jax/kernels: a float32 program for one CPU
# device), the thin long convs call them instead (see _use_kernels): forward, input and weight
# gradients all faster than the folded form's at U-Sleep's shapes, the step 10 - 13% faster
# (in-process alternating steps, supervised and online KD, full-size U-Sleep at batch 32), and
# another 11% with conv, bias, ELU and the batch-norm sums in one call (fused_elu_applies), and
# 5% more (0.93 - 0.95x, supervised and online KD, 23 - 30 of 30 - 40 alternating steps) where
# that call also applies the batch norm of its input and the decoder's crop and concatenation as
# it reads (Normalised inputs: the normalised arrays and the concatenation are never written).

# Whether Conv1D picks the shaped forms below (the default) or hands every convolution to XLA as
# it is (repeat-then-convolve for the decoder's upsampling): read when a model is traced, so a
# benchmark can compare the two on another backend (see use_shaped_convolutions).
_SHAPED_CONVOLUTIONS = True
_FOLD_MAX_CHANNELS = 32  # fold only thin inputs (wider ones already vectorise well)
_FOLD_MIN_LENGTH = 256   # ... and only long signals, where the per-sample cost dominates


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """PyTorch's and XLA's "same": k - 1 samples, the smaller half on the left."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def use_shaped_convolutions(enabled: bool) -> bool:
    """Turns the shape-dependent forms of U-Sleep's convolutions on (default) or off for models
    traced from now on; returns the previous setting. Both compute the same function; the forms
    were chosen on XLA:CPU, and this lets an accelerator's benchmark measure plain XLA against
    them (``benchmarks/run.py --plain-convolutions``)."""
    global _SHAPED_CONVOLUTIONS
    previous, _SHAPED_CONVOLUTIONS = _SHAPED_CONVOLUTIONS, bool(enabled)
    return previous


def shaped_convolutions() -> bool:
    """The current setting of :func:`use_shaped_convolutions`."""
    return _SHAPED_CONVOLUTIONS


def _conv_plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 "same" cross-correlation as one XLA convolution."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1,), [_same_padding(kernel.shape[0])], dimension_numbers=("NWC", "WIO", "NWC"))


@functools.lru_cache(maxsize=None)
def _fold_taps(kernel_size: int, fold: int) -> np.ndarray:
    """0/1 array P (2m + 1, fold, fold, k): P[d, i, o, j] = 1 where input sample i of block b + d - m
    reaches output sample o of block b through tap j of a "same" k-tap convolution."""
    left, right = _same_padding(kernel_size)
    m = -(-max(left, right) // fold)
    taps = np.zeros((2 * m + 1, fold, fold, kernel_size), np.float32)
    for d in range(2 * m + 1):
        for i in range(fold):
            for o in range(fold):
                j = (d - m) * fold + i - o + left
                if 0 <= j < kernel_size:
                    taps[d, i, o, j] = 1.0
    return taps


def _fold_factor(length: int, in_features: int, kernel_size: int) -> int:
    """Samples per block for the folded form (1: don't fold)."""
    if length < _FOLD_MIN_LENGTH or in_features > _FOLD_MAX_CHANNELS or kernel_size < 2:
        return 1
    for fold in (4, 2):
        if length % fold == 0:
            return fold
    return 1


# Where the CPU kernels take a conv: thin inputs over long signals, any length (the folded form
# needs one divisible by 2 or 4; the kernels do not). With the time-major weight-gradient kernel
# they also beat XLA at U-Sleep's 188- and 375-sample levels with up to 56 input channels (the
# step 0.94 - 0.98x, 23 - 27 of 30 - 40 alternating steps; online KD 0.96x, 26 of 30; compiling
# 1 - 2 s faster); taking 64 samples or 128 channels as well made no further difference (12 and
# 20 of 30). Before that kernel, 64 channels and 128 samples had made none either.
_KERNEL_MAX_CHANNELS = 64
_KERNEL_MIN_LENGTH = 128


def _kernels_take(x: jax.Array) -> bool:
    """Whether x, (B, T, C), is thin and long enough for the CPU kernels, and they can run here."""
    _, length, channels = x.shape
    return (length >= _KERNEL_MIN_LENGTH and channels <= _KERNEL_MAX_CHANNELS
            and kernels.available(x.dtype))


def _use_kernels(x: jax.Array, kernel_size: int) -> bool:
    """Whether a stride-1 "same" conv of x calls the CPU kernels (eegkd_jax/kernels); a k=1 conv
    here is a matmul (see :func:`_conv_same`; :class:`Pointwise` has its own choice)."""
    return kernel_size >= 2 and _kernels_take(x)


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 "same" cross-correlation (B, T, C) x (k, C, F) -> (B, T, F), in the form that is
    fastest for the shape (see the table above)."""
    if not _SHAPED_CONVOLUTIONS:
        return _conv_plain(x, kernel)
    b, length, channels = x.shape
    k, _, features = kernel.shape
    left, right = _same_padding(k)
    if _use_kernels(x, k):
        return kernels.conv1d(x, kernel, left)
    fold = _fold_factor(length, channels, k)
    if fold > 1:
        # Space-to-depth: (B, T, C) -> (B, T / s, s * C) is a free reshape of the same bytes. A
        # k-tap conv over samples is then a (2m + 1)-tap conv over blocks whose kernel is the
        # original one scattered into a block-Toeplitz pattern (mostly zeros: ~1.3-2x the FLOPs),
        # but with s times the channels XLA's CPU conv runs several times faster.
        taps = jnp.asarray(_fold_taps(k, fold), kernel.dtype)
        m = taps.shape[0] // 2
        folded = jnp.einsum("dioj,jcf->dicof", taps, kernel).reshape(
            taps.shape[0], fold * channels, fold * features)
        y = jax.lax.conv_general_dilated(
            x.reshape(b, length // fold, fold * channels), folded, (1,), [(m, m)],
            dimension_numbers=("NWC", "WIO", "NWC"))
        return y.reshape(b, length, features)
    if k == 1:
        return x @ kernel[0]  # a pointwise conv is a matmul over the channel axis
    if k > 2 and length <= k:
        # Short signal, long kernel: im2col. The patches are tiny here (T <= k), and one matmul
        # replaces a convolution that XLA's CPU backend runs 15x slower than its FLOPs warrant.
        padded = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
        patches = jnp.concatenate([padded[:, j:j + length] for j in range(k)], axis=-1)
        return patches @ kernel.reshape(k * channels, features)
    return _conv_plain(x, kernel)


def fused_elu_applies(x: jax.Array, kernel_size: int, upsample: int = 1) -> bool:
    """Whether a stride-1 "same" conv of x (upsampled ``upsample`` times first, see
    :func:`upsample_conv_k2`) runs on the CPU kernels, and so can give ELU(conv + bias) with its
    batch-norm sums in one call (``Conv1D(..., elu_sums=True)``)."""
    if not _SHAPED_CONVOLUTIONS or upsample not in (1, 2) or (upsample == 2 and kernel_size != 2):
        return False
    return _use_kernels(x, kernel_size)


def _conv_elu_sums(x, kernel, bias, upsample):
    """kernels.conv1d_elu for a plain or an upsampling conv (see :func:`upsample_conv_k2`: the
    upsampling conv is one at x's length with 2F outputs, whose sums are added per channel).
    x: an array, or a tuple of :class:`Normalised` inputs side by side along the channels, over
    the shortest one's samples (kernels.conv1d_elu_affine)."""
    if isinstance(x, tuple):
        length = min(n.shape[1] for n in x)
        triples = tuple((n.x, n.scale, n.shift) for n in x)

        def conv(kernel, bias, left):
            return kernels.conv1d_elu_affine(triples, kernel, bias, left, length)
    else:
        length = x.shape[1]

        def conv(kernel, bias, left):
            return kernels.conv1d_elu(x, kernel, bias, left)
    if upsample == 1:
        return conv(kernel, bias, _same_padding(kernel.shape[0])[0])
    features = kernel.shape[-1]
    a, total, total_sq = conv(_upsample_k2_kernel(kernel), jnp.concatenate([bias, bias]), 0)
    return (a.reshape(a.shape[0], 2 * length, features), total[:features] + total[features:],
            total_sq[:features] + total_sq[features:])


def input_probe(inputs: tuple, dtype: Any) -> jax.ShapeDtypeStruct:
    """The (B, T, C) array a conv of ``inputs`` (side by side along the channels, over the
    shortest one's samples) would see, for :func:`fused_elu_applies`."""
    return jax.ShapeDtypeStruct((inputs[0].shape[0], min(n.shape[1] for n in inputs),
                                 sum(n.shape[2] for n in inputs)), dtype)


def _upsample_k2_kernel(kernel: jax.Array) -> jax.Array:
    """The (2, C, 2F) kernel of :func:`upsample_conv_k2`: [[w0 + w1, w0], [0, w1]]."""
    w0, w1 = kernel[0], kernel[1]
    return jnp.stack([jnp.concatenate([w0 + w1, w0], axis=-1),
                      jnp.concatenate([jnp.zeros_like(w1), w1], axis=-1)])


def upsample_conv_k2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``_conv_same(jnp.repeat(x, 2, axis=1), kernel)`` for a k=2 kernel, computed at x's length.

    (B, T, C) x (2, C, F) -> (B, 2T, F). With u = x upsampled (u[2s] = u[2s + 1] = x[s]) and "same"
    padding of one zero on the right, the outputs are y[2s] = x[s] (w0 + w1) and
    y[2s + 1] = x[s] w0 + x[s + 1] w1 (x[T] = 0): one k=2 "same" conv at half resolution with 2F
    outputs, kernel [[w0 + w1, w0], [0, w1]], whose (B, T, 2F) result *is* (B, 2T, F) in memory.
    Neither the upsampled input nor its gradient is ever materialised; U-Sleep's decoder blocks
    at 3000, 1500 and 750 samples measured 41 -> 26, 20 -> 16 and 21 -> 13 ms (forward + backward,
    batch 32, 2-core CPU) against upsample-then-convolve.
    """
    if kernel.shape[0] != 2:
        raise ValueError(f"upsample_conv_k2 takes a (2, C, F) kernel, got {kernel.shape}")
    if not _SHAPED_CONVOLUTIONS:
        return _conv_plain(jnp.repeat(x, 2, axis=1), kernel)
    b, length, _ = x.shape
    return _conv_same(x, _upsample_k2_kernel(kernel)).reshape(b, 2 * length, kernel.shape[-1])


class Conv1D(nn.Module):
    """A 1-D convolution over (B, T, C_in) -> (B, T', features) with nn.Conv's variables.

    Stride 1 with "SAME" padding (U-Sleep) goes through :func:`_conv_same`; a kernel equal to its
    stride with "VALID" padding (the transformer's patch tokeniser) is a reshape and one matmul;
    anything else is XLA's convolution. Parameters are float32; the computation runs in ``dtype``.

    ``upsample=2`` convolves the input repeated twice along time (nearest-neighbour upsampling),
    (B, T, C_in) -> (B, 2T, features), without building the repeated signal; only k=2, stride 1,
    "SAME" (U-Sleep's decoder) has that form (:func:`upsample_conv_k2`).
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: str = "SAME"
    upsample: int = 1
    dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = torch_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, elu_sums: bool = False):
        """y = conv(x) + bias; with ``elu_sums`` (only where :func:`fused_elu_applies`), the tuple
        (ELU(y), per-channel sum of ELU(y), sum of its squares) from ``kernels.conv1d_elu``.
        With ``elu_sums``, x may also be a tuple of :class:`Normalised` inputs, which the conv
        reads side by side along the channels over the shortest one's samples."""
        k, stride = self.kernel_size, self.strides
        inputs = x if isinstance(x, tuple) else None
        in_features = sum(n.shape[-1] for n in inputs) if inputs else x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, in_features, self.features),
                            jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        dtype = self.dtype
        if dtype is None:
            dtype = inputs[0].x.dtype if inputs else x.dtype
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        if inputs is None:
            x = x.astype(dtype)
        if elu_sums:
            probe = x if inputs is None else input_probe(inputs, dtype)
            if (stride != 1 or self.padding != "SAME" or not fused_elu_applies(
                    probe, k, self.upsample)
                    or (inputs and not all(isinstance(n, Normalised) for n in inputs))):
                raise ValueError(f"Conv1D(elu_sums=True) does not apply to input {probe.shape} "
                                 f"with kernel {k}, stride {stride}, {self.padding!r}, upsample "
                                 f"{self.upsample}")
            return _conv_elu_sums(x, kernel, bias, self.upsample)
        if inputs is not None:
            raise ValueError("Conv1D takes a tuple of Normalised inputs only with elu_sums=True")
        if self.upsample != 1:
            if (self.upsample, k, stride, self.padding) != (2, 2, 1, "SAME"):
                raise ValueError(
                    f"Conv1D upsample={self.upsample} is implemented for upsample=2 with a k=2, "
                    f"stride-1 'SAME' kernel only; got k={k}, stride={stride}, {self.padding!r}")
            y = upsample_conv_k2(x, kernel)
        elif stride == 1 and self.padding == "SAME":
            y = _conv_same(x, kernel)
        elif stride == k and self.padding == "VALID":
            # Non-overlapping windows: the same bytes reshaped, then one matmul (no patches).
            b, length, _ = x.shape
            windows = length // k
            patches = x[:, : windows * k].reshape(b, windows, k * in_features)
            y = patches @ kernel.reshape(k * in_features, self.features)
        else:
            pad = [_same_padding(k)] if self.padding == "SAME" else self.padding
            y = jax.lax.conv_general_dilated(
                x, kernel, (stride,), pad, dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias
