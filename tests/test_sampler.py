"""The batch rule every data path uses: training order by (seed, step, shard), the pass length,
host shares, evaluation order with padding."""

import numpy as np
import pytest

from eegkd_jax.data.sampler import Sampler, host_shards


def test_one_shard_is_a_global_permutation_per_pass():
    sampler = Sampler(50, 8, seed=3)
    assert sampler.per_pass == 50 // 8
    for step in range(2 * sampler.per_pass):
        order = np.random.default_rng([3, step // sampler.per_pass]).permutation(50)
        first = (step % sampler.per_pass) * 8
        rows, valid = sampler.rows(step, 0)
        np.testing.assert_array_equal(rows, order[first:first + 8])
        assert valid.all()
    first_pass = np.concatenate([sampler.rows(k, 0)[0] for k in range(sampler.per_pass)])
    assert len(set(first_pass)) == first_pass.size  # no window twice within a pass


@pytest.mark.parametrize("num_windows,batch,shards", [(50, 8, 4), (37, 8, 8), (9, 16, 8)])
def test_each_shard_draws_from_its_own_block(num_windows, batch, shards):
    sampler = Sampler(num_windows, batch, shards, seed=0)
    blocks = np.array_split(np.arange(num_windows), shards)
    # the pass length is the smallest block's, and equals the whole table's N // B (at least 1)
    assert sampler.per_pass == max(1, num_windows // batch)
    for step in range(sampler.per_pass + 1):
        for d in range(shards):
            rows, _ = sampler.rows(step, d)
            assert rows.shape == (batch // shards,) and set(rows) <= set(blocks[d])
            order = np.random.default_rng([0, step // sampler.per_pass, d]).permutation(
                blocks[d].size)
            at = (step % sampler.per_pass) * (batch // shards) + np.arange(batch // shards)
            np.testing.assert_array_equal(rows, blocks[d][order[at % blocks[d].size]])


def test_host_shares_put_together_are_the_global_batch():
    sampler = Sampler(40, 8, 4, seed=1)
    for step in (0, 5, 17):
        whole, _ = sampler.host_rows(step)
        for hosts in (2, 4):
            parts = [sampler.host_rows(step, p, hosts)[0] for p in range(hosts)]
            np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert list(host_shards(8, 1, 2)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="do not divide across 3 processes"):
        host_shards(4, 0, 3)
    with pytest.raises(ValueError, match="process_index 2"):
        host_shards(4, 2, 2)


def test_evaluation_reads_every_window_once_in_order_then_pads():
    sampler = Sampler(11, 4, 2)
    assert sampler.num_batches == 3
    rows, valid = zip(*(sampler.host_rows(k) for k in range(3)))
    rows, valid = np.concatenate(rows), np.concatenate(valid)
    np.testing.assert_array_equal(rows[valid], np.arange(11))
    assert valid.sum() == 11 and not valid[11:].any() and (rows < 11).all()


def test_the_same_rule_on_a_traced_step():
    jnp = pytest.importorskip("jax.numpy")
    sampler = Sampler(30, 6, 3, seed=2)
    for step in (0, 4, 9):
        np.testing.assert_array_equal(np.asarray(sampler.positions(jnp.int32(step), jnp)),
                                      sampler.positions(step))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        Sampler(10, 6, 4)
    with pytest.raises(ValueError, match="cannot be shared by 8 devices"):
        Sampler(5, 8, 8, seed=0)
    with pytest.raises(ValueError, match="no windows"):
        Sampler(0, 8)
