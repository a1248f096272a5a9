"""The persistent compilation cache switch: where it points, how it is turned off, and that a
second compilation of the same program in a fresh process state is read from it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# --------------------------------------------------------------------------------------------------
# Traced programs kept on disk (exported_jit)


@flax.struct.dataclass
class _State:
    """A custom pytree node with an optax state inside, as the train state has."""
    weights: jax.Array
    opt_state: Any


def _make_step(traces: list, scale: float = 2.0):
    """A fresh jitted, donating step each call (a new Python function, so no trace is shared);
    every trace of its body is counted in ``traces``."""
    tx = optax.sgd(0.1)

    def step(state, batch):
        traces.append(1)
        grads = jax.grad(lambda w: jnp.sum((batch @ w) ** 2))(state.weights)
        updates, opt_state = tx.update(grads, state.opt_state)
        new = _State(optax.apply_updates(state.weights, updates) * scale, opt_state)
        return new, {"loss": jnp.sum(batch @ state.weights), "n": jnp.asarray(batch.shape[0])}

    return jax.jit(step, donate_argnums=0), tx


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


@pytest.fixture
def export_cache(clean_cache_config, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    return tmp_path / "xla" / "exported"


def _inputs(tx):
    state = _State(jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), tx.init(jnp.zeros((4, 3))))
    return state, jnp.arange(32.0).reshape(8, 4) / 10


def test_exported_jit_reads_the_program_back_without_tracing(export_cache):
    traces = []
    jitted, tx = _make_step(traces)
    state, batch = _inputs(tx)
    abstract = (_abstract(state), _abstract(batch))
    reference = jitted(*_inputs(tx))

    first = compile_cache.exported_jit(jitted, *abstract, key="toy", donate_argnums=0)
    assert len(list(export_cache.glob("*.jaxexport"))) == 1
    traced_before = len(traces)
    assert traced_before >= 1

    # A later process: a new function object, a fresh trace counter, the same key.
    later_traces = []
    later_jitted, _ = _make_step(later_traces)
    later = compile_cache.exported_jit(later_jitted, *abstract, key="toy", donate_argnums=0)
    for program in (first, later):
        state, batch = _inputs(tx)
        new_state, metrics = program(state, batch)
        assert isinstance(new_state, _State) and set(metrics) == {"loss", "n"}
        for ours, theirs in zip(jax.tree.leaves((new_state, metrics)), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(ours, theirs)
        assert state.weights.is_deleted(), "the state's buffers were not donated"
    assert later_traces == [], "the step was traced although its exported program was on disk"


def test_exported_jit_traces_again_for_another_key_or_shape(export_cache):
    traces = []
    jitted, tx = _make_step(traces)
    state, batch = _inputs(tx)
    abstract = (_abstract(state), _abstract(batch))
    compile_cache.exported_jit(jitted, *abstract, key="a")
    compile_cache.exported_jit(_make_step(traces)[0], *abstract, key="b")
    wider = (abstract[0], jax.ShapeDtypeStruct((16, 4), jnp.float32))
    compile_cache.exported_jit(_make_step(traces)[0], *wider, key="a")
    assert len(list(export_cache.glob("*.jaxexport"))) == 3
    digests = {compile_cache.export_digest(k, a) for k, a in
               (("a", abstract), ("b", abstract), ("a", wider))}
    assert len(digests) == 3


def test_exported_programs_depend_on_our_source(export_cache, monkeypatch):
    jitted, tx = _make_step([])
    abstract = tuple(_abstract(x) for x in _inputs(tx))
    before = compile_cache.export_digest("k", abstract)
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    assert compile_cache.export_digest("k", abstract) != before


def test_a_damaged_exported_program_is_logged_and_traced_again(export_cache, caplog):
    jitted, tx = _make_step([])
    abstract = tuple(_abstract(x) for x in _inputs(tx))
    compile_cache.exported_jit(jitted, *abstract, key="toy", donate_argnums=0)
    (path,) = export_cache.glob("*.jaxexport")
    path.write_bytes(path.read_bytes()[:200])

    traces = []
    with caplog.at_level("WARNING"):
        program = compile_cache.exported_jit(_make_step(traces)[0], *abstract, key="toy")
    assert traces, "a damaged program must be traced again"
    assert any("ignoring the exported program" in r.getMessage() and path.name in r.getMessage()
               for r in caplog.records)
    new_state, _ = program(*_inputs(tx))
    np.testing.assert_array_equal(new_state.weights, jitted(*_inputs(tx))[0].weights)
    assert path.stat().st_size > 200, "the damaged file was not replaced"


def test_exported_jit_without_a_cache_is_the_jitted_function(clean_cache_config):
    jitted, tx = _make_step([])
    abstract = tuple(_abstract(x) for x in _inputs(tx))
    assert compile_cache.exported_jit(jitted, *abstract, key="toy") is jitted


def test_exported_jit_keeps_the_shardings_on_a_mesh(export_cache):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    traces = []
    step, tx = _make_step(traces)
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(replicated, split),
                     out_shardings=(replicated, replicated))
    state, batch = _inputs(tx)
    batch = jnp.tile(batch, (len(jax.devices()), 1))
    abstract = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                             state),
                jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=split))
    compile_cache.exported_jit(jitted, *abstract, key="mesh", donate_argnums=0)
    later = compile_cache.exported_jit(_make_step([])[0], *abstract, key="mesh", donate_argnums=0)
    put = lambda tree, s: jax.device_put(tree, s)  # noqa: E731
    new_state, metrics = later(put(state, replicated), put(batch, split))
    reference = jitted(put(_inputs(tx)[0], replicated), put(batch, split))
    for ours, theirs in zip(jax.tree.leaves((new_state, metrics)), jax.tree.leaves(reference)):
        assert ours.sharding.is_equivalent_to(theirs.sharding, ours.ndim)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_ahead_of_time_goes_through_the_exported_program(export_cache):
    jitted, tx = _make_step([])
    abstract = tuple(_abstract(x) for x in _inputs(tx))
    ahead = compile_cache.AheadOfTime(jitted, *abstract, export_key="toy", donate_argnums=0)
    new_state, _ = ahead(*_inputs(tx))
    assert len(list(export_cache.glob("*.jaxexport"))) == 1
    np.testing.assert_array_equal(new_state.weights, jitted(*_inputs(tx))[0].weights)


def test_run_once_keeps_its_program_on_disk(export_cache):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P())
    traces = []

    def make_init():
        def init(key):
            traces.append(1)
            a, b = jax.random.split(key)
            return {"w": jax.random.uniform(a, (33, 7)), "rng": b, "z": jnp.zeros((4,))}
        return init

    first = compile_cache.RunOnce(make_init(), jax.random.key(3), export_key="init",
                                  out_shardings=replicated)
    assert traces and len(list(export_cache.glob("*.jaxexport"))) == 1
    traces.clear()
    later = compile_cache.RunOnce(make_init(), jax.random.key(4), export_key="init",
                                  out_shardings=replicated)
    assert traces == [], "traced although the program was on disk"
    assert later.abstract["w"].shape == (33, 7) and later.abstract["w"].sharding == replicated
    ours = later()
    reference = compile_cache.run_once(make_init(), jax.random.key(4), out_shardings=replicated)
    np.testing.assert_allclose(ours["w"], reference["w"], rtol=0,
                               atol=float(jnp.finfo(jnp.float32).eps))
    np.testing.assert_array_equal(jax.random.key_data(ours["rng"]),
                                  jax.random.key_data(reference["rng"]))
    assert ours["w"].sharding == replicated
    assert first.abstract == later.abstract
