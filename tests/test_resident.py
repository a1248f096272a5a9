"""Device-resident training data: the same batches as the streamed path (one rule, the sampler's)
on one device and on 8, the documented per-device order, sharded storage, float16 precision."""

import itertools

import jax
import numpy as np
import pytest

from eegkd_jax import parallel
from eegkd_jax.data import pipeline, resident
from eegkd_jax.data.recording import UNSCORED
from eegkd_jax.data.sampler import Sampler

TRAIN = ("sim-01", "sim-02", "sim-03")


@pytest.fixture(scope="module")
def cfg3(cfg):
    """conftest's 4 nights of 12 epochs, in 3-epoch windows."""
    c = cfg.copy_and_resolve_references()
    c.sequence_length = 3
    return c


def on_devices(cohort, cfg, keys, mesh, global_batch_size, seed) -> resident.ResidentData:
    windows = pipeline.training_windows(cohort, TRAIN, cfg)
    sampler = Sampler(len(windows), global_batch_size, mesh.devices.size, seed)
    return resident.ResidentData(cohort, TRAIN, cfg, keys=keys, mesh=mesh, sampler=sampler)


def gathered(data: resident.ResidentData, first: int, count: int) -> list[dict]:
    """Batches first.. as the train step sees them, one per step, as numpy."""
    gather = jax.jit(data.gather)
    return [jax.device_get(gather(data.device_data(step), np.int32(step)))
            for step in range(first, first + count)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_device_gives_the_streamed_batches(cohort, cfg3, dtype):
    c = cfg3.copy_and_resolve_references()
    c.resident_dtype = dtype
    mesh = parallel.make_mesh(jax.devices()[:1])
    data = on_devices(cohort, c, ("scalp", "ear"), mesh, 4, 3)
    per_pass = Sampler(pipeline.training_windows(cohort, TRAIN, c).shape[0], 4).per_pass
    assert data.per_pass == per_pass
    count = per_pass + 2  # across a pass boundary
    streamed = list(itertools.islice(
        pipeline.train_batches(cohort, TRAIN, c, global_batch_size=4, seed=3), count))
    for got, want in zip(gathered(data, 0, count), streamed, strict=True):
        np.testing.assert_array_equal(got["labels"], want["labels"])
        for key in ("scalp", "ear"):
            assert got[key].dtype == np.float32
            if dtype == "float32":
                np.testing.assert_array_equal(got[key], want[key])
            else:  # float16 storage: rounding only
                np.testing.assert_allclose(got[key], want[key], rtol=2**-11, atol=1e-6)
    # resuming at any step gives the same batch
    np.testing.assert_array_equal(gathered(data, per_pass + 1, 1)[0]["scalp"],
                                  gathered(data, 0, count)[per_pass + 1]["scalp"])


def test_eight_devices_each_draw_from_their_own_block(cohort, cfg3):
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    data = on_devices(cohort, cfg3, ("ear",), mesh, 16, 0)
    windows = pipeline.training_windows(cohort, TRAIN, cfg3)
    blocks = np.array_split(windows, 8)
    # storage is sharded: each device holds one block (D, E, S, C) -> (1, E, S, C)
    ear = data.arrays["ear"]
    assert ear.dtype == np.float16 and "scalp" not in data.arrays
    assert {s.data.shape[0] for s in ear.addressable_shards} == {1}
    assert len(ear.addressable_shards) == 8
    # every window of every block appears once per pass, read from the right night and epochs
    seen = [[] for _ in range(8)]
    for step, batch in enumerate(gathered(data, 0, data.per_pass)):
        for d in range(8):
            # the documented order: device d's rows of pass 0 are positions step*2, step*2 + 1 of
            # numpy.random.default_rng([seed, 0, d]).permutation(n_d)
            order = np.random.default_rng([0, 0, d]).permutation(len(blocks[d]))
            for j, row in enumerate(order[step * 2:step * 2 + 2]):
                subject, first = blocks[d][row]
                seen[d].append(row)
                got = batch["ear"][d * 2 + j]
                end = min(first + 3, cohort.num_epochs[TRAIN[subject]])
                _, x_ear, labels = cohort.read_epochs(TRAIN[subject], range(first, end))
                n = x_ear.shape[0]
                np.testing.assert_allclose(got[: n * 6000], x_ear.reshape(-1, 3), rtol=2**-11,
                                           atol=1e-6)
                assert not got[n * 6000:].any()  # past the night's end: zeros, label -1
                want = np.full(3, UNSCORED)
                want[:n] = labels
                np.testing.assert_array_equal(batch["labels"][d * 2 + j], want)
    for d in range(8):
        assert len(set(seen[d])) == len(seen[d]) == data.per_pass * 2
    # and the streamed path, told of the 8 devices, yields the same batches (float16 aside)
    streamed = pipeline.train_batches(cohort, TRAIN, cfg3, global_batch_size=16, seed=0,
                                      num_shards=8)
    for got, want in zip(gathered(data, 0, data.per_pass + 1),
                         itertools.islice(streamed, data.per_pass + 1), strict=True):
        np.testing.assert_array_equal(got["labels"], want["labels"])
        np.testing.assert_allclose(got["ear"], want["ear"], rtol=2**-11, atol=1e-6)


def test_the_gather_needs_no_communication(cohort, cfg3):
    mesh = parallel.make_mesh()
    data = on_devices(cohort, cfg3, ("scalp", "ear"), mesh, 8, 0)
    hlo = jax.jit(data.gather).lower(data.device_data(0), np.int32(0)).compile().as_text()
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in hlo


def test_float16_error_is_measured_and_unscaled_signals_stay_float32():
    x = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
    assert 0 < resident.quantization_error(x, "float16") < 2**-10
    assert resident.quantization_error(x, "float32") == 0
    assert resident.quantization_error(x * 1e6, "float16") == float("inf")  # overflows
    assert resident.quantization_error(x * 1e-6, "float16") > resident.MAX_RELATIVE_ERROR
