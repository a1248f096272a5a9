"""Train steps of every mode on a tiny Flax model with batch norm and dropout (the models' call
contract): gradients flow where they should, the frozen teacher never changes, online KD updates two
optimiser states, and the configured loss is what the step minimises."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eegkd_jax.configs import common
from eegkd_jax import losses
from eegkd_jax.train import state as state_lib
from eegkd_jax.train import steps

SAMPLES = 16  # samples per "epoch" in these tests
SEQ = 2  # epochs per sequence
CHANNELS = 3


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> Dropout -> per-epoch mean -> Dense; features (B, L*S, F)."""

    features: int = 4
    epoch_samples: int = SAMPLES

    @nn.compact
    def __call__(self, x, train: bool = False):
        # No bias: a bias right before batch norm has a zero gradient, and Adam would turn its
        # float noise into full-size steps that differ between device layouts.
        h = nn.Conv(self.features, (3,), use_bias=False)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.relu(h)
        h = nn.Dropout(0.2, deterministic=not train)(h)
        b, t, f = h.shape
        pooled = h.reshape(b, t // self.epoch_samples, self.epoch_samples, f).mean(axis=2)
        return nn.Dense(5)(pooled), h


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def tiny_config(mode, **kd):
    config = common.get_config()
    config.mode = mode
    config.kd.update(kd)
    return config


def tiny_batch(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, (batch, SEQ)).astype(np.int32)
    labels[0, 1] = -1
    return {
        "scalp": jnp.asarray(rng.normal(size=(batch, SEQ * SAMPLES, CHANNELS)), jnp.float32),
        "ear": jnp.asarray(rng.normal(size=(batch, SEQ * SAMPLES, CHANNELS)), jnp.float32),
        "labels": jnp.asarray(labels),
    }


def init_fn(module, features=4):
    return lambda key: module.init({"params": key, "dropout": key},
                                   jnp.zeros((1, SEQ * SAMPLES, CHANNELS)), train=False)


def make_state(config, student, teacher=None, teacher_trained=False):
    tx = state_lib.make_optimizer(config.optimizer, 100)
    state = state_lib.create_state(
        jax.random.PRNGKey(0), init_fn(student), tx,
        init_teacher=init_fn(teacher) if teacher else None,
        teacher_tx=tx if teacher_trained else None)
    return state, tx


def _changed(a, b):
    return [bool(np.any(np.asarray(x) != np.asarray(y)))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def test_supervised_step_updates_params_and_batch_stats_and_masks_labels():
    config = tiny_config("supervised")
    net = TinyNet()
    state, tx = make_state(config, net)
    step = jax.jit(steps.build_train_step(config, student=net, tx=tx))
    batch = tiny_batch()
    new, metrics = step(state, batch)
    assert int(new.step) == 1
    assert all(_changed(state.params, new.params))
    assert all(_changed(state.batch_stats, new.batch_stats))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    # The reported loss is the masked CE of the training-mode forward pass with this step's key.
    (logits, _), _ = net.apply({"params": state.params, "batch_stats": state.batch_stats},
                               batch["ear"], train=True, rngs={"dropout": state.step_key()},
                               mutable=["batch_stats"])
    want = losses.masked_cross_entropy(logits, batch["labels"])
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)


def test_supervised_input_selects_the_signal():
    net = TinyNet()
    config = tiny_config("supervised")
    batch = tiny_batch()
    losses_by_input = {}
    for signal in ("scalp", "ear"):
        config.supervised_input = signal
        state, tx = make_state(config, net)
        _, m = jax.jit(steps.build_train_step(config, student=net, tx=tx))(state, batch)
        losses_by_input[signal] = float(m["loss"])
    assert losses_by_input["scalp"] != losses_by_input["ear"]
    config.supervised_input = "eeg"
    with pytest.raises(ValueError, match="supervised_input"):
        steps.build_train_step(config, student=net, tx=None)


def test_offline_kd_never_touches_the_teacher():
    config = tiny_config("offline_kd", feature_weight=1.0, response_weight=0.5)
    student, teacher = TinyNet(), TinyNet()
    state, tx = make_state(config, student, teacher)
    assert state.teacher_opt_state is None  # frozen teacher: no optimiser state at all
    step = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher))
    new = state
    for i in range(2):
        new, metrics = step(new, tiny_batch(i))
    assert not any(_changed(state.teacher_params, new.teacher_params))
    assert not any(_changed(state.teacher_batch_stats, new.teacher_batch_stats))
    assert all(_changed(state.params, new.params))
    m = {k: float(v) for k, v in metrics.items()}
    assert m["feature_mse"] > 0 and m["kl"] > 0
    assert m["loss"] == pytest.approx(m["ce"] + 1.0 * m["feature_mse"] + 0.5 * m["kl"], rel=1e-5)


