"""Checkpoints: latest + best-by-kappa retention, restore of latest / best / a step into sharded
targets, the config beside them, half-written saves ignored, and restoring a teacher from another
run (with the clear errors when there is none)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eegkd_jax import checkpoint, parallel
from test_steps import TinyNet, make_state, tiny_config


def _state(config, step, teacher=False, online=False):
    state, _ = make_state(config, TinyNet(), TinyNet() if teacher else None, teacher_trained=online)
    # Make each saved step distinguishable.
    return state.replace(step=jnp.asarray(step, jnp.int32),
                         params=jax.tree.map(lambda p: p + step, state.params))


def _abstract(state, mesh):
    rep = parallel.replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)


def test_keeps_latest_and_best_and_restores_each(tmp_path):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    for step, kappa in [(1, 0.2), (2, 0.6), (3, 0.4), (4, 0.1)]:
        assert ckpt.save(_state(config, step), metrics={"kappa": kappa, "accuracy": 0.5})
    assert not ckpt.save(_state(config, 4))  # same step again: no-op
    assert ckpt.all_steps() == [2, 4]  # best (kappa 0.6) and latest
    assert ckpt.latest_step() == 4 and ckpt.best_step() == 2
    assert ckpt.metrics(2)["kappa"] == pytest.approx(0.6)

    mesh = parallel.make_mesh()
    abstract = _abstract(_state(config, 0), mesh)
    for which, want in [("latest", 4), ("best", 2), (2, 2), ("4", 4)]:
        restored = ckpt.restore(abstract, which)
        assert int(restored.step) == want
        leaf = jax.tree.leaves(restored.params)[0]
        assert leaf.sharding == parallel.replicated_sharding(mesh)
        np.testing.assert_allclose(np.asarray(leaf),
                                   np.asarray(jax.tree.leaves(_state(config, want).params)[0]))
        assert jax.tree.structure(restored) == jax.tree.structure(_state(config, 0))
    with pytest.raises(FileNotFoundError, match="step 3"):
        ckpt.restore(abstract, 3)
    ckpt.close()


def test_a_state_saved_in_another_layout_is_refused_with_a_clear_error(tmp_path):
    """A checkpoint of the earlier layout (Adam's moments as one flat vector, optax.flatten) cannot
    resume a run: a one-line error names the directory and the step and says what to do, and the
    checkpoint is left as it was."""
    import optax

    config = tiny_config("supervised")
    state = _state(config, 3)
    earlier = optax.chain(optax.add_decayed_weights(1e-4), optax.flatten(
        optax.chain(optax.scale_by_adam(eps=1e-9), optax.scale_by_learning_rate(1e-3))))
    old = state.replace(opt_state=earlier.init(state.params))
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(old)
    abstract = _abstract(state, parallel.make_mesh())
    with pytest.raises(ValueError, match=r"step 3 does not fit this run's.*new --workdir") as info:
        ckpt.restore(abstract)
    assert str(checkpoint.checkpoint_dir(tmp_path)) in str(info.value)
    assert "\n" not in str(info.value) and "flat vector" in str(info.value)
    assert ckpt.all_steps() == [3]
    step, raw = ckpt.restore_raw("latest")  # its model still reads (as eval.py does)
    assert step == 3 and jax.tree.structure(raw["params"]) == jax.tree.structure(
        jax.tree.map(np.asarray, state.params))
    ckpt.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(config, 5))
    ckpt.close()
    # What a SIGKILL during a save leaves behind: a temporary directory that never got renamed.
    junk = checkpoint.checkpoint_dir(tmp_path) / "6.orbax-checkpoint-tmp-1234"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = checkpoint.Checkpointer(tmp_path)
    assert reopened.latest_step() == 5
    assert int(reopened.restore(_abstract(_state(config, 0), parallel.make_mesh())).step) == 5
    reopened.close()


def test_config_round_trip(tmp_path):
    config = tiny_config("online_kd", variant="mutual")
    path = checkpoint.save_config(config, tmp_path)
    assert path.parent == checkpoint.checkpoint_dir(tmp_path)
    loaded = checkpoint.load_config(tmp_path)
    assert loaded.mode == "online_kd" and loaded.kd.variant == "mutual"
    assert loaded.optimizer.eps == config.optimizer.eps


@pytest.mark.parametrize("mode", ["supervised", "online_kd"])
def test_restore_teacher_from_a_scalp_run(tmp_path, mode):
    config = tiny_config(mode)
    config.supervised_input = "scalp"
    online = mode == "online_kd"
    saved = _state(config, 7, teacher=online, online=online)
    checkpoint.save_config(config, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(saved, metrics={"kappa": 0.5})
    ckpt.close()
    model_cfg, params, batch_stats, step = checkpoint.restore_teacher(tmp_path)
    assert step == 7 and model_cfg.name == config.teacher.name
    want = saved.teacher_params if online else saved.params
    want_stats = saved.teacher_batch_stats if online else saved.batch_stats
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(batch_stats) == jax.tree.structure(jax.device_get(want_stats))


def test_restore_teacher_errors_say_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/supervised.py:scalp"):
        checkpoint.restore_teacher("")
    with pytest.raises(FileNotFoundError, match="configs/supervised.py:scalp"):
        checkpoint.restore_teacher(tmp_path / "nowhere")
    config = tiny_config("supervised")  # an ear baseline is not a teacher
    checkpoint.save_config(config, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(config, 1))
    ckpt.close()
    with pytest.raises(ValueError, match="not a scalp model"):
        checkpoint.restore_teacher(tmp_path)
