"""Fault injection: what a killed, doubled, damaged, edited, diverging or starved run leaves, and
that each ends either exactly where an uninterrupted run ends or in one clear line.

Every trial asserts its outcome:

  concurrent  two runs started on one workdir at once: one holds it, the other refuses in one
              line naming the holder's pid and host.
  kills       SIGKILL during the first step (of that holder), in the middle of orbax's write of a
              step, after a step's files and manifest are written but before its commit, right
              after a log record (a torn half line is then appended, as a power loss leaves), and
              in the middle of pruning; every rerun resumes, says on stdout where from (step N of
              M, which checkpoint) or that it starts fresh, and the last ends bit-identical to an
              uninterrupted run with the same log.
  torn tail   random bytes (with \\r, \\x0b, \\x1c, \\x85 among them) torn onto the log: dropped
              with a warning on resume, which ends as the uninterrupted run.
  bit flips   single-bit flips at random places of the latest step: each is caught, reported by
              number, and restore falls back to the previous step's exact values; "best" never
              names the damaged step.
  damage      kinds of damage to the latest step (truncations, deletions, a bad manifest, metrics
              or config file, a stray file): each is caught and falls back; a resumed run then
              ends bit-identical; with every step damaged a run refuses instead of starting over.
  config      a rerun with other model, data or mode settings refuses before writing a byte; eval
              of a step whose config.json was edited (manifest rehashed) so that it no longer fits
              the state refuses in one line naming the field and the step.
  guard       resuming at learning rate 1e20, and a loss held near 1e12, stop the run in one line
              naming the last good step; nothing after it is saved and "best" stays good; with
              validation at every step, a rejected state (lr 1e20, NaN parameters) is never scored
              into the log.
  one line    a missing workdir, a misspelt config field, a bad variant, a full disk: one line.

The workers are this file run as a script: the tiny supervised run of test_train on its in-memory
pipeline, with the fault named by ``FAULT`` installed.
"""

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = 6  # checkpoints at 2, 4, 6; one log record per step


def run_config(**overrides):
    """test_train's tiny supervised ear run: validation at the last step only, so that "best" is
    the last step and which step a save prunes does not depend on validation scores."""
    from test_train import tiny

    settings = dict(max_steps=STEPS, num_epochs=10, log_every_steps=1, eval_every_steps=100)
    return tiny("supervised", "ear,tiny", **{**settings, **overrides})


# ------------------------------------------------------------------------------------- the worker
def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str) -> None:
    """Patches the library so that this process kills itself at the moment ``fault`` names."""
    import orbax.checkpoint as ocp

    from eegkd_jax import checkpoint, parallel
    from eegkd_jax.train import loop

    kind, _, arg = fault.partition(":")
    n = int(arg or 0)
    if kind == "first-step":  # during the first step (its compile, or its run when cached)
        real_jit = parallel.jit_train_steps

        def jit_train_steps(*args, **kwargs):
            step = real_jit(*args, **kwargs)

            def first(*a):
                threading.Timer(0.05, _die).start()
                return step(*a)
            return first
        parallel.jit_train_steps = jit_train_steps
    elif kind == "orbax-write":  # step n's arrays written, orbax not yet finished with them
        real_finalize = ocp.StandardCheckpointHandler.finalize

        def finalize(self, directory):
            if f"/{n}.tmp/" in str(directory):
                _die()
            return real_finalize(self, directory)
        ocp.StandardCheckpointHandler.finalize = finalize
    elif kind == "commit":  # step n's files and manifest written, not yet renamed into place
        real_manifest = checkpoint.write_manifest

        def write_manifest(directory, step):
            real_manifest(directory, step)
            if step == n:
                _die()
        checkpoint.write_manifest = write_manifest
    elif kind == "log":  # step n's train record is in metrics.jsonl
        real_write = loop._Logger.write

        def write(self, step, split, scalars):
            real_write(self, step, split, scalars)
            if step == n and split == "train":
                _die()
        loop._Logger.write = write
    elif kind == "prune":  # an old step renamed for deletion, not yet deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if str(path).endswith(".deleting"):
                _die()
            return real_rmtree(path, *args, **kwargs)
        checkpoint.shutil.rmtree = rmtree
    elif kind:
        raise ValueError(f"unknown FAULT {fault!r}")


