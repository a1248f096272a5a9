"""What a user gets: training windows per second with the data path and the loop, beside the step
alone, as JSON lines with ``kind: "end_to_end"``.

    python benchmarks/end_to_end.py                              # CPU: the real loop, both paths
    python benchmarks/end_to_end.py --path loop --model usleep --mode online_kd --batch 32 \\
        --steps-per-call 1,8 --data device,streamed --steps 60

Two ways of running the training, both on simulated nights at 200 Hz with the full-size networks
(the ``:paper`` models, single 30-s epochs), the same step functions as ``benchmarks/train_step``:

* ``--path loop``: ``train.loop.train_and_evaluate`` itself, everything a run does: TFDS shards,
  the device-resident data or tf.data, k steps per call, metrics logged every 10 steps, a
  checkpoint every 200 steps (once a pass over EESM17 at batch 32), the guards.
  ``windows_per_s`` is read from the timestamps of its logged train records: from the first
  (compilation done) to the last, so with ``--steps 210`` one checkpoint and every metric sync
  are inside it and the compile and the final evaluation are not.
* ``--path resident``: the loop's hot path without TensorFlow (the GPU machines we are lent have
  no TensorFlow, for TFDS and CLU, and its wheel is over what a lease carries): nights simulated
  and preprocessed in memory, ``data.resident.ResidentData``, ``parallel.jit_train_steps`` with k
  steps per call, the metrics brought to the host every 10 steps as the loop does; no
  checkpoint, no TensorBoard writer.

Each record carries ``step_only_windows_per_s``: ``benchmarks/train_step.measure`` for the same
model, mode, batch and device (a synthetic batch already on the device, one step per call, synced
after each), and ``ratio`` = windows_per_s / step_only_windows_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine, train_step  # noqa: E402

LOG_EVERY = 10
CHECKPOINT_EVERY = 200


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _data_config(subjects: int, hours: float):
    from eegkd_jax.configs import common

    d = common.data_config()
    d.simulated.subjects = subjects
    d.simulated.hours = hours
    d.sequence_length = 1
    d.sampling_rate = train_step.SAMPLING_RATE
    return d


def loop_config(model: str, mode: str, batch: int, steps: int, steps_per_call: int, data: str,
                cache_dir: str, hours: float):
    """The mode's ``:paper`` config on a small simulated cohort, sized for a throughput run."""
    from eegkd_jax.configs import online_kd, supervised

    config = (online_kd.get_config("paper") if mode == "online_kd"
              else supervised.get_config("ear,paper"))
    if mode == "online_kd":
        config.kd.variant = "mutual"  # as train_step's online-KD step: every cross term
        config.kd.response_weight = 1.0
    config.model = train_step.model_config(model, "float32")
    config.teacher = train_step.model_config(model, "float32")
    config.data.simulated.subjects = 4  # 2 train, 1 validation, 1 test
    config.data.simulated.hours = hours
    config.data.sequence_length = 1
    config.data.sampling_rate = train_step.SAMPLING_RATE
    config.data.cache_dir = cache_dir
    config.data.device_resident = "yes" if data == "device" else "no"
    config.batch_size = batch
    config.num_epochs = 10_000
    config.max_steps = steps
    config.steps_per_call = steps_per_call
    config.log_every_steps = LOG_EVERY
    config.eval_every_steps = steps
    # As often as a run on EESM17 checkpoints (once a pass: 7 training nights of ~900 epochs are
    # ~200 steps at batch 32), so the timed stretch holds one checkpoint when steps > 200.
    config.checkpoint_every_steps = CHECKPOINT_EVERY
    return config


def run_loop(model, mode, batch, steps, steps_per_call, data, cache_dir, hours) -> dict:
    from eegkd_jax.train import loop

    config = loop_config(model, mode, batch, steps, steps_per_call, data, cache_dir, hours)
    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            train = [r for r in map(json.loads, f) if r["split"] == "train"]
    first, last = train[0], train[-1]
    return {"windows_per_s": round(batch * (last["step"] - first["step"])
                                   / (last["time"] - first["time"]), 3),
            "timed_steps": last["step"] - first["step"]}


class NightsCohort:
    """Simulated, preprocessed nights in memory, with the cohort interface ResidentData reads."""

    def __init__(self, data_cfg):
        from eegkd_jax.data import preprocess, sources

        nights = [preprocess.prepare_night(sources.load_recording(data_cfg, s), data_cfg)
                  for s in sources.list_subjects(data_cfg)]
        self.data_cfg = data_cfg
        self.nights = {n.subject: n for n in nights}
        self.subjects = tuple(sorted(self.nights))
        self.num_epochs = {s: int(n.labels.shape[0]) for s, n in self.nights.items()}
        self.labels = {s: n.labels for s, n in self.nights.items()}
        self.scalp_names, self.ear_names = nights[0].scalp_names, nights[0].ear_names
        self.epoch_samples = nights[0].epoch_samples

    def read_epochs(self, subject, epochs):
        night, s = self.nights[subject], self.epoch_samples
        epochs = list(epochs)
        return (np.stack([night.scalp[e * s:(e + 1) * s] for e in epochs]),
                np.stack([night.ear[e * s:(e + 1) * s] for e in epochs]),
                night.labels[epochs].astype(np.int32))


