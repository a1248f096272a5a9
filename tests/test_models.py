"""Tests of the Flax models: sizes against the original, shapes, train/eval behaviour, gradients.

Compiling the full-size U-Sleep is what costs time on CPU, so the full configs are used where the
size itself is the point (parameter counts through ``jax.eval_shape``, one forward each), and small
versions of the same modules (lower depth, short epochs, narrow transformer) for the behaviour
tests.
Every compiled function is built once per module through fixtures.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eegkd_jax.configs import common
from eegkd_jax import models
from eegkd_jax.models import usleep as usleep_lib


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _cfg(name, **overrides):
    cfg = common.MODELS[name]()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _signal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


class Compiled:
    """A module with its variables and jitted init / eval / train functions (one compile each per
    input shape). Both applies return ((logits, features), {"batch_stats": ...})."""

    def __init__(self, module, input_shape, seed=0):
        self.module = module
        self.init = jax.jit(lambda r: models.init_variables(module, r, input_shape))
        self.variables = self.init(jax.random.key(seed))
        self.eval = jax.jit(
            lambda v, x, key: module.apply(
                v, x, train=False, rngs={"dropout": key}, mutable=["batch_stats"]
            )
        )
        self.train = jax.jit(
            lambda v, x, key: module.apply(
                v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
        )

    def logits_features(self, x, key=0):
        """Eval-mode (logits, features)."""
        return self.eval(self.variables, x, jax.random.key(key))[0]


def _assert_every_param_has_gradient(compiled, x):
    """Differentiates a train-mode loss touching logits and features; every leaf must move."""
    params, stats = compiled.variables["params"], compiled.variables["batch_stats"]

    @jax.jit
    def grads(p):
        def loss(p):
            (logits, features), _ = compiled.module.apply(
                {"params": p, "batch_stats": stats}, x, train=True,
                rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"],
            )
            weights = jax.random.normal(jax.random.key(4), logits.shape)
            return jnp.sum(logits * weights) + jnp.mean(features**2)

        return jax.grad(loss)(p)

    g = grads(params)
    dead = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(g)
        if not bool(jnp.all(jnp.isfinite(leaf))) or not bool(jnp.any(leaf != 0))
    ]
    assert not dead, f"parameters with zero or non-finite gradient: {dead}"


# ----------------------------------------------------------------------------- U-Sleep, full size


def test_usleep_widths_match_the_original():
    assert usleep_lib.usleep_widths(12, 5, 1.67) == (
        6, 9, 11, 15, 20, 28, 40, 55, 77, 108, 152, 214, 302,
    )


def test_usleep_parameter_count_matches_the_original():
    module = models.build_model(_cfg("usleep"), in_channels=3, sampling_rate=200.0)
    shapes = jax.eval_shape(
        lambda r: models.init_variables(module, r, (1, 6000, 3)), jax.random.key(0)
    )
    assert models.count_params(shapes) == 3_114_391
    assert set(shapes) == {"params", "batch_stats"}
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    # 12 encoder blocks, the bottom, 12 decoder blocks and the classifier, named as in the original.
    top = set(shapes["params"])
    assert top == {f"encoder_{i}" for i in range(12)} | {f"decoder_{i}" for i in range(12)} | {
        "bottom", "classifier"}


def test_initial_weights_follow_pytorchs_default_limits():
    """Every conv kernel and bias lies in +-1/sqrt(fan_in), spreads over it as a uniform does, and
    no two parameters share numbers."""
    module = usleep_lib.USleep(in_channels=3, widths=(4, 6, 8, 10), epoch_samples=256)
    params = jax.jit(lambda r: models.init_variables(module, r, (1, 256, 3)))(
        jax.random.key(3))["params"]
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        leaf = np.asarray(leaf)
        if "bn" in name:
            expected = 1.0 if name.endswith("['scale']") else 0.0
            np.testing.assert_array_equal(leaf, expected, err_msg=name)
            continue
        kernel = params
        for key in path[:-1]:
            kernel = kernel[key.key]
        fan_in = int(np.prod(kernel["kernel"].shape[:-1]))
        limit = 1.0 / np.sqrt(fan_in)
        assert np.all(np.abs(leaf) <= limit), name
        if leaf.size >= 200:
            assert abs(leaf.std() - limit / np.sqrt(3.0)) < 0.15 * limit, name
            assert abs(leaf.mean()) < 0.15 * limit, name
        first = tuple(np.round(leaf.ravel()[:4] / limit, 6))
        assert first not in seen, f"{name} repeats another parameter's numbers"
        seen.add(first)


def test_initialisation_is_a_function_of_the_key():
    from eegkd_jax.models import layers

    module = usleep_lib.USleep(in_channels=3, widths=(4, 6, 8), epoch_samples=128)
    init = jax.jit(lambda r: models.init_variables(module, r, (1, 128, 3)))
    a, b, c = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(1))
    for x, y, z in zip(*(jax.tree_util.tree_leaves(v["params"]) for v in (a, b, c))):
        np.testing.assert_array_equal(x, y)
        if x.size > 1 and np.any(x != 1.0) and np.any(x != 0.0):
            assert np.any(np.asarray(x) != np.asarray(z))
    key = jax.random.key(4)
    np.testing.assert_array_equal(
        layers.torch_kernel_init(key, (9, 4, 6)),
        jax.random.uniform(key, (9, 4, 6), minval=-1 / 6.0, maxval=1 / 6.0))


@pytest.mark.parametrize("epochs", [1, 3])
def test_usleep_full_size_output_shapes(epochs):
    """Shapes only (traced, not compiled) for single epochs and a 3-epoch sequence."""
    module = models.build_model(_cfg("usleep"), in_channels=3)
    variables = jax.eval_shape(
        lambda r: models.init_variables(module, r, (1, 6000, 3)), jax.random.key(0)
    )
    x = jax.ShapeDtypeStruct((2, epochs * 6000, 3), jnp.float32)
    (logits, features), updates = jax.eval_shape(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert logits.shape == (2, epochs, 5) and logits.dtype == jnp.float32
    assert features.shape == (2, epochs * 6000, 6) and features.dtype == jnp.float32
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"])


def test_usleep_full_size_forward_single_epoch():
    module = models.build_model(_cfg("usleep"), in_channels=3)
    compiled = Compiled(module, (2, 6000, 3))
    logits, features = compiled.logits_features(_signal(0, (2, 6000, 3)))
    assert logits.shape == (2, 1, 5) and logits.dtype == jnp.float32
    assert features.shape == (2, 6000, 6) and features.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


# ----------------------------------------------------------------------------- U-Sleep, small

# depth 4 with 50-sample epochs: a 3-epoch sequence is 150 samples -> 75 -> 38 (odd: padded)
# -> 19 -> 10 (odd: padded), so both the padding and the decoder's crop are exercised.
SMALL_RATE, SMALL_EPOCH_S = 10.0, 5.0
SMALL_S = 50


@pytest.fixture(scope="module")
def usleep_small():
    module = models.build_model(
        _cfg("usleep", depth=4), in_channels=3, sampling_rate=SMALL_RATE,
        epoch_seconds=SMALL_EPOCH_S,
    )
    return Compiled(module, (2, 3 * SMALL_S, 3))


def test_usleep_sequence_shapes(usleep_small):
    x = _signal(1, (2, 3 * SMALL_S, 3))
    logits, features = usleep_small.logits_features(x)
    assert logits.shape == (2, 3, 5)
    assert features.shape == (2, 3 * SMALL_S, usleep_small.module.widths[0])


def test_usleep_logits_pool_each_epoch_separately(usleep_small):
    """The classifier averages tanh(1x1 conv) over each epoch's own samples, then two 1x1 convs."""
    x = _signal(2, (2, 3 * SMALL_S, 3))
    logits, features = usleep_small.logits_features(x)
    p = usleep_small.variables["params"]["classifier"]
    h = np.tanh(np.asarray(features) @ p["segment_conv"]["kernel"] + p["segment_conv"]["bias"])
    pooled = h.reshape(2, 3, SMALL_S, -1).mean(axis=2)
    hidden = pooled @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    hidden = np.where(hidden > 0, hidden, np.expm1(hidden))  # ELU
    expected = hidden @ p["logits"]["kernel"] + p["logits"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_usleep_sequence_context_reaches_other_epochs(usleep_small):
    """A U-Net sees across epoch boundaries: changing epoch 0 changes the logits of epoch 1."""
    x = _signal(3, (2, 3 * SMALL_S, 3))
    base, _ = usleep_small.logits_features(x)
    changed, _ = usleep_small.logits_features(x.at[:, :SMALL_S].add(3.0))
    assert not np.allclose(base[:, 1], changed[:, 1])


def test_max_pool_pads_odd_lengths_with_a_leading_zero():
    x = jnp.asarray([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]]).T[None]  # (1, 3, 2)
    pooled = usleep_lib._max_pool_by_two(x)
    np.testing.assert_array_equal(pooled[0], [[1.0, 0.0], [3.0, -2.0]])
    even = usleep_lib._max_pool_by_two(jnp.arange(4.0).reshape(1, 4, 1))
    np.testing.assert_array_equal(even[0, :, 0], [1.0, 3.0])