def _worker_main(workdir: pathlib.Path) -> None:
    from absl import app

    from eegkd_jax.cli import common
    from test_train import FakePipeline, install_fake_pipeline

    real_batches = FakePipeline.train_batches
    pause = float(os.environ.get("PAUSE", "0"))

    def paced_batches(*args, **kwargs):  # leaves time for a second run to meet this one
        for batch in real_batches(*args, **kwargs):
            time.sleep(pause)
            yield batch

    FakePipeline.train_batches = paced_batches
    install_fake_pipeline()
    install_fault(os.environ.get("FAULT", ""))
    hold = os.environ.get("HOLD_UNTIL")
    if hold:  # the run that gets the lock keeps it until the test says go
        from eegkd_jax import checkpoint

        real_enter = checkpoint.WorkdirLock.__enter__

        def enter(self):
            held = real_enter(self)
            while not os.path.exists(hold):
                time.sleep(0.05)
            return held
        checkpoint.WorkdirLock.__enter__ = enter
    from eegkd_jax.train import loop

    def main(argv):
        # announce as `eegkd train` passes it: the line on the screen
        result = loop.train_and_evaluate(run_config(), workdir,
                                         announce=lambda line: print(line, flush=True))
        (workdir / "result.json").write_text(json.dumps(result, sort_keys=True))

    app.run(common.report_errors(main), argv=["worker"], flags_parser=common.parse_flags)


def worker_env(compilation_cache, **extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
                XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="2",
                **extra)


def start_worker(workdir, env, fault=""):
    return subprocess.Popen([sys.executable, __file__, str(workdir)], env=dict(env, FAULT=fault),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=240):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# ------------------------------------------------------------------------------------- helpers
def _records(workdir):
    return [(r["step"], r["split"]) for r in
            (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())]


def _final_leaves(workdir, which="latest"):
    from eegkd_jax import checkpoint

    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    restored = ckpt.restore_raw(which)
    ckpt.close()
    return restored.step, [np.asarray(x) for x in jax.tree.leaves(
        (restored.state["params"], restored.state["opt_state"], restored.state["batch_stats"]))]


