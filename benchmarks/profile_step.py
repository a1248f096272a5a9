"""Where a step's time goes: wall time per call against the device's busy time, and the top kernels.

    python benchmarks/profile_step.py                       # U-Sleep, batch 32: eval forward,
                                                            # supervised and offline-KD steps
    python benchmarks/profile_step.py --model cmt --batch 512 --programs supervised,online_kd

For each program: the median wall time of ``--steps`` calls (after a warm-up), then a
``jax.profiler`` trace of 3 calls read back with JAX's own trace reader, from which it prints the
time per call of every timeline (a GPU's streams, the host's threads) and the ``--top`` events by
time per call. On a GPU only the device's timelines are ranked: when the stream's busy time is well
under the wall time, the step is bound by launching kernels, not by running them. On a CPU the
XLA thunks are ranked (set ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` to see each one).

Prints JSON lines: one ``{"kind": "wall", ...}`` with every program's median milliseconds, then one
``{"kind": "profile", ...}`` per program.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train_step  # noqa: E402
from benchmarks.run import step_args  # noqa: E402
from eegkd_jax import models, parallel  # noqa: E402

PROGRAMS = ("eval", "supervised", "offline_kd", "online_kd")


def build(model: str, program: str, batch: int):
    """(compiled, args, donates_state) for one program at ``batch``."""
    if program == "eval":
        module = models.build_model(train_step.model_config(model, "float32"), in_channels=3)
        variables = jax.jit(lambda key: models.init_variables(module, key, (1, 6000, 3)))(
            jax.random.key(0))
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 6000, 3), np.float32))
        forward = jax.jit(lambda v, x: module.apply(v, x, train=False)[0])
        return forward.lower(variables, x).compile(), (variables, x), False
    compiled, state, host_batch, _, _ = train_step.compiled_step(
        model, program, step_args(batch, 1, 0, "float32"))
    return compiled, (state, host_batch), True


def trace_summary(path: str, calls: int, top: int) -> dict:
    from jax._src.lib import _profile_data  # JAX's reader of its own xplane traces

    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    data = _profile_data.ProfileData.from_file(files[0])
    planes = list(data.planes)
    on_device = any(p.name.startswith("/device:") for p in planes)
    timelines, events, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in planes:
        ranked = plane.name.startswith("/device:") if on_device else True
        for line in plane.lines:
            for event in line.events:
                ms = event.duration_ns / 1e6 / calls
                timelines[f"{plane.name} | {line.name}"] += ms
                # Python frames and the executor's waits are nested around the work: not ranked.
                if ranked and line.name not in ("python", "python3") and "Execute" not in event.name:
                    events[event.name] += ms
                    counts[event.name] += 1 / calls
    return {
        "timelines_ms_per_call": {k: round(v, 3) for k, v in timelines.most_common(8)},
        "top_events": [{"name": name[:120], "ms_per_call": round(ms, 3),
                        "count_per_call": round(counts[name], 1)}
                       for name, ms in events.most_common(top)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("usleep", "cmt"), default="usleep")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--programs", default="eval,supervised,offline_kd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    names = [p for p in args.programs.split(",") if p]
    for name in names:
        if name not in PROGRAMS:
            parser.error(f"unknown program {name!r}; choose from {', '.join(PROGRAMS)}")

    programs = {name: list(build(args.model, name, args.batch)) for name in names}

    def call(name):
        compiled, call_args, donates = programs[name]
        out = compiled(*call_args)
        jax.block_until_ready(out)
        if donates:  # the train step donated its state: carry the new one
            programs[name][1] = (out[0], call_args[1])

    wall = {}
    for name in names:
        for _ in range(3):
            call(name)
        durations = []
        for _ in range(args.steps):
            start = time.perf_counter()
            call(name)
            durations.append(time.perf_counter() - start)
        wall[name] = round(statistics.median(durations) * 1e3, 3)
    print(json.dumps({"kind": "wall", "model": args.model, "batch": args.batch,
                      "median_ms": wall, "device_kind": jax.devices()[0].device_kind,
                      "jax": jax.__version__}), flush=True)

    calls = 3
    for name in names:
        with tempfile.TemporaryDirectory(prefix="eegkd-profile-") as path:
            with jax.profiler.trace(path):
                for _ in range(calls):
                    call(name)
            summary = trace_summary(path, calls, args.top)
        print(json.dumps({"kind": "profile", "program": name, "model": args.model,
                          "batch": args.batch, "wall_ms": wall[name], **summary}), flush=True)


if __name__ == "__main__":
    main()