def run_resident(model, mode, batch, steps, steps_per_call, cohort) -> dict:
    from eegkd_jax import parallel
    from eegkd_jax.data import pipeline, resident
    from eegkd_jax.data.sampler import Sampler

    mesh = parallel.make_mesh()
    args = types.SimpleNamespace(batch=batch, steps=steps, warmup=0, dtype="float32",
                                 sequence_length=1, seed=0)
    step, init_state, _ = train_step.MODES[mode](train_step.model_config(model, "float32"),
                                                 args, mesh)
    keys = ("ear",) if mode == "supervised" else ("scalp", "ear")
    subjects = cohort.subjects[:-1]
    windows = pipeline.training_windows(cohort, subjects, cohort.data_cfg)
    data = resident.ResidentData(cohort, subjects, cohort.data_cfg, keys=keys, mesh=mesh,
                                 sampler=Sampler(len(windows), batch, mesh.devices.size, seed=0))
    run = parallel.jit_train_steps(step, mesh, gather=data.gather)
    add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))
    replicated = parallel.replicated_sharding(mesh)
    state = train_step.create_state(init_state, 0, mesh)
    # compile and warm up on one log stretch, then time the rest as the loop runs it

    def stretch(state, first):
        sums = None
        for k in range(first, first + LOG_EVERY, steps_per_call):
            # as the loop: calls do not cross a pass (per_pass is a multiple of k here)
            steps = jax.device_put(np.arange(k, k + steps_per_call, dtype=np.int32), replicated)
            state, metrics = run(state, data.device_data(k), steps)
            sums = metrics if sums is None else add(sums, metrics)
        values = jax.device_get(sums)  # the loop's sync at a log step
        if not np.isfinite(float(values["loss"])):
            raise FloatingPointError(f"{model}/{mode}: non-finite loss")
        return state

    first = time.perf_counter()
    state = stretch(state, 0)
    first = time.perf_counter() - first
    done = LOG_EVERY
    start = time.perf_counter()
    while done < steps:
        state = stretch(state, done)
        done += LOG_EVERY
    seconds = time.perf_counter() - start
    return {"windows_per_s": round(batch * (done - LOG_EVERY) / seconds, 3),
            "timed_steps": done - LOG_EVERY, "first_stretch_s": round(first, 2),
            "resident_dtype": data.dtype,
            "resident_mb_per_device": round(resident.nbytes_per_device(
                data.plan, cohort, keys, data.dtype) / 2**20, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="loop", choices=("loop", "resident"))
    parser.add_argument("--model", default="usleep", choices=("usleep", "cmt"))
    parser.add_argument("--mode", default="supervised",
                        choices=("supervised", "offline_kd", "online_kd"),
                        help="offline_kd: --path resident only (the loop needs a trained teacher)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="a multiple of 10")
    parser.add_argument("--steps-per-call", default="1,10", help="comma-separated k values")
    parser.add_argument("--data", default="device,streamed",
                        help="loop path only: device, streamed or both")
    parser.add_argument("--step-only-steps", type=int, default=20)
    parser.add_argument("--hours", type=float, default=1.0, help="length of each simulated night")
    args = parser.parse_args(argv)
    if args.steps % LOG_EVERY or args.steps < 2 * LOG_EVERY:
        parser.error(f"--steps must be a multiple of {LOG_EVERY}, at least {2 * LOG_EVERY}")
    if args.path == "loop" and args.mode == "offline_kd":
        parser.error("--mode offline_kd needs --path resident")
    ks = [int(k) for k in args.steps_per_call.split(",")]
    if any(LOG_EVERY % k for k in ks):
        parser.error(f"each --steps-per-call must divide {LOG_EVERY}")

    step_args = types.SimpleNamespace(batch=args.batch, steps=args.step_only_steps, warmup=3,
                                      dtype="float32", sequence_length=1, seed=0)
    measured = train_step.measure(args.model, args.mode, step_args)
    step_only = measured["windows_per_s"]
    common = {"kind": "end_to_end", "path": args.path, "model": args.model, "mode": args.mode,
              "batch": args.batch, "steps": args.steps, "devices": jax.device_count(),
              "device_kind": jax.devices()[0].device_kind, "cpu": machine.cpu_name(),
              "step_only_windows_per_s": step_only, "step_only_compile_s": measured["compile_s"],
              "command": "python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv)}
    if args.path == "resident":
        cohort = NightsCohort(_data_config(3, args.hours))
        runs = [("device", k) for k in ks]
    else:
        cache = tempfile.mkdtemp(prefix="eegkd-e2e-")
        runs = [(d, k) for d in args.data.split(",") for k in ks]
    for data, k in runs:
        load = machine.load_average()
        if args.path == "resident":
            result = run_resident(args.model, args.mode, args.batch, args.steps, k, cohort)
        else:
            result = run_loop(args.model, args.mode, args.batch, args.steps, k, data, cache,
                              args.hours)
        emit({**common, "data": data, "steps_per_call": k, **result,
              "ratio": round(result["windows_per_s"] / step_only, 3),
              "load_1min_before": load, "load_1min_after": machine.load_average()})


if __name__ == "__main__":
    main()