def assert_same_final_state(workdir, reference):
    step, got = _final_leaves(workdir)
    want_step, want = _final_leaves(reference)
    assert step == want_step == STEPS
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _tree_digest(directory, skip=("run.lock",)):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def _one_error_line(err):
    """The stderr of a command that failed on a user error: its last line, checked to be the only
    error output (no traceback, no shutdown noise after it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: "), err[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compilation_cache):
    """An uninterrupted run (in this process; it also fills the compilation cache the workers
    read) and its result. The in-memory pipeline stands in for the real one in this module."""
    import eegkd_jax.data
    from test_train import FakePipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "eegkd_jax.data.pipeline", FakePipeline)
        patch.setattr(eegkd_jax.data, "pipeline", FakePipeline, raising=False)
        from eegkd_jax.train import loop

        workdir = tmp_path_factory.mktemp("reference")
        yield workdir, loop.train_and_evaluate(run_config(), workdir)


@pytest.fixture
def fake_pipeline(reference, monkeypatch):
    import eegkd_jax.data
    from test_train import FakePipeline

    monkeypatch.setitem(sys.modules, "eegkd_jax.data.pipeline", FakePipeline)
    monkeypatch.setattr(eegkd_jax.data, "pipeline", FakePipeline, raising=False)
    return FakePipeline


# ------------------------------------------------------------------------------------- kills
def test_two_concurrent_starts_then_kills_at_five_moments(reference, fake_pipeline,
                                                          compilation_cache, tmp_path):
    """One workdir through a doubled start and five SIGKILLs; each rerun resumes, and the last
    ends bit-identical to the uninterrupted run."""
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop

    ref_dir, ref_result = reference
    env = worker_env(compilation_cache)
    workdir = tmp_path / "run"
    ckpts = checkpoint.checkpoint_dir(workdir)

    def steps():
        return checkpoint.Checkpointer(workdir, read_only=True).all_steps()

    def leftovers():
        return sorted(p.name for p in ckpts.iterdir() if not p.name.isdigit()
                      and p.name != "config.json")

    # 1. two runs started at once: whichever gets the lock holds it until the other is done; the
    #    other refuses in one line naming the holder's pid and host. The holder is then killed
    #    during its first step (batches paced so that no save can come first): nothing saved, and
    #    the lock file names a dead process.
    go = tmp_path / "go"
    pair = [start_worker(workdir, dict(env, HOLD_UNTIL=str(go), PAUSE="0.2"), "first-step")
            for _ in range(2)]
    deadline = time.time() + 240
    while all(p.poll() is None for p in pair) and time.time() < deadline:
        time.sleep(0.05)
    loser = next(p for p in pair if p.poll() is not None)
    holder = next(p for p in pair if p is not loser)
    code, _, err = finish(loser)
    assert code == 1, err[-3000:]
    line = _one_error_line(err)
    assert f"is in use by pid {holder.pid} on host " in line, line
    go.touch()
    code, out, err = finish(holder)
    assert code == -signal.SIGKILL, err[-3000:]
    assert out == f"starting fresh: no checkpoint in {ckpts}; 6 steps to train\n"
    assert not ckpts.exists() or steps() == []
    assert json.loads((workdir / "run.lock").read_text())["pid"] == holder.pid

    # 2. inside orbax's write of step 2: a half-written 2.tmp, no step 2.
    code, _, err = finish(start_worker(workdir, env, "orbax-write:2"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert steps() == [] and leftovers() == ["2.tmp"]

    # 3. when step 4's files and manifest are written, before the commit: step 2 saved (the
    #    leftover 2.tmp removed first), 4.tmp complete but not committed.
    code, _, err = finish(start_worker(workdir, env, "commit:4"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert steps() == [2] and leftovers() == ["4.tmp"]

    # 4. right after step 5's record: the log runs past the last checkpoint; then a power loss
    #    tears a half line onto its end.
    code, out, err = finish(start_worker(workdir, env, "log:5"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert out == f"resumed from step 2 of 6: checkpoint {ckpts / '2'}\n"
    assert steps() == [2, 4] and _records(workdir)[-1] == (5, "train")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "split": "tr')

    # 5. in the middle of pruning step 2 after step 6 was saved.
    code, out, err = finish(start_worker(workdir, env, "prune:6"))
    assert code == -signal.SIGKILL, err[-3000:]
    assert "dropping its last line" in err
    assert out == f"resumed from step 4 of 6: checkpoint {ckpts / '4'}\n"
    assert steps() == [4, 6] and leftovers() == ["2.deleting"]

    # The last rerun (here, in this process) finds the run finished and reports what the
    # uninterrupted run reported, with the same weights and the same log.
    said = []
    assert loop.train_and_evaluate(run_config(), workdir, announce=said.append) == ref_result
    assert said == [f"resumed from step 6 of 6: checkpoint {ckpts / '6'} (training is finished; "
                    "validating it again)"]
    assert leftovers() == []
    assert_same_final_state(workdir, ref_dir)
    assert _records(workdir) == _records(ref_dir)


def test_a_torn_tail_of_random_bytes_is_dropped_on_resume(reference, fake_pipeline, tmp_path,
                                                           caplog):
    """Random bytes torn onto the log's end, with the characters str.splitlines also splits at
    (\\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85) among them: dropped with a warning, as a torn half
    record is, and the run resumes to the same end."""
    import logging

    from eegkd_jax.train import loop

    ref_dir, ref_result = reference
    rng = random.Random(27)
    for trial in range(4):
        workdir = tmp_path / f"run{trial}"
        shutil.copytree(ref_dir, workdir)
        separators = [b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", "\x85".encode()]
        tail = bytearray(rng.randbytes(40).replace(b"\n", b"x"))
        for separator in rng.sample(separators, 3):
            at = rng.randrange(len(tail))
            tail[at:at] = separator
        with (workdir / "metrics.jsonl").open("ab") as f:
            f.write(b'{"step": 7, "split": "tr' + bytes(tail))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert loop.train_and_evaluate(run_config(), workdir) == ref_result
        assert "dropping its last line" in caplog.text
        assert _records(workdir) == _records(ref_dir)


# ------------------------------------------------------------------------------------- damage
def _damage_kinds():
    """(name, function(step directory)) for ten kinds of damage to a step."""
    def biggest(d):  # the largest file of array data (tensorstore's OCDBT chunks)
        return max((p for p in (d / "state" / "ocdbt.process_0" / "d").iterdir()),
                   key=lambda p: p.stat().st_size)

    def truncate(path, keep):
        path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])

    return [
        ("data file cut in half", lambda d: truncate(biggest(d), lambda n: n // 2)),
        ("data file emptied", lambda d: truncate(biggest(d), lambda n: 0)),
        ("data file deleted", lambda d: biggest(d).unlink()),
        ("orbax metadata cut short",
         lambda d: truncate(d / "state" / "_METADATA", lambda n: n - 7)),
        ("manifest deleted", lambda d: (d / "manifest.json").unlink()),
        ("manifest cut short", lambda d: truncate(d / "manifest.json", lambda n: n // 3)),
        ("metrics cut short", lambda d: truncate(d / "metrics.json", lambda n: 5)),
        ("config cut short", lambda d: truncate(d / "config.json", lambda n: n // 2)),
        ("state directory deleted", lambda d: shutil.rmtree(d / "state")),
        ("stray file added", lambda d: (d / "state" / "stray").write_bytes(b"x")),
    ]


def test_bit_flips_and_damage_are_caught_and_fall_back(reference, tmp_path, caplog):
    from eegkd_jax import checkpoint

    ref_dir, _ = reference
    src = checkpoint.checkpoint_dir(ref_dir)
    assert checkpoint.Checkpointer(ref_dir, read_only=True).all_steps() == [4, 6]
    _, previous = _final_leaves(ref_dir, 4)
    files = sorted(p.relative_to(src / "6").as_posix() for p in (src / "6").rglob("*")
                   if p.is_file())
    rng = random.Random(0)
    trials = [("bit flip", rng.choice(files), None) for _ in range(24)]
    trials += [(name, None, damage) for name, damage in _damage_kinds()]
    outcomes = []
    for i, (kind, rel, damage) in enumerate(trials):
        workdir = tmp_path / f"t{i}"
        shutil.copytree(src, checkpoint.checkpoint_dir(workdir))
        victim = checkpoint.checkpoint_dir(workdir) / "6"
        if damage is None:
            data = bytearray((victim / rel).read_bytes())
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            (victim / rel).write_bytes(bytes(data))
        else:
            damage(victim)
        caplog.clear()
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        restored = ckpt.restore_raw("latest")
        best = ckpt.best_step()
        ckpt.close()
        got = [np.asarray(x) for x in jax.tree.leaves((restored.state["params"],
                                                       restored.state["opt_state"],
                                                       restored.state["batch_stats"]))]
        exact = all(np.array_equal(a, b) for a, b in zip(got, previous))
        outcomes.append((kind, rel, restored.step, best, exact, "checkpoint step 6" in caplog.text))
    failed = [o for o in outcomes if o[2:] != (4, 4, True, True)]
    assert not failed, failed


def test_a_damaged_latest_step_resumes_from_the_one_before(reference, fake_pipeline, tmp_path):
    """A rerun over a damaged latest step resumes from the intact one before it and ends
    bit-identical; with every step damaged it refuses instead of starting over."""
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop

    ref_dir, ref_result = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    step_dir = checkpoint.checkpoint_dir(workdir) / "6"
    victim = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 4
    victim.write_bytes(bytes(data))
    assert loop.train_and_evaluate(run_config(), workdir) == ref_result
    assert_same_final_state(workdir, ref_dir)
    assert sorted(p.name for p in checkpoint.checkpoint_dir(workdir).iterdir()) == [
        "4", "6", "6.damaged", "config.json"]  # the damaged step kept aside for a look

    for step in (4, 6):
        (checkpoint.checkpoint_dir(workdir) / str(step) / "manifest.json").write_text("{")
    before = _tree_digest(workdir)
    with pytest.raises(checkpoint.CheckpointError, match="none passes its checks.*not starting "
                                                         "over"):
        loop.train_and_evaluate(run_config(), workdir)
    assert _tree_digest(workdir) == before


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value, problem", [
    ("depth", 2, r"params/\w+_1/.* is missing"),
    ("initial_filters", 4, r"params/.* has shape \(.*\), the model wants \(.*\)"),
])
def test_eval_of_a_step_whose_config_no_longer_fits_its_state(reference, fake_pipeline, tmp_path,
                                                              caplog, field, value, problem):
    """The step's config.json edited and its manifest rehashed, so that it passes its checks:
    eval refuses in one line naming the field and the step (not a flax traceback from inside
    apply), and the warning about checkpoints/config.json names the step's file as differing."""
    import logging

    from eegkd_jax import checkpoint, errors, evaluate

    ref_dir, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    step_dir = checkpoint.checkpoint_dir(workdir) / "6"
    saved = json.loads((step_dir / "config.json").read_text())
    was = saved["model"][field]
    saved["model"][field] = value
    (step_dir / "config.json").write_text(json.dumps(saved))
    (step_dir / "manifest.json").unlink()
    checkpoint.write_manifest(step_dir, 6)
    with caplog.at_level(logging.WARNING), pytest.raises(checkpoint.CheckpointError) as info:
        evaluate.evaluate_checkpoint(workdir, tmp_path / "out", checkpoint=6, floor=False)
    line = errors.one_line(info.value)
    assert re.fullmatch(
        rf"{step_dir}: the state saved at step 6 does not fit the network that its config.json "
        rf"describes \(model.{field} is {value} there, {was} in "
        rf"{checkpoint.checkpoint_dir(workdir)}/config.json\): {problem} and \d+ more; was that "
        r"config.json edited\?", line), line
    assert (f"{step_dir}/config.json, the config saved with step 6, and "
            f"{checkpoint.checkpoint_dir(workdir)}/config.json differ (model.{field} {value} vs "
            f"{was})") in caplog.text
    # predict and export restore through load_trained_model: the same one-line refusal
    from eegkd_jax import predict

    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"{step_dir}: the state saved at step 6 does not fit .*model.{field}"):
        predict.load_trained_model(workdir, 6)


