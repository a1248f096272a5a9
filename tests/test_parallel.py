"""Data parallelism: the same global batch gives the same loss and parameters on 1 and on 8 devices;
host batches become correctly sharded global arrays; bad batch sizes and settings fail clearly."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from eegkd_jax import parallel
from eegkd_jax.train import steps
from test_steps import TinyNet, make_state, tiny_batch, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _run(mesh, config, n_steps=2):
    """Fresh state, ``n_steps`` steps on this mesh; returns (losses, params on host)."""
    student, teacher = TinyNet(), TinyNet()
    kd = config.mode != "supervised"
    state, tx = make_state(config, student, teacher if kd else None,
                           teacher_trained=config.mode == "online_kd")
    state = parallel.replicate(state, mesh)
    step = parallel.jit_train_step(
        steps.build_train_step(config, student=student, tx=tx, teacher=teacher if kd else None,
                               teacher_tx=tx if config.mode == "online_kd" else None), mesh)
    seen = []
    for i in range(n_steps):
        host = {k: np.asarray(v) for k, v in tiny_batch(i, batch=8).items()}
        state, metrics = step(state, parallel.host_batch_to_global(host, mesh))
        seen.append(float(metrics["loss"]))
    return seen, jax.device_get(state.params), jax.device_get(state.batch_stats)


@pytest.mark.parametrize("mode", ["supervised", "online_kd"])
def test_one_device_and_eight_devices_agree(mode):
    assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
    config = tiny_config(mode, feature_weight=1.0, response_weight=0.5)
    one = _run(parallel.make_mesh(jax.devices()[:1]), config)
    eight = _run(parallel.make_mesh(), config)
    np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
    # Batch-norm statistics are computed over the global batch on both meshes, so these agree too.
    for a, b in zip(jax.tree.leaves(one[1:]), jax.tree.leaves(eight[1:])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_host_batch_to_global_shards_the_batch_axis():
    mesh = parallel.make_mesh()
    host = {k: np.asarray(v) for k, v in tiny_batch(0, batch=16).items()}
    global_batch = parallel.host_batch_to_global(host, mesh)
    for key, value in global_batch.items():
        assert value.shape == host[key].shape
        assert value.sharding.spec == PartitionSpec(parallel.DATA_AXIS)
        assert len(value.addressable_shards) == 8
        assert value.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(value), host[key])


def test_batch_size_must_divide_over_devices():
    mesh = parallel.make_mesh()
    assert parallel.check_global_batch_size(16, mesh) == 16
    with pytest.raises(ValueError, match="multiple of 8"):
        parallel.check_global_batch_size(12, mesh)
    with pytest.raises(ValueError, match="multiple"):
        parallel.check_global_batch_size(0, mesh)


def test_distributed_start_up_decisions(monkeypatch):
    from eegkd_jax.configs import common

    dist = common.get_config().distributed
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    dist.initialize = "auto"
    assert parallel.maybe_initialize_distributed(dist) is False  # single machine: nothing to do
    dist.initialize = "no"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.maybe_initialize_distributed(dist) is False
    dist.initialize = "auto"
    assert parallel.maybe_initialize_distributed(dist) is True and calls[-1] == {}
    dist.initialize = "yes"
    dist.coordinator_address, dist.num_processes, dist.process_id = "127.0.0.1:1234", 2, 1
    assert parallel.maybe_initialize_distributed(dist) is True
    assert calls[-1] == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                         "process_id": 1}
    dist.initialize = "sometimes"
    with pytest.raises(ValueError, match="auto, yes or no"):
        parallel.maybe_initialize_distributed(dist)
