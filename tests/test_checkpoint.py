"""Checkpoints: latest + best-by-kappa retention, restore of latest / best / a step into sharded
targets, the config saved with each step, the checksum manifest and the fall-back past a damaged
step, half-written saves ignored, the config check of a resumed run, the workdir lock, and restoring a teacher from another run (with the clear errors when there is
none). The fault-injection trials are in test_faults.py."""

import json
import logging
import os

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
                         params=jax.tree.map(lambda p: p + step, state.params)).to_dict()


def _abstract(state, mesh):
    rep = parallel.replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)


def _first_param(state):
    return np.asarray(jax.tree.leaves(state["params"])[0])


def _biggest_state_file(workdir, step):
    files = [p for p in (checkpoint.checkpoint_dir(workdir) / str(step) / "state").rglob("*")
             if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_keeps_latest_and_best_and_restores_each(tmp_path):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    for step, kappa in [(1, 0.2), (2, 0.6), (3, 0.4), (4, 0.1)]:
        assert ckpt.save(_state(config, step), config=config,
                         metrics={"kappa": kappa, "accuracy": 0.5})
    assert not ckpt.save(_state(config, 4), config=config)  # same step again: no-op
    assert ckpt.all_steps() == [2, 4]  # best (kappa 0.6) and latest
    assert ckpt.latest_step() == 4 and ckpt.best_step() == 2
    assert ckpt.metrics(2)["kappa"] == pytest.approx(0.6)
    step_dir = checkpoint.checkpoint_dir(tmp_path) / "4"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "config.json", "manifest.json", "metrics.json", "state"]
    assert not [p for p in step_dir.parent.iterdir() if not p.name.isdigit()]  # no leftovers

    mesh = parallel.make_mesh()
    abstract = _abstract(_state(config, 0), mesh)
    for which, want in [("latest", 4), ("best", 2), (2, 2), ("4", 4)]:
        restored = ckpt.restore(abstract, which)
        assert int(restored["step"]) == want
        leaf = jax.tree.leaves(restored["params"])[0]
        assert leaf.sharding == parallel.replicated_sharding(mesh)
        np.testing.assert_allclose(np.asarray(leaf), _first_param(_state(config, want)))
        assert jax.tree.structure(restored) == jax.tree.structure(_state(config, 0))
    with pytest.raises(FileNotFoundError, match="step 3"):
        ckpt.restore(abstract, 3)
    ckpt.close()


def test_each_step_holds_its_config_and_an_edited_copy_is_ignored(tmp_path, caplog):
    config = tiny_config("supervised")
    checkpoint.save_config(config, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(config, 1))  # without config=: the workdir's saved copy
    first_rate = config.optimizer.learning_rate
    config.optimizer.learning_rate = 0.5
    ckpt.save(_state(config, 2), config=config)
    assert ckpt.config(1).optimizer.learning_rate == first_rate != 0.5
    assert ckpt.config(2).optimizer.learning_rate == 0.5
    # Someone edits the copy beside the checkpoints: restoring uses the step's own and says so.
    path = checkpoint.checkpoint_dir(tmp_path) / "config.json"
    edited = json.loads(path.read_text())
    edited["data"]["sampling_rate"] = 100.0
    path.write_text(json.dumps(edited))
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.Checkpointer(tmp_path, read_only=True).restore_raw("latest")
    assert restored.step == 2 and restored.config.data.sampling_rate == config.data.sampling_rate
    assert "data.sampling_rate" in caplog.text and "the step's config is used" in caplog.text