def test_a_rerun_with_other_settings_refuses_before_writing(reference, fake_pipeline, tmp_path):
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop

    ref_dir, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    before = _tree_digest(workdir)
    changes = [
        ({"model.depth": 2}, "model.depth"),
        ({"data.sampling_rate": 16.0}, "data.sampling_rate"),
        ({"data.preprocess.bandpass_hz": (0.5, 3.0)}, "data.preprocess.bandpass_hz"),
        ({"data.ear_derivations": ("L_E", "L-R", "R_E")}, "data.ear_derivations"),
        ({"supervised_input": "scalp"}, "supervised_input"),
    ]
    for overrides, field in changes:
        with pytest.raises(checkpoint.ConfigMismatchError, match=rf"checkpoints/6 was trained "
                                                                 rf"with other settings.*{field}"):
            loop.train_and_evaluate(run_config(**overrides), workdir)
        assert _tree_digest(workdir) == before, field


# ------------------------------------------------------------------------------------- guard
def test_a_diverging_run_stops_before_saving_and_names_the_last_good_step(reference, fake_pipeline,
                                                                         tmp_path, monkeypatch):
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop, steps

    ref_dir, _ = reference
    # Resumed from step 4 at a learning rate of 1e20, one checkpoint per step.
    workdir = tmp_path / "lr"
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(checkpoint.checkpoint_dir(workdir) / "6")
    with pytest.raises(loop.DivergedError, match=r"training stopped .*the last good checkpoint "
                                                 r"is step 4 in") as info:
        loop.train_and_evaluate(run_config(**{"optimizer.learning_rate": 1e20,
                                              "checkpoint_every_steps": 1}), workdir)
    assert "\n" not in str(info.value)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.all_steps() == [4] and ckpt.best_step() == 4

    # A loss that jumps to ~1e12 from step 4 on (the loss of the state of step 3) and stays.
    real_build = steps.build_train_step

    def inflated(*args, **kwargs):
        step = real_build(*args, **kwargs)

        def wrapped(state, batch):
            new, metrics = step(state, batch)
            scale = jax.numpy.where(state.step >= 3, 1e12, 1.0)
            return new, dict(metrics, loss=metrics["loss"] * scale)
        return wrapped

    monkeypatch.setattr(steps, "build_train_step", inflated)
    with pytest.raises(loop.DivergedError, match=r"between steps 4 and 4: loss .* is over 1000 "
                                                 r"times its running level.*last good checkpoint "
                                                 r"is step 2.*divergence_factor"):
        loop.train_and_evaluate(run_config(), tmp_path / "jump")
    assert checkpoint.Checkpointer(tmp_path / "jump", read_only=True).all_steps() == [2]


