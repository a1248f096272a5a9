"""Every performance figure of eegkd-jax in one command, as JSON lines on stdout.

    python benchmarks/run.py            # the full set (tens of minutes on a 2-core CPU)
    python benchmarks/run.py --quick    # a short pass over the same kinds of record
    python benchmarks/run.py --torch    # + the PyTorch reference step, alternating with ours

Each line has a "kind":

* ``matmul_peak`` and ``copy_peak`` (accelerators only): the device's measured float32 and
  bfloat16 matrix-product rates and its memory bandwidth, the ceilings that a train step's
  ``tflop_per_s`` is read against.
* ``train_step``: ``benchmarks/train_step.measure`` for U-Sleep and the transformer in every mode
  (supervised, offline KD, online KD) at batch 32, then at the largest batch that fits
  ("batch_role": "largest"); the fields are train_step's (windows_per_s, compile_s, XLA buffer
  sizes, XLA's FLOP count and the rate it implies, peak_device_mb on an accelerator, load
  averages) plus how the batch was chosen.
* ``torch_step`` (with --torch): the reference step of ``benchmarks/torch_reference``, run in its
  own venv right after our supervised step for the same model, so both see the same load.
* ``online_kd_cost``: a supervised and an online-KD step of the same network compiled in one
  process and run alternately (so both see the same load), with their median step times and the
  online-KD step's ratio to two supervised steps (a teacher step plus a student step).
* ``first_step``: seconds from launching a fresh Python process to the end of its first training
  step (imports, state initialisation, the step's compilation, one step, as in
  ``train_and_evaluate``), once with an empty
  persistent compilation cache ("cold") and once reading it ("warm"); for the default online-KD
  config's U-Sleep (depth 8) and for the full-size U-Sleep. ``process_wall_s`` is the same
  process timed to its exit.
* ``night_inference``: seconds to score one whole night (default 7.5 h = 900 epochs) in eval mode:
  U-Sleep over the whole night in one call, the transformer epoch by epoch in batches.
* ``pipeline``: ``benchmarks/pipeline.main`` (cohort build time and its peak memory, training
  windows per second delivered by tf.data).
* ``end_to_end``: ``benchmarks/end_to_end.main`` for U-Sleep at batch 32, supervised and online
  KD: windows per second through the real loop and data path (device-resident and streamed; on a
  machine without TensorFlow, the loop's TF-free resident path) beside ``step_only_windows_per_s``.
* ``summary``: peak host memory of this process and of its children, device, load.

"The largest batch that fits" is searched with XLA's own buffer assignment rather than by running
into out-of-memory errors: the batch-32 step's temporary and argument buffers give a per-window
and a fixed cost, the largest power of two under the budget is compiled and checked, halving while
it does not fit. The budget is the device's memory limit on an accelerator and, on a CPU, half of
the memory available when the run starts (the machine is shared; ``--memory-budget-gb`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PROCESS_START = time.perf_counter()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks import machine, train_step  # noqa: E402
from eegkd_jax.configs import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference step's interpreter: the separate torch venv by default (--torch-python overrides,
# e.g. a machine's own python3 that already holds PyTorch).
TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
MODELS = ("usleep", "cmt")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def step_args(batch: int, steps: int, warmup: int, dtype: str) -> types.SimpleNamespace:
    """The namespace ``train_step.measure`` reads."""
    return types.SimpleNamespace(batch=batch, steps=steps, warmup=warmup, dtype=dtype,
                                 sequence_length=1, seed=0)


def memory_budget_bytes(override_gb: float | None) -> tuple[int, str]:
    """(bytes, what bounded it): the device limit on an accelerator, else half the free host RAM."""
    if override_gb:
        return int(override_gb * 2**30), "--memory-budget-gb"
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] * 0.9), "90% of the device memory limit"
    return int(psutil.virtual_memory().available * 0.5), "half of the host memory available"


def step_bytes(record: dict) -> int:
    """Bytes one compiled step holds at once: XLA's temporaries + arguments + non-aliased outputs."""
    mb = (record.get("xla_temp_mb", 0) + record.get("xla_argument_mb", 0)
          + record.get("xla_output_mb", 0) - record.get("xla_alias_mb", 0))
    return int(mb * 2**20)