def test_a_damaged_step_is_reported_and_restore_falls_back(tmp_path, caplog):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    for step, kappa in [(1, 0.2), (2, 0.9), (3, 0.4)]:
        ckpt.save(_state(config, step), config=config, metrics={"kappa": kappa})
    ckpt.close()
    # One flipped bit in the best step's data, and a torn metrics file in the latest.
    victim = _biggest_state_file(tmp_path, 2)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    metrics = checkpoint.checkpoint_dir(tmp_path) / "3" / "metrics.json"
    metrics.write_text(metrics.read_text()[:5])

    ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_step() == 1 and ckpt.best_step() == 1  # never the damaged step 2
    assert "step 3" in caplog.text and "metrics.json" in caplog.text
    assert "step 2" in caplog.text and "does not match its checksum" in caplog.text
    restored = ckpt.restore_raw("latest")
    assert restored.step == 1
    np.testing.assert_array_equal(_first_param(restored.state), _first_param(_state(config, 1)))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2: state/.* checksum"):
        ckpt.restore_raw(2)  # a step asked for by number does not fall back
    ckpt.close()


def test_a_step_that_fails_to_restore_falls_back_and_none_intact_is_an_error(tmp_path, caplog):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(_state(config, step), config=config)
    # Damage that the manifest cannot see because it is rewritten to match: orbax fails on it.
    step_dir = checkpoint.checkpoint_dir(tmp_path) / "2"
    (step_dir / "state" / "_METADATA").write_text("{")
    checkpoint.write_manifest(step_dir, 2)
    fresh = checkpoint.Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        restored = fresh.restore(_abstract(_state(config, 0), parallel.make_mesh()))
    assert int(restored["step"]) == 1
    assert "step 2" in caplog.text and "fails to restore" in caplog.text
    assert fresh.latest_step() == 1  # remembered as failed

    (checkpoint.checkpoint_dir(tmp_path) / "1" / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint.*step 1: no "
                                                         r"manifest\.json"):
        checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(config, 0),
                                                            parallel.make_mesh()))


def test_a_state_saved_in_another_layout_is_refused_with_a_clear_error(tmp_path):
    """A checkpoint of the earlier layout (Adam's moments as one flat vector, optax.flatten) cannot
    resume a run: a one-line error names the directory and the step and says what to do, and the
    checkpoint is left as it was."""
    import optax

    config = tiny_config("supervised")
    state = _state(config, 3)
    earlier = optax.chain(optax.add_decayed_weights(1e-4), optax.flatten(
        optax.chain(optax.scale_by_adam(eps=1e-9), optax.scale_by_learning_rate(1e-3))))
    old = {**state, "opt_state": earlier.init(state["params"])}
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(old, config=config)
    abstract = _abstract(state, parallel.make_mesh())
    with pytest.raises(ValueError, match=r"step 3 does not fit this run's.*new --workdir") as info:
        ckpt.restore(abstract)
    assert str(checkpoint.checkpoint_dir(tmp_path)) in str(info.value)
    assert "\n" not in str(info.value)
    assert ckpt.all_steps() == [3]
    restored = ckpt.restore_raw("latest")  # its model still reads (as eval.py does)
    assert restored.step == 3 and jax.tree.structure(restored.state["params"]) == \
        jax.tree.structure(jax.tree.map(np.asarray, state["params"]))
    ckpt.close()


def test_half_written_and_half_deleted_steps_are_ignored_then_removed(tmp_path):
    config = tiny_config("supervised")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(config, 5), config=config)
    ckpt.close()
    # What a SIGKILL during a save or a prune leaves behind.
    directory = checkpoint.checkpoint_dir(tmp_path)
    for junk in ("6.tmp", "3.deleting", "7.orbax-checkpoint-tmp-1234"):
        (directory / junk / "state").mkdir(parents=True)
        (directory / junk / "state" / "garbage").write_bytes(b"\0" * 10)
    reopened = checkpoint.Checkpointer(tmp_path)
    assert reopened.all_steps() == [5] and reopened.latest_step() == 5
    assert int(reopened.restore(_abstract(_state(config, 0), parallel.make_mesh()))["step"]) == 5
    reopened.save(_state(config, 6), config=config)  # the first save clears the leftovers
    assert sorted(p.name for p in directory.iterdir()) == ["5", "6"]
    reopened.close()


