"""Hand-written CPU kernels, called from XLA programs through the XLA FFI.

:func:`conv1d` is the "same" 1-D convolution of ``conv1d.cc`` beside this file, with its gradients,
:func:`conv1d_elu` the same followed by bias, ELU and the batch-norm sums, and
:func:`conv1d_elu_affine` that of an input normalised and concatenated as it is read, each with
its gradients: XLA:CPU's convolution runs U-Sleep's thin, long layers far below the machine's
arithmetic rate (see ``benchmarks/conv_kernels.py``). :func:`global_norm` is a gradient's norm and
:func:`adam` an Adam step over all of a network's parameter arrays, each one call instead of a
few small XLA kernels per array. The library is compiled on first use with
the machine's C++ compiler (``$CXX``, else ``g++`` or ``c++``; ``-O3 -march=native``) against the
FFI headers that ship with jaxlib, and kept in ``~/.cache/eegkd_jax/kernels``
(``EEGKD_KERNEL_CACHE`` overrides) under a digest of the source, the compiler, the headers and
this CPU's feature flags.

:func:`available` says whether the kernels can be used in the program being traced: CPU backend,
a single device (the FFI call is not partitioned, so on a mesh XLA would gather the batch onto
every device), a library that built and loaded, and ``EEGKD_CPU_KERNELS`` not set to 0 / off.
Where any of that fails the model keeps XLA's own convolution: the kernels change speed, never
results beyond float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eegkd_jax import switched_off

SOURCE = pathlib.Path(__file__).with_name("conv1d.cc")
ENV_SWITCH = "EEGKD_CPU_KERNELS"
ENV_CACHE = "EEGKD_KERNEL_CACHE"
_SYMBOLS = {"eegkd_conv1d": "EegkdConv1d", "eegkd_conv1d_elu": "EegkdConv1dElu",
            "eegkd_conv1d_wgrad": "EegkdConv1dWeightGrad",
            "eegkd_sum_of_squares": "EegkdSumOfSquares", "eegkd_adam": "EegkdAdam"}
TARGETS = tuple(_SYMBOLS)  # the FFI targets the programs call
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC")

_log = logging.getLogger(__name__)


def _compiler() -> str | None:
    """The C++ compiler's path: $CXX, else g++, else c++; None if none is found."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _library_path(compiler: str) -> pathlib.Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(_FLAGS).encode(),
                 jax.ffi.include_dir().encode(), jax.__version__.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    base = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eegkd_jax", "kernels")
    return pathlib.Path(base) / f"conv1d-{digest.hexdigest()[:20]}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so that a concurrent build or an
    # interrupted one never leaves a half-written library under the final name.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_registered: set[str] = set()
_lock = threading.Lock()  # one build at a time: prepare()'s thread and a trace may both ask


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    """Builds (if needed), loads and registers the kernels once per process; False on failure."""
    with _lock:
        return _load_locked()


def _load_locked() -> bool:
    compiler = _compiler()
    if compiler is None:
        _log.warning("eegkd_jax.kernels: no C++ compiler found; using XLA's convolution")
        return False
    try:
        path = _library_path(compiler)
        if not path.exists():
            _log.info("eegkd_jax.kernels: compiling %s -> %s", SOURCE.name, path)
            _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _SYMBOLS.items():
            if target not in _registered:  # XLA keeps a target's first registration
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                            platform="cpu")
                _registered.add(target)
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = getattr(error, "stderr", "") or ""
        _log.warning("eegkd_jax.kernels: could not build or load the CPU kernels (%s%s); using "
                     "XLA's convolution", error, f": {detail[-2000:]}" if detail else "")
        return False
    return True


def prepare() -> None:
    """Starts building and loading the kernels in a background thread where a model may call them,
    so that the first run on a machine compiles them (a few seconds) while it prepares its data;
    whatever needs them first waits for that build. Does nothing elsewhere."""
    if switched_off(ENV_SWITCH) or jax.default_backend() != "cpu" or not _single_device():
        return
    threading.Thread(target=_load, name="eegkd-kernels-build", daemon=True).start()


def _single_device() -> bool:
    return jax.device_count() == 1


def available(dtype=jnp.float32) -> bool:
    """Whether :func:`conv1d` can run in the program being traced now (see the module doc)."""
    return (jnp.dtype(dtype) == jnp.float32 and not switched_off(ENV_SWITCH)
            and jax.default_backend() == "cpu" and _single_device() and _load())


def _require() -> None:
    if not _load():
        raise RuntimeError("eegkd_jax.kernels: the CPU kernels could not be built or loaded (see "
                           "the log); check kernels.available() before calling them")


