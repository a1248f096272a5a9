"""Seconds per train step with k steps per compiled call, as JSON lines.

    python benchmarks/steps_per_call.py                        # depth-8 U-Sleep, batch 8, k = 1, 4
    python benchmarks/steps_per_call.py --depth 12 --batch 32 --k 1,4,10 --form scan

The supervised step of ``benchmarks/train_step`` (200 Hz single epochs, a synthetic batch on the
device), jitted alone (``parallel.jit_train_step``) and as ``parallel.jit_train_steps`` over k
copies of the batch; ``--form scan`` times a rolled ``lax.scan`` of the same step instead, the form
``jit_train_steps`` does not use. One record per form and k: first_call_s (compile + first call),
step_s (median over ``--repeats`` calls, divided by k).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import machine, train_step  # noqa: E402
from eegkd_jax import parallel  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", default="1,4")
    parser.add_argument("--form", default="straight", choices=("straight", "scan"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    mesh = parallel.make_mesh()
    cfg = train_step.model_config("usleep", "float32")
    cfg.depth = args.depth
    step_args = types.SimpleNamespace(batch=args.batch, steps=10, warmup=0, dtype="float32",
                                      sequence_length=1, seed=0)
    step, init_state, batch = train_step.MODES["supervised"](cfg, step_args, mesh)
    runs = [("alone", 1, parallel.jit_train_step(step, mesh), batch)]
    many = parallel.jit_train_steps(step, mesh)
    scan = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs), donate_argnums=0)
    for k in (int(x) for x in args.k.split(",")):
        stacked = jax.tree.map(lambda a, k=k: jnp.repeat(a[None], k, 0), batch)
        if args.form == "scan":
            runs.append(("scan", k, scan, stacked))
        else:
            runs.append(("straight", k, lambda s, x, many=many: many(s, None, x), stacked))
    for form, k, fn, inputs in runs:
        load = machine.load_average()
        state = train_step.create_state(init_state, 0, mesh)
        start = time.perf_counter()
        state, metrics = fn(state, inputs)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = fn(state, inputs)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / k)
        print(json.dumps({
            "kind": "steps_per_call", "form": form, "steps_per_call": k, "depth": args.depth,
            "batch": args.batch, "first_call_s": round(first, 2),
            "step_s": round(statistics.median(times), 4),
            "device_kind": jax.devices()[0].device_kind, "cpu": machine.cpu_name(),
            "load_1min_before": load, "load_1min_after": machine.load_average(),
            "command": "python benchmarks/steps_per_call.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}), flush=True)


if __name__ == "__main__":
    main()
