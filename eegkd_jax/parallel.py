"""Data parallelism: one 1-D ``("data",)`` mesh over every device of every host.

Parameters and optimiser state are replicated; the global batch is split along its first axis over
``data``. The same code runs on 1 CPU, 8 fake CPU devices, one GPU host or several hosts: each host
feeds its own share of the batch and ``jax.make_array_from_process_local_data`` stitches the shares
into one global array. Under ``jax.jit`` with these shardings XLA inserts the gradient all-reduce
(and the cross-device batch-norm statistics) itself, which is what ``pmap`` + ``pmean`` used to do.
"""

from __future__ import annotations

from absl import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# Environment variables by which common launchers announce a multi-process job.
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _env_says_multiprocess() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in _MULTIPROCESS_ENV[1:]:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def maybe_initialize_distributed(dist_cfg: Any) -> bool:
    """Calls ``jax.distributed.initialize`` when the config (or, for "auto", the environment) asks.

    Must run before any other JAX call. ``dist_cfg`` is ``config.distributed``: ``initialize`` in
    {"auto", "yes", "no"}; ``coordinator_address`` / ``num_processes`` / ``process_id`` are passed on
    when set (empty / 0 / -1 mean "let JAX detect them from the cluster environment").

    Returns:
      True if the distributed runtime was initialised by this call.
    """
    mode = str(dist_cfg.initialize).lower()
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize must be auto, yes or no, got {mode!r}")
    if mode == "no":
        return False
    if mode == "auto" and not (dist_cfg.coordinator_address or _env_says_multiprocess()):
        return False
    if jax.distributed.is_initialized():
        return False
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = int(dist_cfg.num_processes)
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = int(dist_cfg.process_id)
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Raises unless the global batch splits evenly over devices and processes; returns the per-host
    batch size."""
    n_dev = mesh.devices.size
    n_proc = len({d.process_index for d in mesh.devices.flat})
    if global_batch_size <= 0 or global_batch_size % n_dev:
        raise ValueError(
            f"the global batch size {global_batch_size} must be a positive multiple of the number "
            f"of devices ({n_dev}); set --config.batch_size to a multiple of {n_dev}"
        )
    return global_batch_size // n_proc


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's share of a batch (dict of (b, ...) numpy arrays) -> global arrays sharded on
    ``data`` with leading size ``b * process_count``."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


def host_batches_to_global(batches: Sequence[Mapping[str, np.ndarray]], mesh: Mesh
                           ) -> dict[str, jax.Array]:
    """k of this host's batch shares -> global arrays (k, B, ...) sharded on ``data`` along B: the
    inputs of :func:`jit_train_steps` on the streamed path."""
    sharding = NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))
    n_proc = len({d.process_index for d in mesh.devices.flat})
    out = {}
    for key in batches[0]:
        local = np.stack([np.asarray(b[key]) for b in batches])
        shape = (local.shape[0], local.shape[1] * n_proc, *local.shape[2:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of (host or device) arrays fully replicated on the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def jit_train_step(step_fn, mesh: Mesh, *, donate: bool = True):
    """``jax.jit`` of ``step(state, batch) -> (state, metrics)`` for this mesh: state replicated in
    and out, batch sharded on ``data``, metrics replicated; the old state's buffers are donated so
    the update happens in place."""
    rep = replicated_sharding(mesh)
    return jax.jit(step_fn, donate_argnums=0 if donate else (),
                   in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep))


def jit_train_steps(step_fn, mesh: Mesh, *, gather=None, donate: bool = True):
    """``jax.jit`` of ``run(state, data, inputs) -> (state, metrics)``: ``step_fn`` applied once per
    leading entry of ``inputs``, k steps in one call, metrics summed over them.

    ``inputs`` are either the batches themselves, stacked (k, B, ...) and split over ``data``
    along B (:func:`host_batches_to_global`; ``data`` is None), or, with
    ``gather(data, step number) -> batch``, the (k,) step numbers, replicated, next to the
    device-resident ``data`` (sharded on ``data`` along its first axis; see data/resident.py).
    State and metrics are replicated and the old state's buffers donated, as in
    :func:`jit_train_step`.

    The k steps are written out one after another, not as a ``lax.scan``: XLA ran a loop of the
    step several times slower on the CPU, and on an H200 no scan of the step finished its first
    call within the time measured (benchmarks/README.md).
    """
    rep = replicated_sharding(mesh)

    def run(state, data, inputs):
        sums = None
        for i in range(jax.tree.leaves(inputs)[0].shape[0]):
            x = jax.tree.map(lambda a: a[i], inputs)
            state, metrics = step_fn(state, x if gather is None else gather(data, x))
            sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
        return state, sums

    inputs_sharding = (NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)) if gather is None
                       else rep)
    return jax.jit(run, donate_argnums=0 if donate else (),
                   in_shardings=(rep, batch_sharding(mesh), inputs_sharding),
                   out_shardings=(rep, rep))