def test_usleep_is_deterministic(usleep_small):
    x = _signal(4, (2, 3 * SMALL_S, 3))
    a = usleep_small.logits_features(x)
    b = usleep_small.logits_features(x, key=1)  # no randomness in U-Sleep, whatever the key
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    again = usleep_small.init(jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, usleep_small.variables)
    other = usleep_small.init(jax.random.key(1))
    assert not np.allclose(other["params"]["bottom"]["conv"]["kernel"],
                           again["params"]["bottom"]["conv"]["kernel"])


def _conv_same(x, kernel, bias):
    """numpy 'same' 1-D convolution (cross-correlation) of (B, T, Cin) with (K, Cin, Cout)."""
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))
    windows = np.stack([padded[:, i : i + x.shape[1]] for i in range(k)], axis=2)  # B, T, K, Cin
    return np.einsum("btkc,kco->bto", windows, kernel) + bias


def test_usleep_batch_stats_move_in_training_only(usleep_small):
    x = _signal(5, (2, 3 * SMALL_S, 3)) * 2.0 + 1.0
    v = usleep_small.variables
    (train_logits, _), updates = usleep_small.train(v, x, jax.random.key(0))
    old = v["batch_stats"]["encoder_0"]["bn"]
    new = updates["batch_stats"]["encoder_0"]["bn"]
    # PyTorch momentum 0.1: the running mean moves a tenth of the way to the batch mean of
    # ELU(conv(x)) over batch and time ...
    conv = v["params"]["encoder_0"]["conv"]
    pre_bn = _conv_same(np.asarray(x), np.asarray(conv["kernel"]), np.asarray(conv["bias"]))
    activations = np.where(pre_bn > 0, pre_bn, np.expm1(pre_bn)).reshape(-1, pre_bn.shape[-1])
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * activations.mean(axis=0),
                               rtol=1e-4, atol=1e-6)
    # ... and the running variance towards the unbiased batch variance, as in PyTorch.
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * activations.var(axis=0, ddof=1),
                               rtol=1e-4, atol=1e-6)
    # Evaluation uses the running averages and leaves them alone.
    (eval_logits, _), eval_updates = usleep_small.eval(v, x, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, eval_updates["batch_stats"],
                           v["batch_stats"])
    assert not np.allclose(train_logits, eval_logits)


