"""Could a hand-written CPU kernel beat XLA:CPU's convolution at U-Sleep's thin shapes?

    python benchmarks/direct_conv/bench.py                 # both cores
    taskset -c 0 python benchmarks/direct_conv/bench.py    # one core

Builds ``conv.c`` beside this file with the machine's C compiler (``$CC``, default gcc; ``-O3
-march=native``) into a temporary folder, checks it against ``layers._conv_same`` (the form the
model uses for the shape: folded, plain or im2col) on random data, then times the forward pass of
both at batch 32: the median of ``--repeats`` calls. One JSON line per shape: milliseconds, the
rate in GFLOP/s counting only the convolution's own multiply-adds (2 * B * T * C * F * K; the
folded form's extra zeros are not counted for either), and the largest error relative to XLA's
largest output.

The kernel is single-threaded and computes the forward pass only: it answers whether the
arithmetic can go faster than XLA:CPU's at these shapes, not what a step would gain (that needs
its gradients, threads, and an XLA FFI custom call). Not part of the package or its tests.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from eegkd_jax.models import layers  # noqa: E402

# (samples, input channels, output channels, kernel): U-Sleep's full-size levels with thin inputs.
SHAPES = ((6000, 3, 6, 9), (6000, 12, 6, 9), (6000, 9, 6, 2), (3000, 18, 9, 9),
          (1500, 22, 11, 9), (750, 30, 15, 9))
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def build(out_dir: str) -> ctypes.CDLL:
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        sys.exit(f"benchmarks/direct_conv: no C compiler {compiler!r} on PATH (set CC)")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv.c")
    library = os.path.join(out_dir, "libdirectconv.so")
    subprocess.run([compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", library, source],
                   check=True)
    lib = ctypes.CDLL(library)
    lib.conv_ncw.restype = ctypes.c_int
    return lib


def direct(lib, x_ncw: np.ndarray, w_fck: np.ndarray, left: int) -> np.ndarray:
    b, c, t = x_ncw.shape
    f, _, k = w_fck.shape
    y = np.empty((b, f, t), np.float32)
    if lib.conv_ncw(x_ncw.ctypes.data_as(_FLOAT_P), w_fck.ctypes.data_as(_FLOAT_P),
                    y.ctypes.data_as(_FLOAT_P), b, c, t, f, k, left):
        raise MemoryError("conv_ncw could not allocate its scratch row")
    return y


def median_seconds(fn, repeats: int) -> float:
    fn()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return float(np.median(durations))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="eegkd-direct-conv-") as out_dir:
        lib = build(out_dir)
        xla_conv = jax.jit(layers._conv_same)
        for t, c, f, k in SHAPES:
            x = rng.standard_normal((args.batch, t, c), np.float32)
            kernel = rng.standard_normal((k, c, f), np.float32)
            x_ncw = np.ascontiguousarray(x.transpose(0, 2, 1))
            w_fck = np.ascontiguousarray(kernel.transpose(2, 1, 0))
            left = (k - 1) // 2  # "same" padding: the smaller half on the left
            xj, kj = jnp.asarray(x), jnp.asarray(kernel)
            reference = np.asarray(xla_conv(xj, kj))
            ours = direct(lib, x_ncw, w_fck, left).transpose(0, 2, 1)
            error = float(np.abs(ours - reference).max() / np.abs(reference).max())
            if not error < 1e-5:
                raise AssertionError(f"direct conv disagrees with XLA at {(t, c, f, k)}: {error}")
            xla_s = median_seconds(lambda: xla_conv(xj, kj).block_until_ready(), args.repeats)
            direct_s = median_seconds(lambda: direct(lib, x_ncw, w_fck, left), args.repeats)
            flops = 2 * args.batch * t * c * f * k
            print(json.dumps({
                "shape": {"batch": args.batch, "samples": t, "in": c, "out": f, "kernel": k},
                "xla_ms": round(xla_s * 1e3, 2), "direct_ms": round(direct_s * 1e3, 2),
                "xla_gflop_per_s": round(flops / xla_s / 1e9, 1),
                "direct_gflop_per_s": round(flops / direct_s / 1e9, 1),
                "direct_speedup": round(xla_s / direct_s, 2), "max_rel_error": float(f"{error:.1e}"),
                "cpus": len(os.sched_getaffinity(0)), "load_1min": round(os.getloadavg()[0], 2),
            }), flush=True)


if __name__ == "__main__":
    main()