def test_a_rejected_state_leaves_no_validation_record(reference, fake_pipeline, tmp_path,
                                                       monkeypatch):
    """Validated at every step: a state the pre-save checks reject (lr 1e20 on resume; NaN
    parameters from step 4 on, whose train loss is still finite) stops the run before it is
    scored, so neither metrics.jsonl nor TensorBoard holds a score of it."""
    import jax.numpy as jnp

    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop, steps

    ref_dir, _ = reference
    written = []
    real_write = loop._Logger.write

    def write(self, step, split, scalars):
        written.append((step, split))
        return real_write(self, step, split, scalars)

    monkeypatch.setattr(loop._Logger, "write", write)
    every_step = {"eval_every_steps": 1, "checkpoint_every_steps": 1}
    workdir = tmp_path / "lr"
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(checkpoint.checkpoint_dir(workdir) / "6")
    with pytest.raises(loop.DivergedError, match=r"training stopped at step 5: .*the last good "
                                                 r"checkpoint is step 4"):
        loop.train_and_evaluate(run_config(**{"optimizer.learning_rate": 1e20}, **every_step),
                                workdir)
    assert (5, "validation") not in written
    assert [r for r in _records(workdir) if r[1] == "validation"] == []
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [4]

    real_build = steps.build_train_step

    def poisoned(*args, **kwargs):
        step = real_build(*args, **kwargs)

        def wrapped(state, batch):
            new, metrics = step(state, batch)
            bad = jax.tree.map(lambda p: jnp.where(new.step >= 4, jnp.nan, p), new.params)
            return new.replace(params=bad), metrics
        return wrapped

    monkeypatch.setattr(steps, "build_train_step", poisoned)
    written.clear()
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"at step 4: non-finite values in \['params'.*last good checkpoint "
                             r"is step 3"):
        loop.train_and_evaluate(run_config(**every_step), tmp_path / "nan")
    assert (4, "validation") not in written and (3, "validation") in written
    assert [r for r in _records(tmp_path / "nan") if r[1] == "validation"] == [
        (1, "validation"), (2, "validation"), (3, "validation")]