def test_usleep_gradients_reach_every_parameter(usleep_small):
    _assert_every_param_has_gradient(usleep_small, _signal(6, (2, 3 * SMALL_S, 3)))


def test_usleep_bfloat16_compute_keeps_float32_params_and_outputs(usleep_small):
    module = models.build_model(
        _cfg("usleep", depth=4, dtype="bfloat16"), in_channels=3, sampling_rate=SMALL_RATE,
        epoch_seconds=SMALL_EPOCH_S,
    )
    x = _signal(7, (2, 3 * SMALL_S, 3))
    # Same parameters as the float32 model: only the arithmetic changes.
    logits, features = jax.jit(lambda v, x: module.apply(v, x, train=False))(
        usleep_small.variables, x
    )
    reference, _ = usleep_small.logits_features(x)
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, reference, atol=0.1)
    shapes = jax.eval_shape(
        lambda r: models.init_variables(module, r, (1, SMALL_S, 3)), jax.random.key(0)
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}


def test_usleep_rejects_bad_inputs_and_settings(usleep_small):
    v = usleep_small.variables
    with pytest.raises(ValueError, match="whole number"):
        usleep_small.module.apply(v, jnp.zeros((1, SMALL_S + 7, 3)))
    with pytest.raises(ValueError, match="expects input"):
        usleep_small.module.apply(v, jnp.zeros((1, SMALL_S, 2)))
    even = models.build_model(_cfg("usleep", depth=2, kernel_size=8), in_channels=3,
                              sampling_rate=SMALL_RATE, epoch_seconds=SMALL_EPOCH_S)
    with pytest.raises(ValueError, match="odd"):
        models.init_variables(even, jax.random.key(0), (1, SMALL_S, 3))


