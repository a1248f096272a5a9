"""Training data held on the devices: stored once, each step's batch gathered there.

The cohorts of this field are small (EESM17: 9 nights, ~7,400 scored epochs, 0.5 GB as 16-bit
with 6 channels), so when the training subjects fit ``data.device_budget_gb`` per device, the loop
loads their epochs once and every step only sends a few integers (where each window starts).

Layout. The training windows (``pipeline.training_windows``: subject order, then start epoch) are
cut into the ``sampler``'s D contiguous blocks, one per device along the ``data`` mesh axis.
Device d stores only the epochs its windows cover: for each subject in its block the run of epochs
from its first window's start to its last window's end, followed by ``L - 1`` zero epochs labelled
-1, so a window that runs past the end of a night reads padding exactly as the streamed path pads
it. The blocks are padded to the same number of epochs and stacked: signals ``(D, E, S, C)`` in
``data.resident_dtype``, labels ``(D, E)`` int32, sharded on ``data``. With several hosts each host
reads only the blocks of its own devices.

Batches. Device d draws its ``B / D`` rows of every global batch from its own block, by the
``sampler``'s rule: the same batches as the streamed path on any number of devices, and resume
stays exact. The pass's order is sent to the devices once per pass; each step computes its rows
from its own step number inside the compiled step and gathers them there, so a step sends nothing
to the devices.

Precision. Signals are robust-scaled and clipped (``preprocess``: IQR units, +-``clip_iqr``), so
float16 keeps every value to 2^-11 relative (``quantization_error``, checked on every load); a
cohort whose float16 copy would be off by more than ``MAX_RELATIVE_ERROR`` (unscaled volts, which
float16 cannot represent, say) is kept as float32 with a warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from eegkd_jax import parallel
from eegkd_jax.data.recording import UNSCORED
from eegkd_jax.data.sampler import Sampler

if TYPE_CHECKING:
    from eegkd_jax.data.pipeline import Cohort

MAX_RELATIVE_ERROR = 1e-3  # largest relative float16 rounding error accepted (float16: 2^-11)
DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which epochs each device stores and where its windows start (no signal is read).

    Attributes:
      subjects: the training subjects (order of ``pipeline.training_windows``).
      sequence_length: L. num_shards: D.
      segments: per shard, ``(subject index, first epoch, end epoch, offset)`` runs: epochs
        [first, end) of that night stored from local epoch ``offset`` on, then L - 1 pad epochs.
      starts: per shard, (n_d,) int32 local epoch of each of its windows' first epoch.
      epochs: E, local epochs per shard (the largest shard's, padding included).
    """

    subjects: tuple[str, ...]
    sequence_length: int
    num_shards: int
    segments: tuple[tuple[tuple[int, int, int, int], ...], ...]
    starts: tuple[np.ndarray, ...]
    epochs: int

    @property
    def windows(self) -> int:
        return sum(s.shape[0] for s in self.starts)


def make_plan(cohort: Cohort, subjects: Sequence[str], data_cfg, sampler: Sampler) -> Plan:
    """Which epochs each of the sampler's blocks needs on its device (see the module doc)."""
    from eegkd_jax.data import pipeline  # looked up when called: the loop's tests replace it

    subjects = tuple(subjects)
    seq_len = int(data_cfg.sequence_length)
    windows = pipeline.training_windows(cohort, subjects, data_cfg)
    segments, starts = [], []
    for block in (windows[rows] for rows in sampler.blocks):
        runs, local, offset = [], [], 0
        for subj in np.unique(block[:, 0]):
            first_starts = block[block[:, 0] == subj, 1]
            first = int(first_starts.min())
            end = min(int(first_starts.max()) + seq_len, cohort.num_epochs[subjects[subj]])
            runs.append((int(subj), first, end, offset))
            local.append(first_starts - first + offset)
            offset += end - first + seq_len - 1
        segments.append(tuple(runs))
        starts.append(np.concatenate(local).astype(np.int32))
    epochs = max(r[-1][3] + r[-1][2] - r[-1][1] + seq_len - 1 for r in segments)
    return Plan(subjects, seq_len, sampler.num_shards, tuple(segments), tuple(starts), epochs)


def nbytes_per_device(plan: Plan, cohort: Cohort, keys: Sequence[str], dtype: str) -> int:
    """Bytes one device holds for ``keys`` ("scalp" and / or "ear") and the labels."""
    channels = sum(len(cohort.scalp_names if k == "scalp" else cohort.ear_names) for k in keys)
    return plan.epochs * (cohort.epoch_samples * channels * np.dtype(dtype).itemsize + 4)


def quantization_error(x: np.ndarray, dtype: str) -> float:
    """Largest relative rounding error of storing x as ``dtype``: max |x - dtype(x)| / |x| over
    the values (those below 1e-3 of the RMS count as that), so float16 gives at most 2^-11 for
    signals in its normal range and much more for signals near its underflow (volts); inf when a
    value overflows; 0 for float32."""
    if dtype == "float32" or x.size == 0:
        return 0.0
    with np.errstate(over="ignore"):
        rounded = x.astype(dtype).astype(np.float32)
    if not np.all(np.isfinite(rounded)):
        return float("inf")
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    floor = max(1e-3 * rms, float(np.finfo(np.float32).tiny))
    return float(np.max(np.abs(rounded - x) / np.maximum(np.abs(x), floor)))