def test_config_round_trip(tmp_path):
    config = tiny_config("online_kd", variant="mutual")
    path = checkpoint.save_config(config, tmp_path)
    assert path.parent == checkpoint.checkpoint_dir(tmp_path)
    loaded = checkpoint.load_config(tmp_path)
    assert loaded.mode == "online_kd" and loaded.kd.variant == "mutual"
    assert loaded.optimizer.eps == config.optimizer.eps


def test_a_resumed_run_must_keep_model_data_and_mode():
    saved = tiny_config("online_kd")
    same = tiny_config("online_kd")
    same.optimizer.learning_rate = 1.0  # what may change on resume
    same.data.cache_dir = "elsewhere"
    checkpoint.check_resumable(saved, same, "ckpt/4")
    other = tiny_config("online_kd")
    other.data.sampling_rate = 123.0
    other.data.ear_derivations = ("L_E", "L-R", "R_E")
    other.kd.variant = "mutual"
    diff = checkpoint.config_differences(saved, other)
    assert sorted(diff) == ["data.ear_derivations", "data.sampling_rate", "kd.variant"]
    with pytest.raises(checkpoint.ConfigMismatchError) as info:
        checkpoint.check_resumable(saved, other, "ckpt/4")
    message = str(info.value)
    assert message.startswith("ckpt/4 was trained with other settings")
    assert "data.sampling_rate" in message and "--config.kd.variant='original'" in message
    assert "\n" not in message
    # A field the saved config does not have yet (added since) is not a difference.
    newer = tiny_config("online_kd")
    with newer.unlocked():
        newer.kd.new_field = 1
    assert checkpoint.config_differences(saved, newer) == {}


def test_one_run_per_workdir_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    with checkpoint.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(checkpoint.WorkdirBusyError,
                           match=rf"in use by pid {os.getpid()} on host {holder['host']}"):
            with checkpoint.WorkdirLock(tmp_path):
                pass
    # What a killed run leaves: the file, naming a process that no longer holds the lock.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))
    with caplog.at_level(logging.INFO):
        with checkpoint.WorkdirLock(tmp_path):
            assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "from pid 999999 on gone" in caplog.text


def test_a_refused_run_waits_for_the_holder_to_write_its_name(tmp_path):
    """Between a run's flock and the write of its pid, a second run sees an empty lock file; it
    waits for the name instead of reporting 'pid ?' (a race the fault suite once hit)."""
    import fcntl
    import threading

    fd = os.open(tmp_path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
    late = threading.Timer(0.3, lambda: os.pwrite(fd, b'{"pid": 4242, "host": "h"}', 0))
    late.start()
    try:
        with pytest.raises(checkpoint.WorkdirBusyError, match="in use by pid 4242 on host h"):
            with checkpoint.WorkdirLock(tmp_path):
                pass
    finally:
        late.join()
        os.close(fd)


@pytest.mark.parametrize("mode", ["supervised", "online_kd"])
def test_restore_teacher_from_a_scalp_run(tmp_path, mode):
    config = tiny_config(mode)
    config.supervised_input = "scalp"
    online = mode == "online_kd"
    saved = _state(config, 7, teacher=online, online=online)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(saved, config=config, metrics={"kappa": 0.5})
    ckpt.close()
    model_cfg, params, batch_stats, step = checkpoint.restore_teacher(tmp_path)
    assert step == 7 and model_cfg.name == config.teacher.name
    want = saved["teacher_params"] if online else saved["params"]
    want_stats = saved.get("teacher_batch_stats" if online else "batch_stats")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(batch_stats) == jax.tree.structure(jax.device_get(want_stats))


def test_restore_teacher_errors_say_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/supervised.py:scalp"):
        checkpoint.restore_teacher("")
    with pytest.raises(FileNotFoundError, match="configs/supervised.py:scalp"):
        checkpoint.restore_teacher(tmp_path / "nowhere")
    config = tiny_config("supervised")  # an ear baseline is not a teacher
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(_state(config, 1), config=config)
    ckpt.close()
    with pytest.raises(ValueError, match="not a scalp model"):
        checkpoint.restore_teacher(tmp_path)