# ----------------------------------------------------------------------------- transformer


def test_cmt_parameter_count_matches_the_original():
    module = models.build_model(_cfg("cmt"), in_channels=3)
    shapes = jax.eval_shape(
        lambda r: models.init_variables(module, r, (1, 6000, 3)), jax.random.key(0)
    )
    assert models.count_params(shapes) == 2_958_853
    assert set(shapes) == {"params", "batch_stats"}


@pytest.fixture(scope="module")
def cmt_full():
    return Compiled(models.build_model(_cfg("cmt"), in_channels=3), (2, 6000, 3))


def test_cmt_full_size_shapes(cmt_full):
    logits, features = cmt_full.logits_features(_signal(8, (2, 6000, 3)))
    assert logits.shape == (2, 1, 5) and logits.dtype == jnp.float32
    assert features.shape == (2, 768) and features.dtype == jnp.float32


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_cmt_every_channel_changes_the_output(cmt_full, channel):
    """Each branch reads its own channel (the original fed channel 0 to the third branch)."""
    x = _signal(9, (2, 6000, 3))
    base_logits, base_features = cmt_full.logits_features(x)
    bumped = x.at[:, :, channel].set(_signal(10 + channel, (2, 6000)))
    logits, features = cmt_full.logits_features(bumped)
    assert not np.allclose(base_features, features)
    assert not np.allclose(base_logits, logits)


# A narrow transformer (same layers, 10 tokens of 50 samples) for the behaviour tests.
@pytest.fixture(scope="module")
def cmt_small():
    module = models.build_model(
        _cfg("cmt", d_model=32, num_heads=4, d_ff=64), in_channels=3, sampling_rate=100.0,
        epoch_seconds=5.0,
    )
    return Compiled(module, (2, 500, 3))


def test_cmt_dropout_only_in_training(cmt_small):
    x = _signal(11, (2, 500, 3))
    v = cmt_small.variables
    a, _ = cmt_small.train(v, x, jax.random.key(1))
    b, _ = cmt_small.train(v, x, jax.random.key(2))
    c, _ = cmt_small.train(v, x, jax.random.key(1))
    assert not np.allclose(a[0], b[0]), "different dropout keys must give different outputs"
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, c)
    jax.tree_util.tree_map(np.testing.assert_array_equal, cmt_small.logits_features(x, key=1),
                           cmt_small.logits_features(x, key=2))


