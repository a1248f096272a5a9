"""Which windows form each batch: the one rule of every data path.

The streamed path (``pipeline.train_batches``), the device-resident path (``resident``),
evaluation (``pipeline.eval_batches``) and predict all ask a ``Sampler`` which rows of their window
table make up the share of batch ``step`` that shard ``shard`` (one device along the ``data`` mesh
axis) holds; they differ only in where the signals come from.

Training (``seed`` given): the windows are cut into D contiguous blocks, one per shard. Pass p of
shard d orders its block by ``numpy.random.default_rng([seed, p, d]).permutation`` (``[seed, p]``
with one shard), and step k takes positions ``(k % per_pass) * b ... + b`` of pass
``k // per_pass``, b = B / D, ``per_pass`` = the smallest block's ``n_d // b`` (at least 1; a pass
shorter than a batch repeats windows). The last partial batch of a pass is dropped and the next
pass reshuffles, so nothing is dropped for good. A batch is a function of (seed, step, shard)
alone: a run resumed at step k sees exactly what an uninterrupted one sees.

Evaluation (``seed`` None): every window once, in order; step k's shard d takes positions
``k * B + d * b ... + b``; positions past the end are padding (``valid`` False).
"""

from __future__ import annotations

import functools
import math

import numpy as np


class Sampler:
    """Args:
      num_windows: N, rows of the caller's window table.
      global_batch_size: B, a multiple of ``num_shards``.
      num_shards: D, the devices along the ``data`` axis (or 1).
      seed: the run's seed for training order; None for evaluation order.
    """

    def __init__(self, num_windows: int, global_batch_size: int, num_shards: int = 1,
                 seed: int | None = None):
        if num_windows < 1:
            raise ValueError("no windows to sample from")
        if global_batch_size < 1 or num_shards < 1 or global_batch_size % num_shards:
            raise ValueError(f"the global batch size {global_batch_size} must be a positive "
                             f"multiple of the number of devices ({num_shards})")
        if seed is not None and num_windows < num_shards:
            raise ValueError(f"{num_windows} training windows cannot be shared by {num_shards} "
                             "devices; train on more subjects")
        self.num_windows, self.num_shards = num_windows, num_shards
        self.batch_size = global_batch_size
        self.seed = None if seed is None else int(seed)
        self.per_shard = global_batch_size // num_shards
        self.blocks = np.array_split(np.arange(num_windows), num_shards)
        smallest = min(block.size for block in self.blocks)
        self.per_pass = max(1, smallest // self.per_shard)
        self.num_batches = math.ceil(num_windows / global_batch_size)  # evaluation: one pass

    def order(self, pass_index: int, shard: int) -> np.ndarray:
        """Shard ``shard``'s block in the order of training pass ``pass_index`` (window indices)."""
        return self.blocks[shard][_permutation(self.seed, int(pass_index), shard,
                                               self.num_shards, self.blocks[shard].size)]

    def positions(self, step, xp=np):
        """Positions within its pass's order of every shard's rows of training batch ``step``:
        (b,), the same for every shard. ``xp=jax.numpy`` computes them from a traced step."""
        return (step % self.per_pass) * self.per_shard + xp.arange(self.per_shard)

    def rows(self, step: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(window indices (b,), valid (b,) bool) of shard ``shard``'s share of batch ``step``."""
        if self.seed is None:
            at = step * self.batch_size + shard * self.per_shard + np.arange(self.per_shard)
            valid = at < self.num_windows
            return np.minimum(at, self.num_windows - 1), valid
        order = self.order(step // self.per_pass, shard)
        return order[self.positions(step) % order.size], np.ones(self.per_shard, bool)

    def host_rows(self, step: int, process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the shards one host feeds (its devices: a contiguous run of shards),
        concatenated in shard order."""
        shards = host_shards(self.num_shards, process_index, process_count)
        rows, valid = zip(*(self.rows(step, d) for d in shards))
        return np.concatenate(rows), np.concatenate(valid)


def host_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards host ``process_index`` of ``process_count`` feeds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
    if num_shards % process_count:
        raise ValueError(f"{num_shards} devices do not divide across {process_count} processes")
    per_host = num_shards // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, pass_index: int, shard: int, num_shards: int, n: int) -> np.ndarray:
    key = [seed, pass_index] + ([shard] if num_shards > 1 else [])
    return np.random.default_rng(key).permutation(n)