def test_offline_kd_loss_terms_switch_off_and_gradients_differ():
    student, teacher = TinyNet(), TinyNet()
    batch = tiny_batch()
    grads = {}
    for fw in (0.0, 1.0):
        config = tiny_config("offline_kd", feature_weight=fw, response_weight=0.0)
        state, tx = make_state(config, student, teacher)
        new, m = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher))(
            state, batch)
        grads[fw] = float(m["grad_norm"])
        if fw == 0.0:
            assert float(m["loss"]) == pytest.approx(float(m["ce"]))
    assert grads[0.0] != grads[1.0]


def test_unpaired_control_gives_each_ear_window_another_windows_targets():
    """kd.unpaired: the feature MSE is against the teacher's features of window i - 1, never of
    the window's own scalp twin; with the pairing kept the two MSEs below would be equal."""
    student, teacher = TinyNet(), TinyNet()
    batch = tiny_batch(batch=4)
    mse = {}
    for unpaired in (False, True):
        config = tiny_config("offline_kd", feature_weight=1.0, response_weight=0.0,
                             unpaired=unpaired)
        state, tx = make_state(config, student, teacher)
        _, m = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher))(
            state, batch)
        mse[unpaired] = float(m["feature_mse"])
    t_vars = {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats}
    _, t_feats = teacher.apply(t_vars, batch["scalp"], train=False)
    (_, s_feats), _ = student.apply({"params": state.params, "batch_stats": state.batch_stats},
                                    batch["ear"], train=True, rngs={"dropout": state.step_key()},
                                    mutable=["batch_stats"])
    paired = losses.feature_mse(s_feats, t_feats, batch["labels"], "sample")
    rolled = losses.feature_mse(s_feats, jnp.roll(t_feats, 1, axis=0), batch["labels"], "sample")
    assert mse[False] == pytest.approx(float(paired), rel=1e-5)
    assert mse[True] == pytest.approx(float(rolled), rel=1e-5)
    assert abs(mse[True] - mse[False]) > 1e-3 * mse[False]


def test_feature_shape_mismatch_is_a_clear_error_unless_weight_zero():
    student, teacher = TinyNet(features=4), TinyNet(features=6)
    batch = tiny_batch()
    config = tiny_config("offline_kd", feature_weight=1.0)
    state, tx = make_state(config, student, teacher)
    with pytest.raises(ValueError, match="feature_weight=0"):
        jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher))(state, batch)
    config = tiny_config("offline_kd", feature_weight=0.0, response_weight=1.0)
    _, m = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher))(
        state, batch)
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("variant", ["original", "mutual"])
def test_online_kd_updates_both_with_two_optimizer_states(variant):
    config = tiny_config("online_kd", variant=variant, feature_weight=1.0, response_weight=1.0)
    student, teacher = TinyNet(), TinyNet()
    state, tx = make_state(config, student, teacher, teacher_trained=True)
    step = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher,
                                          teacher_tx=tx))
    batch = tiny_batch()
    new, m = step(state, batch)
    assert all(_changed(state.params, new.params))
    assert all(_changed(state.teacher_params, new.teacher_params))
    # Two separate Adam states, each counting its own step and holding its own moments.
    counts = [int(leaf) for leaf in jax.tree.leaves(new.opt_state) if np.ndim(leaf) == 0]
    assert counts and all(c == 1 for c in counts)
    assert _changed(new.opt_state, new.teacher_opt_state)
    m = {k: float(v) for k, v in m.items()}
    if variant == "original":
        assert m["teacher_kl"] == 0.0 and m["teacher_loss"] == pytest.approx(m["teacher_ce"])
    else:
        assert m["teacher_kl"] > 0
        assert m["teacher_loss"] == pytest.approx(m["teacher_ce"] + m["teacher_kl"], rel=1e-5)


