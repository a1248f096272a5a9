"""Files written whole or not at all, and the JSON conversions the library shares."""

import json
import pathlib

import ml_collections
import numpy as np
import pytest

from eegkd_jax import files


def test_write_atomic_text_bytes_and_a_writer(tmp_path):
    assert files.write_atomic(tmp_path / "a" / "x.txt", "text\n").read_text() == "text\n"
    assert files.write_atomic(tmp_path / "y.bin", b"\0\1").read_bytes() == b"\0\1"
    files.write_atomic(tmp_path / "z.txt", lambda tmp: tmp.write_text("from a writer"))
    assert (tmp_path / "z.txt").read_text() == "from a writer"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = files.write_atomic(tmp_path / "x.json", "old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, fails)
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_json_of_numpy_paths_and_configs(tmp_path):
    value = {"a": np.float32(0.5), "b": np.arange(3), "c": pathlib.Path("/x"),
             "d": ml_collections.ConfigDict({"e": (1, 2)})}
    path = files.write_json(tmp_path / "v.json", value, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": "/x", "d": {"e": [1, 2]}}
    with pytest.raises(ValueError):  # NaN is refused, not written as invalid JSON
        files.write_json(tmp_path / "nan.json", {"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        files.write_json(tmp_path / "obj.json", {"x": object()})


def test_plain_and_flatten():
    config = ml_collections.ConfigDict({"a": {"b": (np.float64(0.123456), 2)}, "c": {}})
    assert files.plain(config) == {"a": {"b": [0.123456, 2]}, "c": {}}
    assert files.plain(config, digits=2) == {"a": {"b": [0.12, 2]}, "c": {}}
    assert files.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2,
                                                                      "e": {}}