# ------------------------------------------------------------------------------------- one line
def _cli(args, env, timeout=120):
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_user_mistakes_end_in_one_line(tmp_path, compilation_cache):
    env = worker_env(compilation_cache)
    supervised = next(p.relative_to(ROOT) for p in (
        ROOT / "eegkd_jax" / "configs" / "supervised.py", ROOT / "configs" / "supervised.py")
        if p.is_file())
    tiny = f"--config={supervised}:ear,tiny"
    cases = [
        (["eval.py", f"--workdir={tmp_path / 'missing'}"],
         rf"error: {tmp_path / 'missing'}/checkpoints: no such directory"),
        (["train.py", tiny, "--config.optimizer.learnin_rate=1", f"--workdir={tmp_path}"],
         r"error: --config.optimizer.learnin_rate: the config has no field 'learnin_rate'; did "
         r"you mean 'learning_rate'\?"),
        (["train.py", f"--config={supervised}:scalp,bogus", f"--workdir={tmp_path}"],
         rf"error: --config={supervised}:scalp,bogus: unknown config variant\(s\) "
         r"\['bogus'\]"),
        (["-m", "eegkd_jax.cli", "study", "--config.study.fold=1"],
         r"error: --config.study.fold: the config has no field 'fold'; did you mean 'folds'\?"),
        (["-m", "eegkd_jax.cli", "predict", f"--checkpoint={tmp_path / 'missing'}", "night.edf"],
         r"error: .*missing/checkpoints: no such directory"),
    ]
    for args, expected in cases:
        code, _, err = _cli(args, env)
        assert code == 1, (args, err[-3000:])
        assert re.fullmatch(expected + ".*", _one_error_line(err)), (args, err[-2000:])
    # --verbose adds the traceback.
    code, _, err = _cli(["train.py", tiny, "--config.optimizer.learnin_rate=1", "--verbose"], env)
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("error: ")


def _pages(path):
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in path.rglob("*") if p.is_file())


def test_a_full_disk_ends_in_one_line_and_keeps_the_earlier_steps(reference, fake_pipeline,
                                                                  compilation_cache, tmp_path):
    """The run writes to a small tmpfs (in a private mount namespace) that has no room for a
    second checkpoint: the command ends in one line, the earlier step is intact, and a rerun with
    space resumes and ends as the uninterrupted run did."""
    from eegkd_jax import checkpoint
    from eegkd_jax.train import loop

    ref_dir, ref_result = reference
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    step_size = _pages(checkpoint.checkpoint_dir(ref_dir) / "6")
    others = _pages(ref_dir) - 2 * step_size  # the log, the events, the lock, config.json
    # Room for the first save (orbax holds about 1.2 steps while it writes one), not for a
    # second step beside it: the space check refuses that one before writing.
    size_kib = (others + step_size * 22 // 10) // 1024
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} && "
              f"{sys.executable} {__file__} {mount}; code=$?; cp -a {mount} {out}; exit $code")
    env = worker_env(compilation_cache)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert "no space left on device" in line, line
    ckpt = checkpoint.Checkpointer(out, read_only=True)
    assert ckpt.intact_steps() == [2], ckpt.all_steps()
    assert loop.train_and_evaluate(run_config(), out) == ref_result
    assert_same_final_state(out, ref_dir)


if __name__ == "__main__":
    _worker_main(pathlib.Path(sys.argv[1]))
