"""The input pipeline: splits, resumable training order, host shares, exhaustive evaluation."""

import itertools

import numpy as np
import pytest

from eegkd_jax.data import pipeline
from eegkd_jax.data.recording import UNSCORED, DataError
from eegkd_jax.data.sampler import Sampler

SUBJECTS = ("sim-01", "sim-02", "sim-03", "sim-04")


@pytest.fixture(scope="module")
def epoch_index(cohort):
    """First scalp samples of every epoch -> (subject, epoch): where a batch row came from."""
    index = {}
    for s in cohort.subjects:
        scalp, _, _ = cohort.read_epochs(s, range(cohort.num_epochs[s]))
        for e in range(scalp.shape[0]):
            index[scalp[e, :4].tobytes()] = (s, e)
    assert len(index) == sum(cohort.num_epochs.values())  # the key is unique
    return index


def with_seq_len(cfg, seq_len):
    c = cfg.copy_and_resolve_references()
    c.sequence_length = seq_len
    return c


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_cohort(cohort, cfg):
    assert cohort.subjects == SUBJECTS
    assert cohort.num_epochs == {s: 12 for s in SUBJECTS}
    assert cohort.scalp_names == ("A1-A2", "C3-O1", "C4-O2") and cohort.ear_names == (
        "L-R",
        "L_E",
        "R_E",
    )
    assert cohort.sampling_rate == 200.0 and cohort.epoch_samples == 6000
    assert cohort.built_now
    again = pipeline.prepare_cohort(cfg)
    assert not again.built_now and again.data_dir == cohort.data_dir
    assert all(np.array_equal(again.labels[s], cohort.labels[s]) for s in SUBJECTS)


def test_read_epochs_equals_what_tfds_decodes(cohort):
    """read_epochs parses the stored examples itself; TFDS's own decoder must agree."""
    for subject in ("sim-01", "sim-04"):
        epochs = [5, 0, 11, 5]
        scalp, ear, labels = cohort.read_epochs(subject, epochs)
        decoded = cohort.source(subject).__getitems__(epochs)
        np.testing.assert_array_equal(scalp, np.stack([d["scalp"] for d in decoded]))
        np.testing.assert_array_equal(ear, np.stack([d["ear"] for d in decoded]))
        np.testing.assert_array_equal(labels, [d["label"] for d in decoded])
        np.testing.assert_array_equal(labels, cohort.labels[subject][epochs])
    empty = cohort.read_epochs("sim-02", [])
    assert [a.shape[0] for a in empty] == [0, 0, 0]


def test_subject_splits(cfg):
    splits = pipeline.subject_splits(reversed(SUBJECTS), cfg)
    assert splits == (("sim-01", "sim-02"), ("sim-03",), ("sim-04",))
    c = cfg.copy_and_resolve_references()
    c.test_subjects = ("sim-01",)
    c.validation_subjects = ("sim-04", "sim-02")
    assert pipeline.subject_splits(SUBJECTS, c) == (("sim-03",), ("sim-02", "sim-04"), ("sim-01",))
    c.test_subjects = ()
    c.num_test_subjects = 2
    c.validation_subjects = ()
    splits = pipeline.subject_splits(SUBJECTS, c)
    assert splits.test == ("sim-03", "sim-04") and splits.validation == ("sim-02",)
    for train, val, test in [splits]:
        assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
        assert set(train) | set(val) | set(test) == set(SUBJECTS)

    c.validation_subjects = ("sim-04",)
    with pytest.raises(ValueError, match="both"):
        pipeline.subject_splits(SUBJECTS, c)
    c.validation_subjects = ("sim-09",)
    with pytest.raises(ValueError, match="sim-09"):
        pipeline.subject_splits(SUBJECTS, c)
    c.validation_subjects = ()
    c.num_validation_subjects = 2
    with pytest.raises(ValueError, match="no training subjects"):
        pipeline.subject_splits(SUBJECTS, c)


