"""Loss terms: masking of unscored epochs, class weights, T^2 scaling, KL properties, feature MSE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eegkd_jax import losses


def _logits(seed, shape=(3, 4, 5)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * 2.0


def _reference_ce(logits, labels, weights=None):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    num = den = 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y < 0:
            continue
        w = 1.0 if weights is None else weights[y]
        num += -w * logp[idx + (y,)]
        den += w
    return num / den


def test_cross_entropy_ignores_unscored_epochs():
    logits = _logits(0)
    labels = np.array([[0, 1, -1, 4], [2, -1, -1, 3], [1, 1, 0, -1]])
    got = float(losses.masked_cross_entropy(logits, jnp.asarray(labels)))
    np.testing.assert_allclose(got, _reference_ce(logits, labels), rtol=1e-5)
    # Whatever the logits of unscored epochs are, the loss does not change.
    noisy = np.array(logits)
    noisy[labels == -1] = 1e3
    assert float(losses.masked_cross_entropy(jnp.asarray(noisy), jnp.asarray(labels))) == pytest.approx(got, rel=1e-6)


def test_cross_entropy_class_weights_match_torch_weighted_mean():
    logits = _logits(1)
    labels = np.array([[0, 1, -1, 4], [2, 2, 2, 3], [1, 1, 0, -1]])
    weights = [1.0, 3.0, 0.5, 2.0, 1.5]
    got = float(losses.masked_cross_entropy(logits, jnp.asarray(labels), weights))
    np.testing.assert_allclose(got, _reference_ce(logits, labels, weights), rtol=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        losses.masked_cross_entropy(logits, jnp.asarray(labels), [1.0, 2.0])


def test_all_unscored_batch_gives_zero_not_nan():
    labels = -jnp.ones((2, 3), jnp.int32)
    logits = _logits(2, (2, 3, 5))
    assert float(losses.masked_cross_entropy(logits, labels)) == 0.0
    assert float(losses.softened_kl(logits, -logits, labels, 2.0)) == 0.0
    g = jax.grad(lambda x: losses.masked_cross_entropy(x, labels))(logits)
    assert np.all(np.isfinite(g)) and not np.any(g)


def test_kl_is_zero_for_identical_outputs_and_positive_otherwise():
    labels = jnp.zeros((3, 4), jnp.int32)
    a, b = _logits(3), _logits(4)
    assert abs(float(losses.softened_kl(a, a, labels, 4.0))) < 1e-6
    for t in (1.0, 2.0, 4.0):
        assert float(losses.softened_kl(a, b, labels, t)) > 0.0
    with pytest.raises(ValueError, match="temperature"):
        losses.softened_kl(a, b, labels, 0.0)


def test_kl_matches_definition_with_t_squared_and_masking():
    a, b = _logits(5), _logits(6)
    labels = np.array([[0, -1, 2, 3], [4, 4, -1, 0], [1, 2, 3, 4]])
    t = 3.0
    p = jax.nn.softmax(np.asarray(b, np.float64) / t)  # teacher
    q = jax.nn.softmax(np.asarray(a, np.float64) / t)  # student
    kl = np.sum(np.asarray(p) * (np.log(p) - np.log(q)), -1)
    want = t * t * kl[labels >= 0].mean()
    got = float(losses.softened_kl(a, b, jnp.asarray(labels), t))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_t_squared_keeps_the_soft_gradient_scale():
    # For large T the gradient of KL wrt student logits shrinks like 1/T^2; the T^2 factor undoes it,
    # so the scaled gradient approaches a T-independent limit (Hinton et al., sec. 2.1).
    labels = jnp.zeros((3, 4), jnp.int32)
    a, b = _logits(7) * 0.1, _logits(8) * 0.1
    grads = [jax.grad(lambda s: losses.softened_kl(s, b, labels, t))(a) for t in (20.0, 40.0)]
    ratio = float(jnp.linalg.norm(grads[0]) / jnp.linalg.norm(grads[1]))
    # d KL / d s ~ (q - p) / T and q - p ~ (s - t) / T, so unscaled the ratio would be ~4.
    assert ratio == pytest.approx(1.0, rel=0.05)


def test_feature_mse_per_sample_masks_unscored_epochs():
    batch, seq_len, samples, feats = 2, 3, 4, 2
    s = jax.random.normal(jax.random.PRNGKey(0), (batch, seq_len * samples, feats))
    t = jax.random.normal(jax.random.PRNGKey(1), (batch, seq_len * samples, feats))
    labels = jnp.array([[0, -1, 2], [-1, -1, 1]])
    sq = np.square(np.asarray(s) - np.asarray(t)).reshape(batch, seq_len, samples * feats)
    want = sq[np.asarray(labels) >= 0].mean()
    np.testing.assert_allclose(float(losses.feature_mse(s, t, labels)), want, rtol=1e-5)
    assert float(losses.feature_mse(s, s, labels)) == 0.0


def test_feature_mse_at_epoch_level_compares_each_epochs_mean():
    batch, seq_len, samples, feats = 2, 3, 4, 2
    s = jax.random.normal(jax.random.PRNGKey(4), (batch, seq_len * samples, feats))
    t = jax.random.normal(jax.random.PRNGKey(5), (batch, seq_len * samples, feats))
    labels = jnp.array([[0, -1, 2], [-1, -1, 1]])
    means = [np.asarray(x).reshape(batch, seq_len, samples, feats).mean(2) for x in (s, t)]
    want = np.square(means[0] - means[1])[np.asarray(labels) >= 0].mean()
    np.testing.assert_allclose(float(losses.feature_mse(s, t, labels, "epoch")), want, rtol=1e-5)
    # A student that matches each epoch's mean but not its waveform has no epoch-level loss.
    shifted = t + (jnp.arange(samples * seq_len) % 2 * 2 - 1)[None, :, None]
    assert float(losses.feature_mse(shifted, t, labels, "epoch")) < 1e-10
    assert float(losses.feature_mse(shifted, t, labels, "sample")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sample or epoch"):
        losses.feature_mse(s, t, labels, "window")


def test_feature_mse_per_sequence_and_shape_mismatch():
    s = jax.random.normal(jax.random.PRNGKey(2), (3, 8))
    t = jax.random.normal(jax.random.PRNGKey(3), (3, 8))
    labels = jnp.array([[1], [-1], [3]])
    want = np.square(np.asarray(s) - np.asarray(t))[[0, 2]].mean()
    np.testing.assert_allclose(float(losses.feature_mse(s, t, labels)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="feature_weight=0"):
        losses.feature_mse(s, jnp.zeros((3, 6)), labels)


def test_accuracy_masks_unscored():
    logits = jnp.eye(5)[jnp.array([[0, 1, 2], [3, 4, 0]])] * 5.0
    labels = jnp.array([[0, 1, -1], [3, 0, -1]])
    assert float(losses.accuracy(logits, labels)) == pytest.approx(0.75)