def test_cmt_batch_stats_move_in_training_only(cmt_small):
    x = _signal(12, (2, 500, 3)) + 0.5
    v = cmt_small.variables
    _, updates = cmt_small.train(v, x, jax.random.key(0))
    changed = jax.tree_util.tree_map(
        lambda a, b: not np.allclose(a, b), updates["batch_stats"], v["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(changed))
    _, eval_updates = cmt_small.eval(v, x, jax.random.key(0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, eval_updates["batch_stats"],
                           v["batch_stats"])


def test_cmt_gradients_reach_every_parameter(cmt_small):
    _assert_every_param_has_gradient(cmt_small, _signal(13, (2, 500, 3)))


def test_cmt_trains_on_a_batch_of_one(cmt_small):
    (logits, features), _ = jax.jit(
        lambda v, x: cmt_small.module.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)},
                                            mutable=["batch_stats"])
    )(cmt_small.variables, _signal(14, (1, 500, 3)))
    assert logits.shape == (1, 1, 5) and features.shape == (1, 96)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_cmt_bfloat16(cmt_small):
    module = models.build_model(
        _cfg("cmt", d_model=32, num_heads=4, d_ff=64, dtype="bfloat16"), in_channels=3,
        sampling_rate=100.0, epoch_seconds=5.0,
    )
    x = _signal(15, (2, 500, 3))
    logits, features = jax.jit(lambda v, x: module.apply(v, x, train=False))(
        cmt_small.variables, x
    )
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    reference, _ = cmt_small.logits_features(x)
    np.testing.assert_allclose(logits, reference, atol=0.15)


def test_cmt_takes_one_epoch_only(cmt_small):
    with pytest.raises(ValueError, match="one epoch at a time"):
        cmt_small.module.apply(cmt_small.variables, jnp.zeros((1, 1000, 3)))


# ----------------------------------------------------------------------------- registry


def test_build_model_reads_rate_and_epoch_length():
    module = models.build_model(_cfg("usleep"), in_channels=2, sampling_rate=100.0)
    assert module.epoch_samples == 3000 and module.in_channels == 2
    assert models.build_model(_cfg("cmt"), in_channels=3).dtype == jnp.float32


def test_build_model_rejects_unknown_names_and_fractional_epochs():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model(ml_collections.ConfigDict({"name": "resnet"}), in_channels=3)
    with pytest.raises(ValueError, match="whole number"):
        models.build_model(_cfg("usleep"), in_channels=3, sampling_rate=200.5, epoch_seconds=30.1)
    with pytest.raises(ValueError, match="dtype"):
        models.build_model(_cfg("usleep", dtype="float8"), in_channels=3)


# ----------------------------------------------------------------------------- PyTorch parity
#
# Golden outputs of the PyTorch reference networks (benchmarks/torch_reference/models.py, the
# braindecode-style U-Sleep and the original's transformer with the third branch on channel 3),
# computed once with torch 2.13 on the variables and inputs below after mapping the parameter names
# (PyTorch (out, in, k) conv weights -> our (k, in, out), stacked q/k/v -> per-head kernels). They
# pin down what the parameter count cannot: padding of odd lengths, crop side, pooling windows,
# layer order, attention and norm placement.


def _golden_models():
    """name -> (module, input shape): a depth-3 U-Sleep over 2 epochs of 45 samples (two odd
    levels: 45 and 23) and a narrow 3-branch transformer over one 500-sample epoch."""
    usleep = models.build_model(_cfg("usleep", depth=3), in_channels=3, sampling_rate=9.0,
                                epoch_seconds=5.0)
    cmt = models.build_model(_cfg("cmt", d_model=32, num_heads=4, d_ff=64), in_channels=3,
                             sampling_rate=100.0, epoch_seconds=5.0)
    return {"usleep": (usleep, (2, 90, 3)), "cmt": (cmt, (2, 500, 3))}


