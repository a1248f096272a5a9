"""The CPU kernels (eegkd_jax/kernels): the convolutions' values and gradients against XLA's
convolution, the gradient norm against a float64 sum, Adam against optax's, when they apply, and
what happens when they cannot be built. (In a whole U-Sleep: test_models.)"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eegkd_jax import kernels
from eegkd_jax.models import layers

pytestmark = pytest.mark.skipif(not kernels._load(), reason="no C++ compiler for the CPU kernels")


def _xla_conv(x, kernel, left):
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, (1,), [(left, k - 1 - left)],
                                        dimension_numbers=("NWC", "WIO", "NWC"))


@pytest.mark.parametrize("batch, samples, channels, features, k, left", [
    (2, 6000, 3, 6, 9, 4),     # U-Sleep's first layer
    (3, 1500, 22, 11, 9, 4),
    (2, 37, 5, 7, 2, 0),       # the decoder's k=2 "same" conv, an odd length
    (1, 9000, 6, 9, 9, 4),     # one example longer than a forward task (several chunks)
    (2, 65, 4, 13, 3, 2),      # all padding on the left, 13 outputs (blocks of 6 + 6 + 1)
    (2, 16, 1, 1, 1, 0),
    (2, 300, 30, 15, 9, 4),    # weight gradient: 270 inputs per output (4 + 1 register blocks of
])                             # 64, the last one partly lanes past the end), 15 = 6 + 6 + 3
def test_conv1d_matches_xla_in_value_and_gradients(batch, samples, channels, features, k, left):
    rng = np.random.default_rng(batch * samples + k)
    x = jnp.asarray(rng.standard_normal((batch, samples, channels), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, channels, features), np.float32))
    cotangent = jnp.asarray(rng.standard_normal((batch, samples, features), np.float32))

    ours = jax.jit(kernels.conv1d, static_argnums=2)(x, kernel, left)
    theirs = _xla_conv(x, kernel, left)
    scale = float(jnp.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, atol=2e-6 * scale, rtol=0)

    def grads(conv):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, left) * cotangent),
                                argnums=(0, 1)))(x, kernel)

    for a, b in zip(grads(kernels.conv1d), grads(_xla_conv)):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()), rtol=0)


@pytest.mark.parametrize("batch, samples, channels, features, k, left", [
    (2, 6000, 3, 6, 9, 4),
    (1, 4200, 6, 13, 9, 4),    # three forward tasks (statistics rows), 13 channels (6 + 6 + 1)
    (2, 37, 5, 30, 2, 0),      # the decoder's upsampling conv: k=2, 2F outputs
    (3, 65, 4, 7, 3, 2),
])
def test_conv1d_elu_matches_xla_in_value_sums_and_gradients(batch, samples, channels, features,
                                                            k, left):
    rng = np.random.default_rng(samples + features)
    x = jnp.asarray(rng.standard_normal((batch, samples, channels), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, channels, features), np.float32) * 0.3)
    bias = jnp.asarray(rng.standard_normal(features).astype(np.float32))

    def reference(x, kernel, bias, left):
        z = _xla_conv(x, kernel, left) + bias
        a = jnp.where(z > 0, z, jnp.expm1(jnp.minimum(z, 0.0)))  # ELU, alpha 1
        return a, a.sum(axis=(0, 1)), jnp.square(a).sum(axis=(0, 1))

    ours = jax.jit(kernels.conv1d_elu, static_argnums=3)(x, kernel, bias, left)
    theirs = reference(x, kernel, bias, left)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()), rtol=0)

    # Cotangents for all three outputs: gradients through the output and through both sums.
    cotangents = [jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for t in theirs]

    def grads(f):
        def loss(x, w, b):
            return sum(jnp.sum(t * c) for t, c in zip(f(x, w, b, left), cotangents))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)

    for a, b in zip(grads(kernels.conv1d_elu), grads(reference)):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()), rtol=0)


@pytest.mark.parametrize("batch, lengths, channels, features, k, left", [
    (2, (376, 375), (6, 6), 9, 9, 4),  # a decoder conv: [upsampled (one sample longer), skip]
    (3, (300,), (5,), 14, 2, 0),        # an upsampling conv's normalised input, alone
    (1, (4500, 4500), (3, 2), 7, 9, 4),  # several forward tasks
])
def test_conv1d_elu_affine_matches_xla_on_the_normalised_concatenation(batch, lengths, channels,
                                                                        features, k, left):
    rng = np.random.default_rng(sum(lengths) + k)
    length = min(lengths)
    inputs = tuple(
        (jnp.asarray(rng.standard_normal((batch, t, c)), jnp.float32),
         jnp.asarray(rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c), jnp.float32),
         jnp.asarray(rng.standard_normal(c), jnp.float32))
        for t, c in zip(lengths, channels))
    kernel = jnp.asarray(rng.standard_normal((k, sum(channels), features)) * 0.3, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(features), jnp.float32)

    def reference(inputs, kernel, bias):
        x = jnp.concatenate([x[:, :length] * scale + shift for x, scale, shift in inputs], -1)
        z = _xla_conv(x, kernel, left) + bias
        a = jnp.where(z > 0, z, jnp.expm1(jnp.minimum(z, 0.0)))
        return a, a.sum(axis=(0, 1)), jnp.square(a).sum(axis=(0, 1))

    def ours(inputs, kernel, bias):
        return kernels.conv1d_elu_affine(inputs, kernel, bias, left, length)

    got, want = jax.jit(ours)(inputs, kernel, bias), reference(inputs, kernel, bias)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=3e-6 * float(jnp.abs(b).max()), rtol=0)

    cotangents = [jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for t in want]

    def grads(f):
        def loss(*args):
            return sum(jnp.sum(t * c) for t, c in zip(f(*args), cotangents))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(inputs, kernel, bias)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(reference))):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=3e-6 * float(jnp.abs(b).max()), rtol=0)


def test_conv1d_elu_affine_rejects_inputs_that_do_not_fit():
    x = jnp.ones((2, 100, 3), jnp.float32)
    ones, zeros = jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.float32)
    kernel = jnp.ones((9, 3, 4), jnp.float32)
    with pytest.raises(Exception, match="shape does not fit"):  # asks for more samples than x has
        jax.block_until_ready(kernels.conv1d_elu_affine(((x, ones, zeros),), kernel,
                                                        jnp.zeros(4), 4, 101))
    with pytest.raises(Exception, match="kernel channels"):
        jax.block_until_ready(kernels.conv1d_elu_affine(((x, ones, zeros), (x, ones, zeros)),
                                                        kernel, jnp.zeros(4), 4, 100))


def test_conv1d_elu_keeps_nan_and_infinities_as_xla_does():
    # A NaN in the activations (a diverging model) must reach the output and the sums, not be
    # turned into zeros by the ELU's negative branch; -inf gives -1, +inf stays +inf.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 300, 3)).astype(np.float32)
    x[0, 100, 1], x[0, 200, 0], x[0, 250, 2] = np.nan, np.inf, -np.inf
    kernel = np.full((9, 3, 2), 0.1, np.float32)
    kernel[..., 1] *= -1
    bias = jnp.zeros(2, jnp.float32)
    a, total, total_sq = kernels.conv1d_elu(jnp.asarray(x), jnp.asarray(kernel), bias, 4)
    z = _xla_conv(jnp.asarray(x), jnp.asarray(kernel), 4)
    want = jnp.where(z > 0, z, jnp.exp(jnp.minimum(z, 0.0)) - 1)
    np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6)  # NaN where XLA has NaN
    assert np.isnan(np.asarray(a)[0, 96:105]).all()
    assert np.isnan(np.asarray(total)).all() and np.isnan(np.asarray(total_sq)).all()


def test_conv1d_writes_every_output():
    # Lengths around the register blocks (64 samples) and forward tasks (2048): an unwritten
    # output would keep whatever the buffer held, not equal XLA's.
    rng = np.random.default_rng(0)
    for samples in (63, 64, 65, 2047, 2048, 2049):
        x = jnp.asarray(rng.standard_normal((1, samples, 2), np.float32))
        kernel = jnp.asarray(rng.standard_normal((9, 2, 3), np.float32))
        np.testing.assert_allclose(kernels.conv1d(x, kernel, 4), _xla_conv(x, kernel, 4),
                                   atol=1e-5, rtol=0)


def test_global_norm_is_one_call_and_matches_a_float64_sum(monkeypatch):
    monkeypatch.setattr(kernels, "_single_device", lambda: True)
    rng = np.random.default_rng(3)
    # Leaves around the kernel's runs (1024) and pieces (65536), an empty one, a scalar, and one
    # of 3M small values next to large ones (a float32 running sum would lose them).
    tree = {"w": rng.standard_normal((9, 3, 6)), "empty": np.zeros((0, 4)), "scalar": np.float32(7),
            "pieces": rng.standard_normal(65536 * 2 + 1023), "tiny": 1e-3 * rng.standard_normal(
                3_000_001), "odd": [rng.standard_normal(1025), rng.standard_normal(15)]}
    tree = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    expected = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(tree)))
    norm = jax.jit(kernels.global_norm)
    assert norm.lower(tree).as_text().count("eegkd_sum_of_squares") == 1
    np.testing.assert_allclose(float(norm(tree)), expected, rtol=1e-6)
    assert float(norm({"empty": jnp.zeros((0,))})) == 0.0 and float(kernels.global_norm({})) == 0.0
    # Elsewhere (another dtype among the leaves, or the kernels off) it is the same sum in JAX.
    mixed = dict(tree, half=jnp.ones((3,), jnp.bfloat16))
    assert "eegkd_sum_of_squares" not in norm.lower(mixed).as_text()
    np.testing.assert_allclose(float(norm(mixed)), np.sqrt(expected ** 2 + 3), rtol=1e-6)
    monkeypatch.setattr(kernels, "_single_device", lambda: False)
    norm = jax.jit(lambda t: kernels.global_norm(t))  # a new function: jit's cache would hit
    assert "eegkd_sum_of_squares" not in norm.lower(tree).as_text()
    np.testing.assert_allclose(float(norm(tree)), expected, rtol=1e-5)


@pytest.mark.parametrize("clip, decay, schedule", [
    (0.0, 1e-4, "constant"),   # the original's settings
    (0.5, 1e-4, "cosine"),     # clipping that applies (the gradient's norm is ~80), a warm-up
    (1e3, 0.0, "cosine"),      # clipping that does not, no decay
])
def test_adam_kernel_is_optax_adam_in_place(monkeypatch, clip, decay, schedule):
    from configs import common
    from eegkd_jax.train import state as state_lib

    monkeypatch.setattr(kernels, "_single_device", lambda: True)
    cfg = common.get_config().optimizer
    cfg.grad_clip_norm, cfg.weight_decay, cfg.schedule = clip, decay, schedule
    cfg.warmup_steps = 2 if schedule == "cosine" else 0
    tx = state_lib.make_optimizer(cfg, total_steps=8)
    rng = np.random.default_rng(5)
    # Arrays around the kernel's pieces (65536 elements), a 1-element one, the conv shapes.
    params = {"conv": {"kernel": rng.standard_normal((9, 3, 6)), "bias": rng.standard_normal(6)},
              "big": rng.standard_normal(65536 + 700), "one": rng.standard_normal(1)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    grads = [jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                          params) for _ in range(4)]

    def run(optimizer):
        step = jax.jit(lambda g, s, p: state_lib.apply_gradients(optimizer, g, s, p))
        p, s = params, optimizer.init(params)
        text = step.lower(grads[0], s, p).as_text()
        for g in grads:
            p, s = step(g, s, p)
        return text, p, s

    text, ours, our_state = run(tx)
    plain = optax.GradientTransformationExtraArgs(*tx)  # no settings: optax's own update
    optax_text, theirs, their_state = run(plain)
    assert text.count("eegkd_adam") == 1 and "eegkd_adam" not in optax_text
    # The same state layout (checkpoints move between the two), the same counts, the same values
    # to float32 rounding.
    assert jax.tree.structure(our_state) == jax.tree.structure(their_state)
    for a, b in zip(jax.tree.leaves((ours, our_state)), jax.tree.leaves((theirs, their_state))):
        if b.dtype == jnp.int32:
            assert int(a) == int(b) == len(grads)
        else:
            np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max()), rtol=0)
    assert not np.allclose(ours["big"], params["big"])  # it did move


def test_kernels_stay_off_where_they_do_not_apply(monkeypatch):
    monkeypatch.setattr(kernels, "_single_device", lambda: True)
    assert kernels.available()
    assert not kernels.available(jnp.bfloat16)  # float32 kernels only
    monkeypatch.setattr(kernels, "_single_device", lambda: False)
    assert not kernels.available()  # a mesh of several devices: XLA would gather the batch
    # The suite's 8 fake devices: the model never calls them here unless a test says so.
    monkeypatch.undo()
    assert jax.device_count() == 8 and not kernels.available()


def test_no_compiler_falls_back_to_xla_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.setattr(kernels, "_single_device", lambda: True)
    kernels._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="eegkd_jax.kernels"):
            assert not kernels.available()
        assert "no C++ compiler" in caplog.text
        x = jnp.ones((1, 512, 3), jnp.float32)
        kernel = jnp.ones((9, 3, 4), jnp.float32)
        np.testing.assert_allclose(layers._conv_same(x, kernel), _xla_conv(x, kernel, 4),
                                   rtol=1e-5)
        with pytest.raises(RuntimeError, match="could not be built or loaded"):
            kernels.conv1d(x, kernel, 4)
    finally:
        kernels._load.cache_clear()


def test_a_failing_build_falls_back_and_names_the_error(monkeypatch, caplog, tmp_path):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'conv1d.cc:1: error: planted' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(kernels, "_compiler", lambda: str(broken))
    monkeypatch.setenv(kernels.ENV_CACHE, str(tmp_path / "cache"))
    kernels._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="eegkd_jax.kernels"):
            assert not kernels._load()
        assert "planted" in caplog.text
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind
    finally:
        kernels._load.cache_clear()


def test_prepare_builds_in_the_background_only_where_the_kernels_may_be_used(monkeypatch):
    import threading

    called = threading.Event()
    monkeypatch.setattr(kernels, "_load", called.set)
    monkeypatch.setattr(kernels, "_single_device", lambda: False)
    kernels.prepare()  # a mesh of several devices: nothing to build
    assert not called.wait(0.2)
    monkeypatch.setattr(kernels, "_single_device", lambda: True)
    monkeypatch.setenv(kernels.ENV_SWITCH, "off")
    kernels.prepare()
    assert not called.wait(0.2)
    monkeypatch.delenv(kernels.ENV_SWITCH)
    kernels.prepare()
    assert called.wait(10)
