"""Training-step throughput of our models: compile time and windows per second, as JSON lines.

A step is the library's own ``eegkd_jax.train.steps`` step for the mode, jitted the way training
jits it (``parallel.jit_train_step``): a 1-D ("data",) mesh over every device present, the batch
sharded on it with ``NamedSharding``, parameters and optimiser state replicated, the old state
donated. The optimiser is the original's Adam (lr 1e-3, b1 0.9, b2 0.999, eps 1e-9, weight decay
1e-4 added to the gradient as L2), from ``configs/common.py``. The inputs are standard-normal
(batch, L * 6000, 3) windows with labels in 0..4, made once so that only the step is timed.

Usage (from the repository root):

  python benchmarks/train_step.py --model all                 # batch 32, float32, both models
  python benchmarks/train_step.py --model usleep --dtype bfloat16 --batch 64 --steps 50
  python benchmarks/train_step.py --model all --mode all       # + offline and online KD steps

One JSON line per (model, mode): model, mode, batch, devices, device_kind, dtype, params,
compile_s (lowering + XLA compilation of the step), steps, seconds (the timed steps),
windows_per_s (= batch * L * steps / seconds; a window is one 30-s epoch), median_step_s,
min_step_s, sequence_length, host, cpu, load_1min_before / load_1min_after (the numbers mean little
on a shared machine without them), jax; xla_temp_mb / xla_argument_mb / xla_output_mb / xla_alias_mb
(XLA's buffer assignment for the compiled step: what it will allocate, known before running) and,
on an accelerator, peak_device_mb (the allocator's peak of the process after the timed steps);
gflop_per_step and tflop_per_s (XLA's FLOP count of the traced step, see program_flops, and the rate it implies).

Each mode is one function ``mode(model_cfg, args, mesh) -> (step, init_state, batch)`` registered
in ``MODES`` (``init_state(key) -> TrainState``, see :func:`create_state`); KD modes go beside
``supervised``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eegkd_jax.configs import common  # noqa: E402
from benchmarks import machine  # noqa: E402
from eegkd_jax import models, parallel  # noqa: E402
from eegkd_jax.train import state as state_lib  # noqa: E402
from eegkd_jax.train import steps as steps_lib  # noqa: E402

CHANNELS = 3
SAMPLING_RATE = 200.0
EPOCH_SECONDS = 30.0
NUM_CLASSES = 5


def model_config(name: str, dtype: str):
    cfg = common.MODELS[name]()
    cfg.dtype = dtype
    return cfg


def synthetic_batch(batch: int, sequence_length: int, seed: int,
                    sampling_rate: float = SAMPLING_RATE) -> dict[str, np.ndarray]:
    """Host batch with the pipeline's keys: "scalp", "ear" (batch, L*S, 3), "labels" (batch, L)."""
    rng = np.random.default_rng(seed)
    samples = sequence_length * int(sampling_rate * EPOCH_SECONDS)
    return {
        "scalp": rng.standard_normal((batch, samples, CHANNELS), dtype=np.float32),
        "ear": rng.standard_normal((batch, samples, CHANNELS), dtype=np.float32),
        "labels": rng.integers(0, NUM_CLASSES, (batch, sequence_length), dtype=np.int32),
    }


def supervised(model_cfg, args, mesh):
    """CE on the ear input, as a supervised ear baseline trains (the scalp run costs the same)."""
    rate = getattr(args, "sampling_rate", SAMPLING_RATE)
    module = models.build_model(
        model_cfg, in_channels=CHANNELS, sampling_rate=rate, epoch_seconds=EPOCH_SECONDS
    )
    opt_cfg = common.get_config().optimizer
    tx = state_lib.make_optimizer(opt_cfg, total_steps=args.warmup + args.steps)
    host_batch = synthetic_batch(args.batch, args.sequence_length, args.seed, rate)
    input_shape = (1,) + host_batch["ear"].shape[1:]
    init = functools.partial(models.init_variables, module, input_shape=input_shape)
    step = functools.partial(steps_lib.supervised_step, model=module, tx=tx, input_key="ear")
    return (step, lambda key: state_lib.create_state(key, init, tx),
            parallel.host_batch_to_global(host_batch, mesh))


def _kd_setup(model_cfg, args, mesh, *, trained_teacher: bool):
    """Teacher and student of the same configuration (as the original distils U-Sleep into
    U-Sleep and the transformer into the transformer), one state holding both."""
    rate = getattr(args, "sampling_rate", SAMPLING_RATE)
    module = models.build_model(
        model_cfg, in_channels=CHANNELS, sampling_rate=rate, epoch_seconds=EPOCH_SECONDS
    )
    config = common.get_config()
    tx = state_lib.make_optimizer(config.optimizer, total_steps=args.warmup + args.steps)
    host_batch = synthetic_batch(args.batch, args.sequence_length, args.seed, rate)
    input_shape = (1,) + host_batch["ear"].shape[1:]
    init = functools.partial(models.init_variables, module, input_shape=input_shape)
    def init_state(key):
        return state_lib.create_state(key, init, tx, init_teacher=init,
                                      teacher_tx=tx if trained_teacher else None)

    return module, tx, config.kd, init_state, parallel.host_batch_to_global(host_batch, mesh)


def offline_kd(model_cfg, args, mesh):
    """Frozen teacher forward (eval mode) + student step with CE + feature MSE + T^2 KL."""
    module, tx, kd, init_state, batch = _kd_setup(model_cfg, args, mesh, trained_teacher=False)
    kd.feature_weight, kd.response_weight = 1.0, 1.0  # every term is computed and timed
    step = functools.partial(steps_lib.offline_kd_step, student=module, teacher=module, tx=tx,
                             kd=kd)
    return step, init_state, batch


