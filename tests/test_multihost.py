"""Two JAX processes on loopback (CPU collectives over gloo) train a few steps as one data-parallel
job; the result must match one process running the same global batches.

Each worker has 2 CPU devices, so the global mesh has 4; each feeds its half of every global batch.
The worker is this file run as a script.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
GLOBAL_BATCH = 8
STEPS = 3


def _train(process_index: int, process_count: int):
    """Runs STEPS online-KD steps; returns (losses, sum of |params| per leaf) as seen by this host."""
    import jax

    from eegkd_jax import parallel
    from eegkd_jax.train import steps
    from test_steps import TinyNet, make_state, tiny_batch, tiny_config

    config = tiny_config("online_kd", feature_weight=1.0, response_weight=0.5)
    student, teacher = TinyNet(), TinyNet()
    mesh = parallel.make_mesh()
    per_host = parallel.check_global_batch_size(GLOBAL_BATCH, mesh)
    state, tx = make_state(config, student, teacher, teacher_trained=True)
    rep = parallel.replicated_sharding(mesh)
    # Every host holds the same initial values; build the replicated global arrays from them.
    state = jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, rep, lambda idx: np.asarray(x)[idx]), state)
    step = parallel.jit_train_step(
        steps.build_train_step(config, student=student, tx=tx, teacher=teacher, teacher_tx=tx), mesh)
    seen = []
    for i in range(STEPS):
        full = {k: np.asarray(v) for k, v in tiny_batch(i, batch=GLOBAL_BATCH).items()}
        mine = {k: v[process_index * per_host:(process_index + 1) * per_host]
                for k, v in full.items()}
        state, metrics = step(state, parallel.host_batch_to_global(mine, mesh))
        seen.append(float(metrics["loss"]))
    # Replicated outputs: each host can read its own copy.
    params = jax.tree.map(lambda a: float(np.abs(np.asarray(a.addressable_data(0))).sum()),
                          (state.params, state.teacher_params))
    return seen, jax.tree.leaves(params)


class CountingCohort:
    """Four nights whose samples say where they come from (subject * 1000 + epoch); records which
    epochs were read."""

    def __init__(self):
        self.subjects = ("s1", "s2", "s3", "s4")
        self.num_epochs = {s: 20 + 3 * i for i, s in enumerate(self.subjects)}
        self.labels = {s: np.arange(n, dtype=np.int8) % 5 for s, n in self.num_epochs.items()}
        self.scalp_names = self.ear_names = ("a", "b")
        self.epoch_samples = 4
        self.read = []

    def read_epochs(self, subject, epochs):
        epochs = list(epochs)
        self.read += [(subject, e) for e in epochs]
        i = self.subjects.index(subject)
        x = np.broadcast_to(np.array(epochs, np.float32)[:, None, None] + 1000 * i,
                            (len(epochs), 4, 2)).copy()
        return x, x + 0.5, self.labels[subject][epochs].astype(np.int32)


def _resident(devices=None):
    """Places CountingCohort on the devices (all, or the given ones) and gathers batches 0..3;
    returns the epochs this host read and, per batch, the local rows' first scalp sample."""
    import jax

    from eegkd_jax import parallel
    from eegkd_jax.configs.common import data_config
    from eegkd_jax.data import pipeline, resident
    from eegkd_jax.data.sampler import Sampler

    cohort, cfg = CountingCohort(), data_config()
    cfg.sequence_length = 2
    mesh = parallel.make_mesh(devices)
    windows = pipeline.training_windows(cohort, cohort.subjects, cfg)
    data = resident.ResidentData(cohort, cohort.subjects, cfg, keys=("scalp",), mesh=mesh,
                                 sampler=Sampler(len(windows), GLOBAL_BATCH, mesh.devices.size, 1))
    gather = jax.jit(data.gather)
    rows = []
    for step in range(4):
        batch = gather(data.device_data(step), np.int32(step))
        rows.append({str(s.index[0].start or 0): np.asarray(s.data)[:, 0, 0].tolist()
                     for s in batch["scalp"].addressable_shards})
    return sorted(set(cohort.read)), rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path, what: str) -> list[dict]:
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    workers = [
        subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path / f"{i}.json"),
                          what],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        logs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log[-3000:]
    return [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]


def test_two_processes_on_loopback_match_one_process(tmp_path):
    results = _run_workers(tmp_path, "train")
    assert results[0]["process_count"] == 2 and results[0]["device_count"] == 4
    assert results[0] == results[1] | {"process_index": 0}

    single_losses, single_params = _train(0, 1)  # this process: 8 devices, the whole batch
    np.testing.assert_allclose(results[0]["losses"], single_losses, rtol=1e-5)
    np.testing.assert_allclose(results[0]["params"], single_params, rtol=1e-4)


def test_two_hosts_each_load_only_their_share_of_the_resident_data(tmp_path):
    import jax

    results = _run_workers(tmp_path, "resident")
    read_alone, rows_alone = _resident(jax.devices()[:4])  # one process, the same 4-device mesh
    read = [set(map(tuple, r["read"])) for r in results]
    # Each host reads its share; they overlap only where a window crosses the boundary between
    # their blocks (L - 1 = 1 epoch), and together they are what one host alone reads.
    assert read[0] and read[1] and len(read[0] & read[1]) <= 1
    assert read[0] | read[1] == set(read_alone)
    for step, want in enumerate(rows_alone):  # and every device's rows are the same
        assert {**results[0]["rows"][step], **results[1]["rows"][step]} == want


if __name__ == "__main__":
    port, process_id, out, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    if what == "resident":
        read, rows = _resident()
        pathlib.Path(out).write_text(json.dumps({"read": read, "rows": rows}))
    else:
        losses, params = _train(jax.process_index(), jax.process_count())
        pathlib.Path(out).write_text(json.dumps({
            "process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "losses": losses, "params": params}))
    jax.distributed.shutdown()
