"""The persistent compilation cache switch: where it points, how it is turned off, and that a
second compilation of the same program in a fresh process state is read from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eegkd_jax import compile_cache


@pytest.fixture
def clean_cache_config(monkeypatch):
    """No cache configured before the test; whatever the test sets is undone after it."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    yield monkeypatch
    for name, value in previous.items():
        jax.config.update(name, value)


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_directory() == tmp_path / "eegkd_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_directory().parts[-3:] == (".cache", "eegkd_jax", "xla")


def test_enable_uses_the_argument_and_creates_it(clean_cache_config, tmp_path):
    path = compile_cache.enable(tmp_path / "a" / "b", min_compile_seconds=2.5)
    assert path == tmp_path / "a" / "b" and path.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5


def test_environment_overrides_the_argument(clean_cache_config, tmp_path):
    clean_cache_config.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.enable(tmp_path / "arg") == tmp_path / "env"
    assert not (tmp_path / "arg").exists()


@pytest.mark.parametrize("word", ["", "off", "OFF", "0"])
def test_environment_turns_it_off(clean_cache_config, tmp_path, word):
    clean_cache_config.setenv(compile_cache.ENV_VAR, word)
    assert compile_cache.enable(tmp_path) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_jax_already_has_is_kept(clean_cache_config, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable(tmp_path / "other") == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


def test_compiled_programs_are_written(clean_cache_config, tmp_path):
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = compile_cache.enable(tmp_path, min_compile_seconds=0.0)
    cc.reset_cache()  # the cache object binds its directory once per process
    try:
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0).lower(jnp.ones((7, 5))).compile()
        assert any(path.iterdir()), "nothing written to the compilation cache"
    finally:
        cc.reset_cache()


def test_run_once_gives_what_jit_gives():
    def init(key):
        a, b = jax.random.split(key)
        return {"w": jax.random.uniform(a, (33, 7), minval=-0.3, maxval=0.3),
                "n": jax.random.normal(b, (5,)), "z": jnp.zeros((4,))}

    key = jax.random.key(3)
    ours, reference = compile_cache.run_once(init, key), jax.jit(init)(key)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        assert a.dtype == b.dtype
        # Same random bits; a scaled uniform may round its last bit differently (fused mul-add).
        np.testing.assert_allclose(a, b, rtol=0, atol=float(jnp.finfo(a.dtype).eps))
    np.testing.assert_array_equal(ours["n"], reference["n"])


def _donating_step():
    return jax.jit(lambda state, batch: (state + batch.sum(0), jnp.mean(batch)), donate_argnums=0)


def test_ahead_of_time_runs_the_program_compiled_from_shapes():
    step = _donating_step()
    ahead = compile_cache.AheadOfTime(step, jax.ShapeDtypeStruct((3,), jnp.float32),
                                      jax.ShapeDtypeStruct((4, 3), jnp.float32))
    batch = jnp.arange(12.0).reshape(4, 3)
    state, mean = ahead(jnp.ones(3), batch)
    np.testing.assert_array_equal(state, 1.0 + np.arange(12.0).reshape(4, 3).sum(0))
    assert float(mean) == 5.5
    # Nothing retraced: the executable is the one compiled from the shapes.
    assert ahead.compiled() is ahead.compiled()
    assert step._cache_size() == 0


def test_ahead_of_time_warns_and_recompiles_for_other_shapes():
    ahead = compile_cache.AheadOfTime(_donating_step(), jax.ShapeDtypeStruct((3,), jnp.float32),
                                      jax.ShapeDtypeStruct((4, 3), jnp.float32), name="toy step")
    with pytest.warns(RuntimeWarning, match="toy step does not take these arguments"):
        state, _ = ahead(jnp.ones(3), jnp.ones((5, 3)))
    np.testing.assert_array_equal(state, [6.0, 6.0, 6.0])
    state, _ = ahead(state, jnp.ones((5, 3)))  # later calls go straight to the jitted function
    np.testing.assert_array_equal(state, [11.0, 11.0, 11.0])


def test_ahead_of_time_reraises_a_tracing_error_when_called():
    def broken(state, batch):
        raise ValueError("bad model")

    ahead = compile_cache.AheadOfTime(jax.jit(broken), jax.ShapeDtypeStruct((3,), jnp.float32),
                                      jax.ShapeDtypeStruct((4, 3), jnp.float32))
    with pytest.raises(ValueError, match="bad model"):
        ahead(jnp.ones(3), jnp.ones((4, 3)))
