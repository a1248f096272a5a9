"""The TFDS builder: per-subject shards equal to the prepared nights, reuse, rebuild on change,
one night at a time."""

import os
import weakref

import numpy as np
import pytest

from eegkd_jax.configs.common import data_config
from eegkd_jax.data import builder, preprocess, sources
from eegkd_jax.data.recording import DataError


def tiny_cfg(cache_dir, subjects=3, hours=0.1):
    cfg = data_config()
    cfg.cache_dir = str(cache_dir)
    cfg.simulated.subjects = subjects
    cfg.simulated.hours = hours
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("tfds"))
    b, built_now = builder.build(cfg)
    return cfg, b, built_now


def test_shards_hold_the_prepared_nights_in_epoch_order(built):
    cfg, b, built_now = built
    assert built_now
    assert sorted(b.info.splits.keys()) == ["sim-01", "sim-02", "sim-03"]
    meta = b.info.metadata
    assert meta["scalp_names"] == ["A1-A2", "C3-O1", "C4-O2"]
    assert meta["ear_names"] == ["L-R", "L_E", "R_E"]
    assert meta["epoch_samples"] == 6000 and meta["sampling_rate"] == 200.0

    night = preprocess.prepare_night(sources.load_recording(cfg, "sim-02"), cfg)
    data = b.as_data_source(split="sim-02")
    assert len(data) == night.num_epochs == 12
    assert meta["subjects"]["sim-02"]["labels"] == night.labels.tolist()
    s = night.epoch_samples
    for i in (0, 5, 11):
        example = data[i]
        assert example["epoch"] == i and example["label"] == night.labels[i]
        np.testing.assert_array_equal(example["scalp"], night.scalp[i * s : (i + 1) * s])
        np.testing.assert_array_equal(example["ear"], night.ear[i * s : (i + 1) * s])
        assert example["scalp"].dtype == np.float32


def test_second_build_reuses_the_shards(built):
    cfg, first, _ = built
    files = sorted(os.listdir(first.data_dir))
    stamps = {f: os.stat(os.path.join(first.data_dir, f)).st_mtime_ns for f in files}
    again, built_now = builder.build(cfg)
    assert not built_now
    assert os.fspath(again.data_dir) == os.fspath(first.data_dir)
    assert {f: os.stat(os.path.join(again.data_dir, f)).st_mtime_ns for f in files} == stamps


def test_changed_preprocessing_rebuilds_elsewhere(built):
    cfg, first, _ = built
    # fields that do not change what is written keep the name ...
    same = tiny_cfg(cfg.cache_dir)
    same.sequence_length = 5
    same.prefetch = 7
    same.test_subjects = ("sim-01",)
    assert builder.config_name(same) == builder.config_name(cfg)
    # ... fields that do change it give a new one
    for change in (
        lambda c: setattr(c.preprocess, "clip_iqr", 10.0),
        lambda c: setattr(c.preprocess, "bandpass_hz", (0.5, 30.0)),
        lambda c: setattr(c, "ear_derivations", ("L-R",)),
        lambda c: setattr(c.simulated, "seed", 1),
        lambda c: setattr(c, "auto_reject_ear", False),
    ):
        other = tiny_cfg(cfg.cache_dir)
        change(other)
        assert builder.config_name(other) != builder.config_name(cfg)

    changed = tiny_cfg(cfg.cache_dir, subjects=2)
    changed.preprocess.clip_iqr = 5.0
    rebuilt, built_now = builder.build(changed)
    assert built_now and os.fspath(rebuilt.data_dir) != os.fspath(first.data_dir)
    data = rebuilt.as_data_source(split="sim-01")
    assert np.abs(data[0]["scalp"]).max() <= 5.0  # written with the new clipping


def test_one_night_in_memory_at_a_time(tmp_path, monkeypatch):
    """Each night is loaded only when its split is written, after the previous one is released."""
    alive: list = []
    most_alive_at_load = []

    def tracked(data_cfg, subject):
        most_alive_at_load.append(sum(ref() is not None for ref in alive))
        night = preprocess.prepare_night(sources.load_recording(data_cfg, subject), data_cfg)
        alive.append(weakref.ref(night))
        return night

    monkeypatch.setattr(builder, "_load_night", tracked)
    builder.build(tiny_cfg(tmp_path, subjects=4, hours=0.05))
    assert len(most_alive_at_load) == 4
    # at most one earlier night still referenced when the next is loaded: never more than two
    assert max(most_alive_at_load) <= 1, most_alive_at_load


def test_bad_subject_id_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "_list_subjects", lambda cfg: ["sub 01"])
    with pytest.raises(DataError, match="sub 01"):
        builder.build(tiny_cfg(tmp_path))


def test_losing_a_build_race_reuses_the_winners_shards(tmp_path, monkeypatch):
    """Hosts sharing a cache_dir may build at once; the one whose rename fails uses the result."""
    original = builder.EegkdCohort.download_and_prepare

    def built_by_someone_else_then_fail(self, **kwargs):
        original(self, **kwargs)  # the other host's build lands ...
        raise OSError("rename: directory exists")  # ... and ours then fails to move into place

    monkeypatch.setattr(
        builder.EegkdCohort, "download_and_prepare", built_by_someone_else_then_fail
    )
    cfg = tiny_cfg(tmp_path, subjects=2, hours=0.05)
    b, built_now = builder.build(cfg)
    assert not built_now and len(b.as_data_source(split="sim-02")) == 6

    def fail(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(builder.EegkdCohort, "download_and_prepare", fail)
    with pytest.raises(OSError, match="disk full"):
        builder.build(tiny_cfg(tmp_path / "other", subjects=2, hours=0.05))