def _golden_input(shape):
    return np.random.default_rng(11).standard_normal(shape).astype(np.float32)


def _numpy_variables(module, shape, seed):
    """Variables of ``module`` filled from numpy's PCG64 (stable across versions), leaf by leaf in
    path order, with scales that keep the outputs sensitive to the input: kernels of variance
    1/fan_in, norm scales around 1, running variances in [0.5, 2], small CLS tokens."""
    template = jax.eval_shape(lambda r: models.init_variables(module, r, shape), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        shape, last = leaf.shape, names[-1]
        if last == "kernel":
            fan_in = shape[0] if names[-2] in ("query", "key", "value") else np.prod(shape[:-1])
            value = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
        elif last in ("scale", "var"):
            value = rng.uniform(0.5, 1.5 if last == "scale" else 2.0, shape)
        elif last in ("cls", "cross_cls"):
            value = 0.3 * rng.standard_normal(shape)
        else:  # biases, running means
            value = rng.uniform(-0.2, 0.2, shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, template)


TORCH_GOLDEN = {
    # (B=2, L=2, 5) logits of the depth-3 U-Sleep, running statistics (eval) and batch statistics
    # (train), and the mean square of the decoder features.
    "usleep_eval": [
        [[0.3016770, 0.3229571, 0.1421328, 0.1750938, -0.3815810],
         [0.3153240, 0.2940926, 0.2104510, 0.1861562, -0.4193897]],
        [[0.2521089, 0.3084076, 0.1395752, 0.1524803, -0.3925033],
         [0.2672977, 0.2812839, 0.2200791, 0.1194188, -0.4117740]],
    ],
    "usleep_train": [
        [[0.1109201, 0.3036207, -0.0746783, -0.0050556, -0.2121806],
         [0.0744046, 0.2095377, 0.0449848, -0.0742863, -0.2497179]],
        [[0.0307792, 0.2067339, 0.0422414, -0.1308383, -0.2426008],
         [-0.0366951, 0.0709409, 0.1983155, -0.3699184, -0.1941373]],
    ],
    # The bottom batch norm's running averages after that one training pass (2 x 12 samples per
    # channel, so the unbiased variance PyTorch feeds them is 24/23 times the biased one).
    "usleep_bottom_mean_after_train": [
        0.0341699, 0.2207752, 0.0971984, -0.0944738, -0.0669389, 0.1285986, -0.1418886, 0.1584552,
        0.0539213, 0.0056274, -0.0638582, -0.0180605, -0.0280893, -0.0215075, 0.0191357,
    ],
    "usleep_bottom_var_after_train": [
        1.2254450, 1.8550060, 1.5710392, 1.3132745, 1.8134964, 0.7678240, 0.7047366, 1.3504231,
        0.5221886, 0.5353883, 1.1816857, 1.1231976, 1.7311450, 1.3394963, 1.1956940,
    ],
    "usleep_eval_feature_ms": 0.17259952,
    "usleep_train_feature_ms": 1.08559096,
    # (B=2, 5) logits of the narrow transformer in evaluation, and its features' mean square.
    "cmt_eval": [
        [0.5650120, 0.7400132, -0.4948004, -1.1697358, 1.5902020],
        [0.6039862, 0.7128004, -0.4303740, -1.1275399, 1.5903201],
    ],
    "cmt_eval_feature_ms": 1.03136885,
}


def test_usleep_matches_the_pytorch_reference():
    module, shape = _golden_models()["usleep"]
    variables = _numpy_variables(module, shape, seed=7)
    x = _golden_input(shape)
    (logits, features), _ = jax.jit(
        lambda v, x: module.apply(v, x, train=False, mutable=["batch_stats"])
    )(variables, x)
    np.testing.assert_allclose(logits, TORCH_GOLDEN["usleep_eval"], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.mean(np.square(features)), TORCH_GOLDEN["usleep_eval_feature_ms"],
                               rtol=1e-5)
    (logits, features), updates = jax.jit(
        lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    np.testing.assert_allclose(logits, TORCH_GOLDEN["usleep_train"], rtol=1e-5, atol=2e-6)
    bottom = updates["batch_stats"]["bottom"]["bn"]
    np.testing.assert_allclose(bottom["mean"], TORCH_GOLDEN["usleep_bottom_mean_after_train"],
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(bottom["var"], TORCH_GOLDEN["usleep_bottom_var_after_train"],
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.mean(np.square(features)),
                               TORCH_GOLDEN["usleep_train_feature_ms"], rtol=1e-5)


def test_cmt_matches_the_pytorch_reference():
    module, shape = _golden_models()["cmt"]
    variables = _numpy_variables(module, shape, seed=7)
    logits, features = jax.jit(lambda v, x: module.apply(v, x, train=False))(
        variables, _golden_input(shape)
    )
    np.testing.assert_allclose(logits[:, 0], TORCH_GOLDEN["cmt_eval"], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.mean(np.square(features)), TORCH_GOLDEN["cmt_eval_feature_ms"],
                               rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The convolution's "same" padding is PyTorch's (the smaller half on the left).


@pytest.mark.parametrize("kernel", [2, 9])
def test_conv1d_same_padding_matches_pytorchs(kernel):
    from eegkd_jax.models import layers

    conv = layers.conv1d(4, kernel, 3, jnp.float32)
    x = _signal(1, (2, 11, 3))
    params = conv.init(jax.random.key(2), x)["params"]
    assert params["kernel"].shape == (kernel, 3, 4)
    np.testing.assert_allclose(conv.apply({"params": params}, x),
                               _conv_same(np.asarray(x), np.asarray(params["kernel"]),
                                          np.asarray(params["bias"])), rtol=1e-5, atol=1e-5)


def test_usleep_gradients_are_finite_without_xla_optimisations():
    # Regression: max-pooling through a reshape + reduction max gave NaN gradients in encoder_0 when
    # XLA:CPU compiled without optimisations (as this module does, see fast_compiles).
    cfg = _cfg("usleep", depth=1, initial_filters=3, complexity_factor=1.0)
    module = models.build_model(cfg, in_channels=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6000, 3)), jnp.float32)
    variables = models.init_variables(module, jax.random.key(0), x.shape)

    def loss(params):
        (logits, _), _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      x, train=True, mutable=["batch_stats"])
        return logits.sum()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("length, in_features, kernel, form", [
    (1024, 3, 9, "folded"), (1024, 9, 2, "folded, even kernel"), (1026, 5, 9, "plain (T % 4)"),
    (128, 5, 9, "plain (short)"), (512, 40, 9, "plain (wide)"), (6, 30, 9, "patches"),
    (9, 12, 9, "patches, as long as the kernel"), (3, 30, 2, "plain (k=2)")])
def test_shaped_conv_equals_the_plain_convolution(length, in_features, kernel, form):
    from eegkd_jax.models import layers

    x = _signal(1, (2, length, in_features))
    w = _signal(2, (kernel, in_features, 6)) / kernel

    def plain(x, w):
        return jax.lax.conv_general_dilated(x, w, (1,), "SAME",
                                            dimension_numbers=("NWC", "WIO", "NWC"))

    def ours(x, w):
        return layers.shaped_conv(x, w, (1,), "SAME",
                                          dimension_numbers=("NWC", "WIO", "NWC"))

    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5, atol=1e-5, err_msg=form)
    weights = _signal(3, (2, length, 6))
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * weights), argnums=(0, 1))(x, w)
             for f in (ours, plain)]
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=form)
