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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback_match_one_process(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    workers = [
        subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path / f"{i}.json")],
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
    results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert results[0]["process_count"] == 2 and results[0]["device_count"] == 4
    assert results[0] == results[1] | {"process_index": 0}

    single_losses, single_params = _train(0, 1)  # this process: 8 devices, the whole batch
    np.testing.assert_allclose(results[0]["losses"], single_losses, rtol=1e-5)
    np.testing.assert_allclose(results[0]["params"], single_params, rtol=1e-4)


if __name__ == "__main__":
    port, process_id, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    losses, params = _train(jax.process_index(), jax.process_count())
    pathlib.Path(out).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "losses": losses, "params": params}))
    jax.distributed.shutdown()