def online_kd(model_cfg, args, mesh):
    """Teacher and student trained together ("mutual": every cross term is computed)."""
    module, tx, kd, init_state, batch = _kd_setup(model_cfg, args, mesh, trained_teacher=True)
    kd.variant, kd.feature_weight, kd.response_weight = "mutual", 1.0, 1.0
    step = functools.partial(steps_lib.online_kd_step, student=module, teacher=module, tx=tx,
                             teacher_tx=tx, kd=kd)
    return step, init_state, batch


MODES = {"supervised": supervised, "offline_kd": offline_kd, "online_kd": online_kd}


def create_state(init_state, seed: int, mesh):
    """The state, created under jit straight into its replicated sharding as the loop does."""
    return jax.jit(init_state, out_shardings=parallel.replicated_sharding(mesh),
                   compiler_options=state_lib.CREATE_STATE_COMPILER_OPTIONS)(jax.random.key(seed))


def compiled_memory_mb(compiled) -> dict:
    """XLA's buffer sizes for a compiled function, in MB (empty where the backend gives none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {f"xla_{name}_mb": round(getattr(stats, f"{name}_size_in_bytes") / 2**20, 1)
            for name in ("temp", "argument", "output", "alias")}


def program_flops(lowered) -> float | None:
    """XLA's count of floating-point operations in one call of a lowered program (None if the
    backend gives none).

    Counted on the program as traced, before the backend's optimisations: a GPU's compiled
    program hands its convolutions and many matmuls to cuDNN / cuBLAS as custom calls that its
    cost analysis does not count (U-Sleep's step: 2.0 of 13 GFLOP at batch 32 on an H200), so the
    compiled count is not comparable across backends, while this one is (the CPU's compiled count
    agrees with it within 1 - 2%)."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # some backends raise instead of returning nothing
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_device_memory_mb() -> dict:
    """{"peak_device_mb": ...} from the first device's allocator; {} on CPU (no such statistic).

    The allocator's peak over the whole process so far (JAX cannot reset it): in a run of several
    records it is the largest step measured yet, not this one's; xla_*_mb are this program's."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"peak_device_mb": round(stats["peak_bytes_in_use"] / 2**20, 1)}


def compiled_step(model_name: str, mode: str, args):
    """(compiled step, fresh state, batch, seconds to lower and compile, FLOPs per call) for
    ``mode`` of ``model_name``."""
    mesh = parallel.make_mesh()
    parallel.check_global_batch_size(args.batch, mesh)
    step, init_state, batch = MODES[mode](model_config(model_name, args.dtype), args, mesh)
    state = create_state(init_state, args.seed, mesh)
    jitted = parallel.jit_train_step(step, mesh)
    start = time.perf_counter()
    lowered = jitted.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return compiled, state, batch, compile_s, program_flops(lowered)


def measure(model_name: str, mode: str, args) -> dict:
    """Compiles and times ``args.steps`` steps of ``mode`` for ``model_name``; returns a record."""
    load_before = machine.load_average()
    compiled, state, batch, compile_s, flops = compiled_step(model_name, mode, args)
    params = models.count_params(state.params)
    memory = compiled_memory_mb(compiled)

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    durations = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        durations.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{model_name}/{mode}: non-finite loss {loss}")
    seconds = float(sum(durations))
    return {
        "model": model_name,
        "mode": mode,
        "framework": "jax",
        "batch": args.batch,
        "sequence_length": args.sequence_length,
        "devices": jax.device_count(),  # make_mesh's mesh spans every device
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "dtype": args.dtype,
        "params": params,
        "compile_s": round(compile_s, 3),
        "steps": args.steps,
        "seconds": round(seconds, 4),
        "windows_per_s": round(args.batch * args.sequence_length * args.steps / seconds, 3),
        "median_step_s": round(statistics.median(durations), 4),
        "min_step_s": round(min(durations), 4),
        "last_loss": round(loss, 5),
        # XLA's FLOP count of the traced step (program_flops; per device on a mesh); over the
        # median step time, the arithmetic rate one device sustains.
        **({"gflop_per_step": round(flops / 1e9, 2),
            "tflop_per_s": round(flops / statistics.median(durations) / 1e12, 3)}
           if flops else {}),
        "host": socket.gethostname(),
        "cpu": machine.cpu_name(),
        "load_1min_before": load_before,
        "load_1min_after": machine.load_average(),
        "jax": jax.__version__,
        **memory,
        **peak_device_memory_mb(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("usleep", "cmt", "all"), default="all")
    parser.add_argument("--mode", choices=tuple(MODES) + ("all",), default="supervised")
    parser.add_argument("--batch", type=int, default=32, help="global batch (windows)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--sequence-length", type=int, default=1,
                        help="epochs per example (U-Sleep only; the transformer takes 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.sequence_length < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --sequence-length >= 1")
    names = ("usleep", "cmt") if args.model == "all" else (args.model,)
    if args.sequence_length != 1 and "cmt" in names:
        parser.error("the cross-modal transformer classifies one epoch: use --sequence-length 1")
    modes = tuple(MODES) if args.mode == "all" else (args.mode,)
    for name in names:
        for mode in modes:
            print(json.dumps(measure(name, mode, args)), flush=True)


if __name__ == "__main__":
    main()