def test_online_kd_original_teacher_learns_from_labels_only():
    """The teacher's update must equal a supervised scalp step's update (same key and batch):
    no gradient leaks from the student's distillation terms into it."""
    student, teacher = TinyNet(), TinyNet()
    batch = tiny_batch()
    config = tiny_config("online_kd", variant="original", feature_weight=1.0, response_weight=1.0)
    state, tx = make_state(config, student, teacher, teacher_trained=True)
    online = jax.jit(steps.build_train_step(config, student=student, tx=tx, teacher=teacher,
                                            teacher_tx=tx))
    _, m = online(state, batch)

    # Teacher gradient norm from the supervised CE with the key the online step gave the teacher.
    t_key, _ = jax.random.split(state.step_key())

    def teacher_ce(p):
        (logits, _), _ = teacher.apply({"params": p, "batch_stats": state.teacher_batch_stats},
                                       batch["scalp"], train=True, rngs={"dropout": t_key},
                                       mutable=["batch_stats"])
        return losses.masked_cross_entropy(logits, batch["labels"])

    g = jax.grad(teacher_ce)(state.teacher_params)
    np.testing.assert_allclose(float(m["teacher_grad_norm"]),
                               float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))),
                               rtol=1e-4)


def test_mutual_needs_a_response_weight_and_unknown_modes_fail():
    net = TinyNet()
    with pytest.raises(ValueError, match="response_weight"):
        steps.build_train_step(tiny_config("online_kd", variant="mutual", response_weight=0.0),
                               student=net, tx=None, teacher=net, teacher_tx=None)
    with pytest.raises(ValueError, match="variant"):
        steps.build_train_step(tiny_config("online_kd", variant="both"), student=net, tx=None)
    with pytest.raises(ValueError, match="mode"):
        steps.build_train_step(tiny_config("semi"), student=net, tx=None)


def test_eval_step_predicts_without_touching_state():
    config = tiny_config("online_kd")
    student, teacher = TinyNet(), TinyNet()
    state, _ = make_state(config, student, teacher, teacher_trained=True)
    batch = dict(tiny_batch(), subject=jnp.arange(4), epoch=jnp.zeros(4, jnp.int32),
                 valid=jnp.ones(4, bool))
    out = jax.jit(functools.partial(steps.eval_step, student=student, input_key="ear",
                                    teacher=teacher))(state, batch)
    assert out["prediction"].shape == (4, SEQ) and out["teacher_prediction"].shape == (4, SEQ)
    np.testing.assert_array_equal(out["subject"], np.arange(4))
    # Deterministic: eval mode, no dropout.
    out2 = jax.jit(functools.partial(steps.eval_step, student=student, input_key="ear",
                                     teacher=teacher))(state, batch)
    np.testing.assert_array_equal(out["prediction"], out2["prediction"])


def test_optimizer_matches_torch_adam_with_l2_weight_decay():
    """One step of our Adam on a quadratic equals the closed form of torch.optim.Adam with
    weight_decay (L2 added to the gradient before the moments)."""
    opt = common.get_config().optimizer
    tx = state_lib.make_optimizer(opt, 10)
    # Two arrays of different shapes, each updated from its own gradient.
    p = {"w": jnp.array([1.0, -2.0]), "k": jnp.array([[3.0, 0.5, -1.0], [2.0, -4.0, 0.25]])}
    g = {"w": jnp.array([0.5, 0.25]), "k": jnp.array([[-1.0, 2.0, 0.5], [0.125, 4.0, -3.0]])}
    updates, _ = tx.update(g, tx.init(p), p)
    for name in p:
        grad = np.asarray(g[name]) + opt.weight_decay * np.asarray(p[name])
        m_hat = grad  # first step: bias-corrected moments are the gradient and its square
        v_hat = grad ** 2
        want = -opt.learning_rate * m_hat / (np.sqrt(v_hat) + opt.eps)
        np.testing.assert_allclose(np.asarray(updates[name]), want, rtol=1e-5)


def test_schedules():
    opt = ml_collections.ConfigDict(common.get_config().optimizer.to_dict())
    opt.schedule, opt.warmup_steps = "cosine", 10
    lr = state_lib.make_schedule(opt, 100)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(opt.learning_rate)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
    opt.schedule = "constant"
    lr = state_lib.make_schedule(opt, 100)
    assert float(lr(5)) == pytest.approx(opt.learning_rate / 2)
    assert float(lr(50)) == pytest.approx(opt.learning_rate)
    opt.schedule = "step"
    with pytest.raises(ValueError, match="schedule"):
        state_lib.make_schedule(opt, 100)
