"""The CPU convolution kernels against XLA's convolution, one U-Sleep layer shape at a time.

    python benchmarks/conv_kernels.py                 # both cores
    taskset -c 0 python benchmarks/conv_kernels.py    # one core

For each shape (batch 32): the forward pass, the input gradient and the weight gradient, each
jitted alone, as the model would compute them with the kernels (``eegkd_jax.kernels.conv1d``)
and without (``layers._conv_same`` with ``EEGKD_CPU_KERNELS=0``: the folded, plain or im2col form
XLA gets for that shape). Median of ``--repeats`` calls after a warm-up; one JSON line per shape
with milliseconds and GFLOP/s counting only the convolution's own multiply-adds
(2 * B * T * C * F * K per pass), and ``forward_elu_sums``: the fused forward of a U-Sleep conv
block (``kernels.conv1d_elu``: conv, bias, ELU and the batch-norm sums) against XLA's form followed
by the same bias, ELU and sums. Checks first that both give the same values (relative 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.run import median_seconds  # noqa: E402
from eegkd_jax import kernels  # noqa: E402
from eegkd_jax.models import layers  # noqa: E402

# (samples, input channels, output channels, kernel): full-size U-Sleep layers, thin and long
# (where the model calls the kernels) and a few shorter, wider ones (where it does not).
SHAPES = ((6000, 3, 6, 9), (6000, 12, 6, 9), (3000, 9, 12, 2), (3000, 18, 9, 9),
          (1500, 22, 11, 9), (750, 30, 15, 9), (375, 40, 28, 9), (94, 77, 55, 9))


def _elu_sums(z):
    """What ``kernels.conv1d_elu`` returns, from XLA: ELU(z) and its per-channel sums of a, a^2."""
    a = layers.elu(z)
    return a, a.sum(axis=(0, 1)), jnp.square(a).sum(axis=(0, 1))


def passes(conv, cotangent):
    """Jitted forward, input gradient and weight gradient of ``conv(x, kernel)``."""
    def loss(x, kernel):
        return jnp.sum(conv(x, kernel) * cotangent)

    return (jax.jit(conv), jax.jit(jax.grad(loss, 0)), jax.jit(jax.grad(loss, 1)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if not kernels.available():
        sys.exit("benchmarks/conv_kernels.py: the CPU kernels are not available here "
                 "(see eegkd_jax/kernels: CPU backend, one device, a C++ compiler)")
    rng = np.random.default_rng(0)
    for t, c, f, k in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, t, c), np.float32))
        kernel = jnp.asarray(rng.standard_normal((k, c, f), np.float32))
        cotangent = jnp.asarray(rng.standard_normal((args.batch, t, f), np.float32))
        left = (k - 1) // 2
        bias = jnp.asarray(rng.standard_normal(f), np.float32)
        ours = passes(lambda x, w: kernels.conv1d(x, w, left), cotangent)
        ours_fused = jax.jit(lambda x, w, b: kernels.conv1d_elu(x, w, b, left))
        os.environ[kernels.ENV_SWITCH] = "0"  # read when _conv_same is traced
        try:
            theirs = passes(layers._conv_same, cotangent)
            reference = [np.asarray(fn(x, kernel)) for fn in theirs]
            theirs_fused = jax.jit(lambda x, w, b: _elu_sums(layers._conv_same(x, w) + b))
            reference_fused = [np.asarray(a) for a in theirs_fused(x, kernel, bias)]
        finally:
            del os.environ[kernels.ENV_SWITCH]
        for want, got in zip(reference_fused, ours_fused(x, kernel, bias)):
            error = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
            if not error < 1e-5:
                raise AssertionError(f"forward_elu_sums at {(t, c, f, k)}: relative error {error}")
        for name, fn, want in zip(("forward", "input_grad", "weight_grad"), ours, reference):
            got = np.asarray(fn(x, kernel))
            error = float(np.abs(got - want).max() / np.abs(want).max())
            if not error < 1e-5:
                raise AssertionError(f"{name} at {(t, c, f, k)}: relative error {error}")
        flops = 2 * args.batch * t * c * f * k
        record = {"shape": {"batch": args.batch, "samples": t, "in": c, "out": f, "kernel": k}}
        for name, mine, xla in zip(("forward", "input_grad", "weight_grad"), ours, theirs):
            xla_ms = median_seconds(xla, x, kernel, steps=args.repeats) * 1e3
            kernel_ms = median_seconds(mine, x, kernel, steps=args.repeats) * 1e3
            record[name] = {"xla_ms": round(xla_ms, 2), "kernel_ms": round(kernel_ms, 2),
                            "xla_gflop_per_s": round(flops / xla_ms / 1e6, 1),
                            "kernel_gflop_per_s": round(flops / kernel_ms / 1e6, 1)}
        xla_ms = median_seconds(theirs_fused, x, kernel, bias, steps=args.repeats) * 1e3
        kernel_ms = median_seconds(ours_fused, x, kernel, bias, steps=args.repeats) * 1e3
        record["forward_elu_sums"] = {"xla_ms": round(xla_ms, 2), "kernel_ms": round(kernel_ms, 2)}
        record.update(cpus=len(os.sched_getaffinity(0)), load_1min=round(os.getloadavg()[0], 2))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