def test_train_batches_shapes_content_and_subject_separation(cohort, cfg, epoch_index):
    c = with_seq_len(cfg, 2)
    train = ("sim-01", "sim-02")
    batches = take(pipeline.train_batches(cohort, train, c, global_batch_size=6, seed=0), 3)
    for batch in batches:
        assert batch["scalp"].shape == (6, 12000, 3) and batch["scalp"].dtype == np.float32
        assert batch["ear"].shape == (6, 12000, 3) and batch["ear"].dtype == np.float32
        assert batch["labels"].shape == (6, 2) and batch["labels"].dtype == np.int32
        for row in range(6):
            subject, first = epoch_index[batch["scalp"][row, :4].tobytes()]
            assert subject in train  # never a validation or test night
            second = epoch_index[batch["scalp"][row, 6000:6004].tobytes()]
            assert second == (subject, first + 1)  # consecutive epochs of one night
            np.testing.assert_array_equal(
                batch["labels"][row], cohort.labels[subject][first : first + 2]
            )
            assert np.any(batch["labels"][row] != UNSCORED)
            _, ear, _ = cohort.read_epochs(subject, [first + 1])
            np.testing.assert_array_equal(batch["ear"][row, 6000:], ear[0])


def test_training_order_is_deterministic_and_resumable(cohort, cfg):
    train = ("sim-01", "sim-02", "sim-03")
    windows = pipeline.training_windows(cohort, train, cfg)
    scored = sum(int(np.sum(cohort.labels[s] != UNSCORED)) for s in train)
    assert windows.shape == (scored, 2)
    per_pass = Sampler(windows.shape[0], 8).per_pass
    assert per_pass == scored // 8

    run = take(
        pipeline.train_batches(cohort, train, cfg, global_batch_size=8, seed=5), per_pass + 2
    )
    again = take(pipeline.train_batches(cohort, train, cfg, global_batch_size=8, seed=5), 2)
    for a, b in zip(run[:2], again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # resuming at any step, including across the pass boundary, replays the same batches
    for start in (1, per_pass - 1, per_pass + 1):
        resumed = next(
            pipeline.train_batches(
                cohort, train, cfg, global_batch_size=8, seed=5, start_step=start
            )
        )
        for key in resumed:
            np.testing.assert_array_equal(resumed[key], run[start][key])
    # a bounded run ends after exactly the batches an endless one would have given it
    bounded = list(
        pipeline.train_batches(
            cohort, train, cfg, global_batch_size=8, seed=5, start_step=1, stop_step=3
        )
    )
    assert len(bounded) == 2
    for got, want in zip(bounded, run[1:3], strict=True):
        np.testing.assert_array_equal(got["scalp"], want["scalp"])
    other_seed = next(pipeline.train_batches(cohort, train, cfg, global_batch_size=8, seed=6))
    assert not np.array_equal(other_seed["scalp"], run[0]["scalp"])

    # within a pass no window repeats; the next pass is a different order
    first_pass = np.concatenate([b["scalp"][:, :4] for b in run[:per_pass]])
    assert len({r.tobytes() for r in first_pass}) == per_pass * 8
    assert not np.array_equal(run[per_pass]["scalp"], run[0]["scalp"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shares_are_disjoint_and_cover_the_global_batch(cohort, cfg, process_count):
    """Four devices on 2 or 4 hosts: each host's rows (its devices' shards) put together are the
    global batch of one host feeding all four."""
    train = ("sim-01", "sim-02")

    def batches(**share):
        return take(pipeline.train_batches(cohort, train, cfg, global_batch_size=8, seed=1,
                                           start_step=2, num_shards=4, **share), 2)

    whole = batches()
    shares = [batches(process_index=p, process_count=process_count) for p in range(process_count)]
    for step in range(2):
        for key in ("scalp", "ear", "labels"):
            parts = [shares[p][step][key] for p in range(process_count)]
            assert all(part.shape[0] == 8 // process_count for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), whole[step][key])
        rows = [r.tobytes() for p in range(process_count) for r in shares[p][step]["scalp"][:, :4]]
        assert len(set(rows)) == 8  # disjoint


def test_bad_arguments_raise_when_called(cohort, cfg):
    """Errors come at the call, not at the first next(), so a trainer fails before it starts."""
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        pipeline.train_batches(cohort, SUBJECTS, cfg, global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        pipeline.eval_batches(cohort, SUBJECTS, cfg, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="do not divide across 3 processes"):
        pipeline.train_batches(cohort, SUBJECTS, cfg, global_batch_size=8, seed=0, num_shards=4,
                               process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.eval_batches(
            cohort, SUBJECTS, cfg, global_batch_size=8, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match="sim-07"):
        pipeline.train_batches(cohort, ("sim-01", "sim-07"), cfg, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        pipeline.train_batches(cohort, SUBJECTS, cfg, global_batch_size=8, seed=0, start_step=-1)
    with pytest.raises(DataError, match="sequence_length=13"):
        pipeline.train_batches(cohort, SUBJECTS, with_seq_len(cfg, 13), global_batch_size=8, seed=0)


def test_eval_covers_every_epoch_once_with_padding(cohort, cfg, epoch_index):
    c = with_seq_len(cfg, 5)  # 12 epochs = 5 + 5 + 2: every night ends in a partial sequence
    subjects = ("sim-03", "sim-01", "sim-04")  # any order; indices refer to this tuple
    batches = list(pipeline.eval_batches(cohort, subjects, c, global_batch_size=4))
    assert len(batches) == 3  # 9 sequences -> 3 batches of 4, the last with 3 padding rows
    seen = {s: np.zeros(12, int) for s in subjects}
    for batch in batches:
        assert batch["scalp"].shape == (4, 30000, 3) and batch["labels"].shape == (4, 5)
        assert batch["subject"].dtype == np.int32 and batch["epoch"].dtype == np.int32
        assert batch["valid"].dtype == np.bool_
        for row in range(4):
            if not batch["valid"][row]:
                assert np.all(batch["labels"][row] == UNSCORED) and not batch["scalp"][row].any()
                continue
            subject = subjects[batch["subject"][row]]
            first = int(batch["epoch"][row])
            real = min(5, 12 - first)
            seen[subject][first : first + real] += 1
            np.testing.assert_array_equal(
                batch["labels"][row, :real], cohort.labels[subject][first : first + real]
            )
            assert np.all(batch["labels"][row, real:] == UNSCORED)
            assert not batch["scalp"][row, real * 6000 :].any()
            assert epoch_index[batch["scalp"][row, :4].tobytes()] == (subject, first)
    assert all(np.all(v == 1) for v in seen.values()), seen
    assert [int(v) for v in batches[-1]["valid"]] == [1, 0, 0, 0]
    order = [
        (subjects[s], e)
        for b in batches
        for s, e, v in zip(b["subject"], b["epoch"], b["valid"], strict=True)
        if v
    ]
    assert order == [(s, e) for s in subjects for e in (0, 5, 10)]  # in order

    # two hosts: same number of batches, shares that stack into the global batches
    shares = [
        list(
            pipeline.eval_batches(
                cohort, subjects, c, global_batch_size=4, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == len(batches)
    for k, batch in enumerate(batches):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([shares[0][k][key], shares[1][k][key]]), batch[key]
            )


def test_eval_batches_feed_the_night_collector(cohort, cfg):
    from eegkd_jax.metrics import NightCollector

    c = with_seq_len(cfg, 5)
    collector = NightCollector(cohort.num_epochs, SUBJECTS)
    for batch in pipeline.eval_batches(cohort, SUBJECTS, c, global_batch_size=8):
        collector.add(
            batch["labels"],
            np.maximum(batch["labels"], 0),
            batch["subject"],
            batch["epoch"],
            batch["valid"],
        )
    nights = collector.hypnograms()
    for s in SUBJECTS:
        np.testing.assert_array_equal(nights[s][0], cohort.labels[s])