def largest_batch(model: str, mode: str, base: dict, budget: int, args) -> dict | None:
    """Measures the step at the largest power-of-two batch above 32 whose buffers fit ``budget``.

    The per-window cost comes from the batch-32 record: temporaries and the batch input grow with
    the batch; parameters and optimiser state (the rest of the arguments) do not.
    """
    devices = base["devices"]
    input_mb_per_window = 2 * 6000 * 3 * 4 / 2**20  # scalp + ear float32
    per_window = (base.get("xla_temp_mb", 0) / base["batch"] + input_mb_per_window) * 2**20
    fixed = max(step_bytes(base) - per_window * base["batch"], 0)
    if per_window <= 0:
        return None
    batch = base["batch"]
    while batch * 2 <= args.max_batch and fixed + per_window * batch * 2 <= budget:
        batch *= 2
    while batch > base["batch"]:
        if batch % devices == 0:
            record = train_step.measure(model, mode, step_args(batch, args.steps, args.warmup,
                                                               args.dtype))
            if step_bytes(record) <= budget:
                record["predicted_mb"] = round((fixed + per_window * batch) / 2**20, 1)
                return record
        batch //= 2
    return None


def torch_step(model: str, batch: int, steps: int, warmup: int,
               python: str = TORCH_PYTHON) -> dict | None:
    """One run of the PyTorch reference step in its venv; None (with a note) if it is not there.

    On the same kind of device as ours: the first GPU when JAX runs on one, else the CPU."""
    found = shutil.which(python)  # a path, or a bare name looked up on PATH
    if found is None:
        emit({"kind": "note", "problem": f"{python} not found; skipping the torch step"})
        return None
    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    out = subprocess.run(
        [found, "-m", "benchmarks.torch_reference.train_step", "--model", model,
         "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
         "--device", device],
        cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        emit({"kind": "note", "problem": f"the torch step failed (exit {out.returncode})",
              "stderr_tail": out.stderr[-2000:]})
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(fn, *args, steps: int) -> float:
    """Median wall time of ``fn(*args)`` over ``steps`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        durations.append(time.perf_counter() - start)
    return float(np.median(durations))


def device_ceilings(steps: int = 20, n: int = 8192) -> list[dict]:
    """The device's measured ceilings, which an accelerator's train-step rate (train_step's
    ``tflop_per_s``) is read against rather than a datasheet: an n^3 matrix product in float32
    (JAX's default precision, which on a recent NVIDIA GPU lets XLA use TF32 tensor cores) and in
    bfloat16 ("matmul_peak"), and ``x + 1`` over 2 GiB of float32, bytes read plus written
    ("copy_peak"); each the median of ``steps`` calls after a warm-up, on random data."""
    import jax.numpy as jnp

    device_kind = jax.devices()[0].device_kind
    records = []
    product = jax.jit(jnp.matmul)
    for dtype in ("float32", "bfloat16"):
        a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
        seconds = median_seconds(product, a, b, steps=steps)
        records.append({"kind": "matmul_peak", "dtype": dtype, "n": n,
                        "tflop_per_s": round(2 * n**3 / seconds / 1e12, 1),
                        "device_kind": device_kind})
    x = jax.random.normal(jax.random.key(1), (2**29,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda v: v + 1), x, steps=steps)
    records.append({"kind": "copy_peak", "gib": 2, "device_kind": device_kind,
                    "tb_per_s": round(2 * x.nbytes / seconds / 1e12, 2)})
    return records


def online_kd_cost(model: str, steps: int, dtype: str) -> dict:
    """Online KD against teacher step + student step: the two programs alternate step by step."""
    args = step_args(32, 1, 0, dtype)
    programs = {mode: list(train_step.compiled_step(model, mode, args)[:3])
                for mode in ("supervised", "online_kd")}
    times = {mode: [] for mode in programs}
    for i in range(steps + 1):  # the first round warms up
        for mode in (("supervised", "online_kd") if i % 2 else ("online_kd", "supervised")):
            compiled, state, batch = programs[mode]
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            programs[mode][1] = state
            if i:
                times[mode].append(time.perf_counter() - start)
    supervised, online = (float(np.median(times[m])) for m in ("supervised", "online_kd"))
    return {"kind": "online_kd_cost", "model": model, "batch": 32, "dtype": dtype,
            "steps": steps, "supervised_median_s": round(supervised, 4),
            "online_kd_median_s": round(online, 4),
            "online_kd_over_two_supervised": round(online / (2 * supervised), 3),
            "load_1min": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------------------
# Time to the first step, in a fresh process.


def first_step_child(config_name: str, batch: int) -> None:
    """Runs in the child process: cache on, state, compile, one online-KD step; prints phases."""
    from eegkd_jax import compilation_cache, models, parallel

    cache = compilation_cache.enable()
    imported = time.perf_counter()
    args = step_args(batch, 1, 0, "float32")
    if config_name == "online_kd":  # the default run's networks, rate, sequences and batch
        from eegkd_jax.configs import online_kd
        config = online_kd.get_config()
        model_cfg = config.model
        args.batch, args.sequence_length = config.batch_size, config.data.sequence_length
        args.sampling_rate = config.data.sampling_rate
    else:
        model_cfg = common.MODELS["usleep"]()
    mesh = parallel.make_mesh()
    step, init_state, host_batch = train_step.MODES["online_kd"](model_cfg, args, mesh)
    # As train_and_evaluate does: the state created under jit, then the step compiled and run.
    state = train_step.create_state(init_state, 0, mesh)
    jax.block_until_ready(state)
    initialised = time.perf_counter()
    compiled = parallel.jit_train_step(step, mesh).lower(state, host_batch).compile()
    compiled_at = time.perf_counter()
    state, metrics = compiled(state, host_batch)
    jax.block_until_ready((state, metrics))
    done = time.perf_counter()
    launched = float(os.environ.get(LAUNCHED_ENV, "nan"))
    print(json.dumps({
        "seconds_to_first_step": round(time.time() - launched, 2),
        "import_s": round(imported - _PROCESS_START, 2),
        "init_s": round(initialised - imported, 2),
        "compile_s": round(compiled_at - initialised, 2),
        "step_s": round(done - compiled_at, 2),
        "params": models.count_params(state.params),
        "batch": args.batch, "sequence_length": args.sequence_length,
        "sampling_rate": getattr(args, "sampling_rate", train_step.SAMPLING_RATE),
        "cache_dir": str(cache) if cache else None,
    }), flush=True)


LAUNCHED_ENV = "EEGKD_BENCHMARK_LAUNCHED"  # the parent's time.time() when it starts the child


def first_step(config_name: str, batch: int, cache_dir: str, state: str) -> dict:
    """Launches the child and times it from launch to the end of its first step (the child reads
    the clock then; "process_wall_s" adds the interpreter's exit, 0.3 - 0.5 s on the 2-core CPU
    with JAX's threads and compiled programs to tear down)."""
    env = dict(os.environ, EEGKD_COMPILATION_CACHE=cache_dir)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    start = time.perf_counter()
    env[LAUNCHED_ENV] = repr(time.time())
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--first-step-child", config_name,
         "--batch", str(batch)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    record = json.loads(out.stdout.strip().splitlines()[-1])
    return {"kind": "first_step", "config": config_name, "mode": "online_kd", "cache": state,
            "batch": batch, **record, "process_wall_s": round(wall, 2),
            "load_1min": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------------------
# Whole-night inference.


def night_inference(model: str, hours: float, batch: int) -> dict:
    """Eval-mode scoring of one night of random input: (seconds, compile seconds, epochs/s)."""
    from eegkd_jax import models

    epochs = int(round(hours * 120))
    module = models.build_model(common.MODELS[model](), in_channels=3)
    if model == "usleep":
        # The whole night in one call, as U-Sleep is meant to be applied (and predict does).
        shape = (1, epochs * 6000, 3)
    else:
        shape = (batch, 6000, 3)
    variables = jax.jit(lambda key: models.init_variables(module, key, (1,) + shape[1:]))(
        jax.random.key(0))
    forward = jax.jit(lambda v, x: module.apply(v, x, train=False)[0])
    rng = np.random.default_rng(0)
    night = rng.standard_normal((epochs * 6000, 3), dtype=np.float32)
    start = time.perf_counter()
    compiled = forward.lower(variables, jax.ShapeDtypeStruct(shape, np.float32)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    if model == "usleep":
        logits = np.asarray(compiled(variables, night[None]))[0]
    else:
        windows = night.reshape(epochs, 6000, 3)
        padded = -(-epochs // batch) * batch
        windows = np.concatenate([windows, np.zeros((padded - epochs, 6000, 3), np.float32)])
        logits = np.concatenate([np.asarray(compiled(variables, windows[i:i + batch]))[:, 0]
                                 for i in range(0, padded, batch)])[:epochs]
    seconds = time.perf_counter() - start
    assert logits.shape == (epochs, 5), logits.shape
    return {"kind": "night_inference", "model": model, "hours": hours, "epochs": epochs,
            "batch": shape[0], "compile_s": round(compile_s, 2), "seconds": round(seconds, 2),
            "epochs_per_s": round(epochs / seconds, 1),
            **train_step.compiled_memory_mb(compiled), **train_step.peak_device_memory_mb(),
            "load_1min": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 32 only, 3 timed steps, a 1-h night, a small cohort")
    parser.add_argument("--torch", action="store_true",
                        help="also time the PyTorch reference step, alternating with ours")
    parser.add_argument("--torch-python", default=TORCH_PYTHON,
                        help="interpreter with PyTorch for --torch (default: .venv-torch)")
    parser.add_argument("--models", default="usleep,cmt")
    parser.add_argument("--modes", default=",".join(train_step.MODES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--memory-budget-gb", type=float, default=None)
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: ceilings (accelerators "
                             "only),train_step,largest,online_kd_cost,first_step,"
                             "night_inference,pipeline,end_to_end")
    parser.add_argument("--first-step-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_step_child:
        first_step_child(args.first_step_child, args.batch)
        return
    args.steps = args.steps or (3 if args.quick else 10)
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        skip.add("largest")
    names = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}")
    for mode in modes:
        if mode not in train_step.MODES:
            parser.error(f"unknown mode {mode!r}")
    budget, bounded_by = memory_budget_bytes(args.memory_budget_gb)
    if jax.devices()[0].platform != "cpu" and "ceilings" not in skip:
        for record in device_ceilings():
            emit(record)

    if "train_step" not in skip:
        for name in names:
            for mode in modes:
                record = train_step.measure(name, mode, step_args(32, args.steps, args.warmup,
                                                                  args.dtype))
                emit({"kind": "train_step", "batch_role": "32", **record})
                if args.torch and mode == "supervised":
                    theirs = torch_step(name, 32, args.steps, args.warmup, args.torch_python)
                    if theirs:
                        emit({"kind": "torch_step", **theirs})
                    # A shared CPU drifts: time ours again right after theirs.
                    if theirs and record["platform"] == "cpu":
                        again = train_step.measure(name, mode, step_args(
                            32, args.steps, args.warmup, args.dtype))
                        emit({"kind": "train_step", "batch_role": "32 (after torch)", **again})
                if "largest" not in skip:
                    big = largest_batch(name, mode, record, budget, args)
                    if big is None:
                        emit({"kind": "note", "model": name, "mode": mode,
                              "problem": "no batch above 32 fits the budget",
                              "budget_mb": round(budget / 2**20)})
                    else:
                        emit({"kind": "train_step", "batch_role": "largest",
                              "budget_mb": round(budget / 2**20), "bounded_by": bounded_by,
                              **big})

    if "online_kd_cost" not in skip:
        for name in names:
            emit(online_kd_cost(name, max(args.steps, 10), args.dtype))

    if "first_step" not in skip:
        configs = ("online_kd",) if args.quick else ("online_kd", "usleep_full")
        for config_name in configs:
            with tempfile.TemporaryDirectory(prefix="eegkd-xla-cache-") as cache_dir:
                for state in ("cold", "warm"):
                    emit(first_step(config_name, 32, cache_dir, state))

    if "night_inference" not in skip:
        hours = 1.0 if args.quick else 7.5
        for name in names:
            emit(night_inference(name, hours, batch=64))

    if "pipeline" not in skip:
        from benchmarks import pipeline as pipeline_bench
        argv = ["--subjects", "3", "--hours", "1", "--steps", "50", "--warmup", "5"] \
            if args.quick else []
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            result = pipeline_bench.main(argv)
        emit({"kind": "pipeline", **result})

    if "end_to_end" not in skip:
        import importlib.util

        from benchmarks import end_to_end
        path = "loop" if importlib.util.find_spec("tensorflow") else "resident"
        for mode in ("supervised", "online_kd"):
            end_to_end.main(["--path", path, "--model", "usleep", "--mode", mode, "--batch", "32",
                             "--steps", "20" if args.quick else "210", "--steps-per-call", "1"])

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit({"kind": "summary", "peak_host_rss_mb": round(usage, 1),
          "peak_child_rss_mb": round(children, 1), **train_step.peak_device_memory_mb(),
          "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "host": socket.gethostname(), "cpu": machine.cpu_name(), "cpu_count": os.cpu_count(),
          "memory_budget_mb": round(budget / 2**20), "memory_bounded_by": bounded_by,
          "load_1min": round(os.getloadavg()[0], 2), "jax": jax.__version__,
          "wall_s": round(time.perf_counter() - _PROCESS_START, 1)})


if __name__ == "__main__":
    main()