def _forward_call(x: jax.Array, kernel: jax.Array, left: int) -> jax.Array:
    _require()
    b, t, _ = x.shape
    call = jax.ffi.ffi_call("eegkd_conv1d", jax.ShapeDtypeStruct((b, t, kernel.shape[2]),
                                                                 jnp.float32),
                            vmap_method="sequential")
    return call(x, kernel, left=np.int64(left))


def _weight_grad_call(inputs, dy: jax.Array, k: int, left: int, affine: bool = False):
    """(weight gradient, bias gradient), summed over the batch. ``inputs``: the conv's input as
    the kernels take it (see :func:`_flat_inputs`)."""
    _require()
    f = dy.shape[2]
    c = sum(x.shape[2] for x in inputs[::3 if affine else 1])
    call = jax.ffi.ffi_call("eegkd_conv1d_wgrad",
                            (jax.ShapeDtypeStruct((k, c, f), jnp.float32),
                             jax.ShapeDtypeStruct((f,), jnp.float32)),
                            vmap_method="sequential")
    return call(dy, *inputs, left=np.int64(left), affine=affine)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv1d(x: jax.Array, kernel: jax.Array, left: int) -> jax.Array:
    """y[b, t, f] = sum_{j, c} kernel[j, c, f] x[b, t + j - left, c], zeros outside the signal:
    float32 (B, T, C) x (K, C, F) -> (B, T, F); ``left`` = (K - 1) // 2 is "same" padding.
    Call only where :func:`available` is true."""
    return _forward_call(x, kernel, left)


def _conv1d_fwd(x, kernel, left):
    return _forward_call(x, kernel, left), (x, kernel)


def _input_grad(dy: jax.Array, kernel: jax.Array, left: int) -> jax.Array:
    # dx[s, c] = sum_{j, f} kernel[k - 1 - j, c, f] dy[s + j - (k - 1 - left), f]: the same
    # convolution of dy with the kernel flipped in time and its channel axes swapped.
    k = kernel.shape[0]
    return _forward_call(dy, jnp.transpose(kernel[::-1], (0, 2, 1)), k - 1 - left)


def _conv1d_bwd(left, residuals, dy):
    x, kernel = residuals
    dw, _ = _weight_grad_call((x,), dy, kernel.shape[0], left)
    return _input_grad(dy, kernel, left), dw


conv1d.defvjp(_conv1d_fwd, _conv1d_bwd)