class ResidentData:
    """The training subjects' epochs on the devices, and the batch indices of any step.

    Args:
      cohort, subjects, data_cfg: as for ``pipeline.train_batches``.
      keys: the signals the mode trains on ("scalp", "ear" or both).
      mesh: the ``data`` mesh; one block per device along it.
      sampler: ``Sampler`` of the training windows, one shard per device along ``data``.
      plan: ``make_plan(cohort, subjects, data_cfg, sampler)`` if already made.
    """

    def __init__(self, cohort: Cohort, subjects: Sequence[str], data_cfg, *,
                 keys: Sequence[str], mesh, sampler: Sampler, plan: Plan | None = None):
        self.sampler = sampler
        self.plan = plan or make_plan(cohort, subjects, data_cfg, sampler)
        self.keys = tuple(keys)
        self.per_pass = sampler.per_pass
        self.arrays, self.dtype, self.error = _place(cohort, self.plan, self.keys, data_cfg, mesh)
        self._sharding = parallel.batch_sharding(mesh)  # one block per device along ``data``
        self._order_pass, self._order = None, None

    def pass_order(self, pass_index: int) -> np.ndarray:
        """(D, largest n_d) int32: each shard's window starts in the order of pass ``pass_index``
        (zero-padded past n_d)."""
        width = max(s.shape[0] for s in self.plan.starts)
        order = np.zeros((self.plan.num_shards, width), np.int32)
        for d, (starts, block) in enumerate(zip(self.plan.starts, self.sampler.blocks)):
            order[d, :starts.shape[0]] = starts[self.sampler.order(pass_index, d) - block[0]]
        return order

    def device_data(self, step: int) -> dict:
        """What ``gather`` reads for any step of the pass that holds ``step``: the resident arrays
        and that pass's order (sent once per pass, sharded like the arrays)."""
        pass_index = int(step) // self.per_pass
        if self._order_pass != pass_index:
            order = self.pass_order(pass_index)
            self._order = jax.make_array_from_callback(order.shape, self._sharding,
                                                       lambda index: order[index])
            self._order_pass = pass_index
        return {**self.arrays, "order": self._order}

    def gather(self, data: dict, step: jax.Array) -> dict[str, jax.Array]:
        """The training batch of ``step`` (as ``pipeline.train_batches`` yields it, float32) from
        ``device_data(step)``; traced inside the train step, so a step sends nothing."""
        seq_len = self.plan.sequence_length
        position = self.sampler.positions(step, jnp)
        counts = np.array([s.shape[0] for s in self.plan.starts], np.int32)[:, None]
        # modulo: a pass shorter than one batch repeats windows, as the streamed path does
        starts = jnp.take_along_axis(data["order"], position[None, :] % counts, axis=1)
        epochs = starts[..., None] + jnp.arange(seq_len, dtype=starts.dtype)  # (D, b, L)
        take = jax.vmap(lambda block, where: block[where])  # per device: its own block only
        batch = {"labels": take(data["labels"], epochs).reshape(-1, seq_len)}
        for key in self.keys:
            x = take(data[key], epochs)  # (D, b, L, S, C)
            d, b, _, s, c = x.shape
            batch[key] = x.reshape(d * b, seq_len * s, c).astype(jnp.float32)
        return batch


def _place(cohort, plan: Plan, keys, data_cfg, mesh):
    """Reads this host's blocks and places them on its devices; returns (arrays, dtype, error)."""
    dtype = str(data_cfg.get("resident_dtype", "float16"))
    if dtype not in DTYPES:
        raise ValueError(f"data.resident_dtype must be one of {DTYPES}, got {dtype!r}")
    sharding = parallel.batch_sharding(mesh)
    names = {"scalp": cohort.scalp_names, "ear": cohort.ear_names}
    s = cohort.epoch_samples
    loaded: dict[int, dict[str, np.ndarray]] = {}

    def block(d: int) -> dict[str, np.ndarray]:
        if d not in loaded:
            out = {k: np.zeros((plan.epochs, s, len(names[k])), np.float32) for k in keys}
            out["labels"] = np.full((plan.epochs,), UNSCORED, np.int32)
            for subj, first, end, offset in plan.segments[d]:
                scalp, ear, labels = cohort.read_epochs(plan.subjects[subj], range(first, end))
                read = {"scalp": scalp, "ear": ear}
                for k in keys:
                    out[k][offset:offset + end - first] = read[k]
                out["labels"][offset:offset + end - first] = labels
            loaded[d] = out
        return loaded[d]

    local = [i for i, dev in enumerate(mesh.devices.flat) if dev.process_index == jax.process_index()]
    error = max(quantization_error(block(d)[k], dtype) for d in local for k in keys)
    if jax.process_count() > 1:  # each host measured its own blocks; all must choose alike
        from jax.experimental import multihost_utils

        error = float(np.max(multihost_utils.process_allgather(np.float32(error))))
    if error > MAX_RELATIVE_ERROR:
        logging.warning("data.resident_dtype=%s would change training signal values by up to %.2g "
                        "of their size; keeping them as float32", dtype, error)
        dtype, error = "float32", 0.0
    arrays = {}
    for k in (*keys, "labels"):
        shape = (plan.num_shards, *block(local[0])[k].shape)
        kind = np.int32 if k == "labels" else dtype
        arrays[k] = jax.make_array_from_callback(
            shape, sharding, lambda index, k=k, kind=kind: _rows(block, index, k, kind, plan.num_shards))
    loaded.clear()
    return arrays, dtype, error


def _rows(block, index, key, kind, num_shards: int) -> np.ndarray:
    picked = [block(i)[key] for i in range(*index[0].indices(num_shards))]
    return np.stack(picked).astype(kind)[(slice(None), *index[1:])]
