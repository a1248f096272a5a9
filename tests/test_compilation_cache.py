"""The persistent compilation cache: its folder is created owner-only, and a folder that someone
else can write is refused (whoever writes there chooses the programs this user runs)."""

import os
import stat

import jax
import pytest

from eegkd_jax import compilation_cache


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield monkeypatch
    jax.config.update("jax_compilation_cache_dir", previous)


def test_creates_an_owner_only_folder_and_points_jax_at_it(no_cache, tmp_path):
    no_cache.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = compilation_cache.enable()
    assert path == tmp_path / "eegkd_jax" / "xla"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert jax.config.jax_compilation_cache_dir == str(path)


def test_refuses_a_folder_others_can_write(no_cache, tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert compilation_cache.enable(shared) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert "writable by others" in caplog.text


def test_refuses_a_symbolic_link(no_cache, tmp_path, caplog):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert compilation_cache.enable(tmp_path / "link") is None
    assert "symbolic link" in caplog.text


@pytest.mark.parametrize("word", ["off", "0", ""])
def test_the_environment_turns_it_off(no_cache, tmp_path, word):
    no_cache.setenv(compilation_cache.ENV_VAR, word)
    assert compilation_cache.enable(tmp_path) is None
    no_cache.setenv(compilation_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compilation_cache.enable(tmp_path / "other") == tmp_path / "mine"