def _elu_call(inputs, kernel: jax.Array, bias: jax.Array, left: int, length: int,
              affine: bool = False):
    _require()
    b = inputs[0].shape[0]
    f = kernel.shape[2]
    call = jax.ffi.ffi_call(
        "eegkd_conv1d_elu",
        (jax.ShapeDtypeStruct((b, length, f), jnp.float32),
         jax.ShapeDtypeStruct((2, f), jnp.float32)),
        vmap_method="sequential")
    a, sums = call(kernel, bias, *inputs, left=np.int64(left), affine=affine)
    return a, sums[0], sums[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv1d_elu(x: jax.Array, kernel: jax.Array, bias: jax.Array, left: int):
    """``a = ELU(conv1d(x, kernel, left) + bias)`` with the per-channel sums of ``a`` and ``a**2``
    over batch and time: (B, T, F), (F,), (F,), float32. Batch norm's mean and variance follow
    from the sums, so the layer's output is not read again to compute them. Call only where
    :func:`available` is true."""
    return _elu_call((x,), kernel, bias, left, x.shape[1])


def _conv1d_elu_fwd(x, kernel, bias, left):
    a, total, total_sq = _elu_call((x,), kernel, bias, left, x.shape[1])
    return (a, total, total_sq), (x, kernel, a)


def _elu_grad(a, cotangents):
    """The gradient at the conv's output (before bias and ELU) from the cotangents of a and of
    its two sums: each a[b, t, f] enters the sums once (as a and as a^2); ELU' = 1 where a > 0,
    else a + 1."""
    da, d_total, d_total_sq = cotangents
    return (da + d_total + 2.0 * a * d_total_sq) * jnp.where(a > 0, 1.0, a + 1.0)


def _conv1d_elu_bwd(left, residuals, cotangents):
    x, kernel, a = residuals
    dz = _elu_grad(a, cotangents)
    dw, dbias = _weight_grad_call((x,), dz, kernel.shape[0], left)
    return _input_grad(dz, kernel, left), dw, dbias


conv1d_elu.defvjp(_conv1d_elu_fwd, _conv1d_elu_bwd)


def _flat_inputs(inputs) -> tuple:
    return tuple(part for triple in inputs for part in triple)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv1d_elu_affine(inputs, kernel: jax.Array, bias: jax.Array, left: int, length: int):
    """:func:`conv1d_elu` of an input assembled on the way in: ``inputs`` is one or two triples
    ``(x (B, T_i, C_i), scale (C_i,), shift (C_i,))``, and the conv sees their channels side by
    side, each as ``x * scale + shift`` (batch norm's affine form) over the first ``length``
    samples (T_i >= length: a longer array is cropped), with zeros outside. U-Sleep's decoder
    convolves [normalised upsampled signal, normalised skip] this way: neither the normalised
    arrays nor their concatenation are written. Gradients reach every x, scale and shift."""
    return _elu_call(_flat_inputs(inputs), kernel, bias, left, length, affine=True)


def _conv1d_elu_affine_fwd(inputs, kernel, bias, left, length):
    a, total, total_sq = _elu_call(_flat_inputs(inputs), kernel, bias, left, length, affine=True)
    return (a, total, total_sq), (inputs, kernel, a)


def _conv1d_elu_affine_bwd(left, length, residuals, cotangents):
    inputs, kernel, a = residuals
    dz = _elu_grad(a, cotangents)
    dw, dbias = _weight_grad_call(_flat_inputs(inputs), dz, kernel.shape[0], left, affine=True)
    dn = _input_grad(dz, kernel, left)  # at the assembled input: (B, length, sum C_i)
    grads, first = [], 0
    for x, scale, shift in inputs:
        c = x.shape[2]
        dn_i = dn[:, :, first:first + c]
        first += c
        dscale = jnp.sum(dn_i * x[:, :length], axis=(0, 1))
        dshift = jnp.sum(dn_i, axis=(0, 1))
        dx = dn_i * scale
        if x.shape[1] > length:  # the cropped samples had no effect
            dx = jnp.pad(dx, ((0, 0), (0, x.shape[1] - length), (0, 0)))
        grads.append((dx, dscale, dshift))
    return tuple(grads), dw, dbias


conv1d_elu_affine.defvjp(_conv1d_elu_affine_fwd, _conv1d_elu_affine_bwd)


def global_norm(tree) -> jax.Array:
    """The global L2 norm of a pytree's leaves (float32 scalar), as ``optax.tree.norm`` computes it.

    Where :func:`available` and every leaf is float32, one kernel call sums the squares of all
    the leaves (in double per run of 1024 elements); XLA:CPU compiles a per-array norm into 3 - 4
    fusions per array, and a train step reports a norm of a few hundred parameter arrays. Elsewhere
    it is ``optax.tree.norm``. A metric: not differentiable on the kernel path.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if not all(leaf.dtype == jnp.float32 for leaf in leaves) or not available():
        return optax.tree.norm(tree)
    call = jax.ffi.ffi_call("eegkd_sum_of_squares", jax.ShapeDtypeStruct((), jnp.float32),
                            vmap_method="sequential")
    return jnp.sqrt(call(*leaves))


def adam(grads: list, params: list, mu: jax.Array, nu: jax.Array, scalars: jax.Array, *,
         b1: float, b2: float, eps: float, eps_root: float, weight_decay: float,
         max_norm: float) -> tuple[list, jax.Array, jax.Array]:
    """One Adam step over lists of float32 arrays, in place: -> (new params, new mu, new nu).

    ``mu`` / ``nu`` are the flat moment vectors (the arrays' elements one after the other, as
    ``optax.flatten`` keeps them); ``scalars`` is float32 (4,): the step (minus the learning
    rate), 1 - b1^t, 1 - b2^t and the gradient's global norm (read only when ``max_norm`` > 0:
    gradients are scaled by max_norm / norm where the norm is not below it, as
    ``optax.clip_by_global_norm``). Weight decay is added to the gradient first (L2, as PyTorch's
    Adam). The per-element arithmetic is optax's (see ``conv1d.cc``). Call only where
    :func:`available` is true; not differentiable.
    """
    _require()
    n = len(grads)
    if len(params) != n:
        raise ValueError(f"kernels.adam: {n} gradients but {len(params)} parameter arrays")
    results = (jax.ShapeDtypeStruct(mu.shape, jnp.float32),
               jax.ShapeDtypeStruct(nu.shape, jnp.float32),
               *(jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params))
    # Operands: scalars, mu, nu, grads..., params...; results: mu, nu, params... (in place).
    aliases = {1: 0, 2: 1, **{3 + n + i: 2 + i for i in range(n)}}
    call = jax.ffi.ffi_call("eegkd_adam", results, input_output_aliases=aliases)
    f32 = np.float32
    out = call(scalars, mu, nu, *grads, *params, b1=f32(b1), b2=f32(b2), one_minus_b1=f32(1 - b1),
               one_minus_b2=f32(1 - b2), eps=f32(eps), eps_root=f32(eps_root),
               weight_decay=f32(weight_decay), max_norm=f32(max_norm))
    return list(out[2:]), out[0], out[1]
