"""The classical floor: band-power features, epoch context, fitting without unscored epochs, and its
kappa on a small simulated cohort against a shuffled-label control."""

import numpy as np
import pytest
import scipy.signal

from eegkd_jax.configs.common import data_config
from eegkd_jax import baseline, metrics
from eegkd_jax.data import pipeline
from eegkd_jax.data.recording import UNSCORED

# A convergence or deprecation warning from scikit-learn means we call it wrongly: fail on it.
pytestmark = pytest.mark.filterwarnings("error")

FS = 100.0
EPOCH = 3000  # 30 s at FS
# One frequency per stage, each in its own band: W alpha, N1 theta, N2 sigma, N3 delta, REM beta.
STAGE_HZ = {0: 10.0, 1: 6.0, 2: 14.0, 3: 2.0, 4: 22.0}


def synthetic_night(rng, labels, channels=2):
    """(len(labels) * EPOCH, channels): per epoch a sine at its stage's frequency plus white noise
    (unscored epochs get a random stage's sine)."""
    t = np.arange(EPOCH) / FS
    epochs = []
    for y in labels:
        hz = STAGE_HZ[int(y) if y != UNSCORED else int(rng.integers(5))]
        phase = rng.uniform(0, 2 * np.pi, size=channels)
        sine = np.sin(2 * np.pi * hz * t[:, None] + phase)
        epochs.append(sine + rng.normal(size=(EPOCH, channels)))
    return np.concatenate(epochs).astype(np.float32)


def test_features_shape_finite_and_relative_powers_sum_to_one():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(7 * EPOCH, 3)).astype(np.float32)
    signal[:, 2] = 0.0  # a dead channel must still give finite features
    x = baseline.band_power_features(signal, FS, EPOCH)
    assert x.shape == (7, 3 * baseline.FEATURES_PER_CHANNEL) and x.dtype == np.float64
    assert np.isfinite(x).all()
    per_channel = x.reshape(7, 3, baseline.FEATURES_PER_CHANNEL)
    relative = per_channel[..., len(baseline.BANDS) :]
    np.testing.assert_allclose(relative[:, :2].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(relative[:, 2], 0.0)
    # The bands tile 0.5-30 Hz without gaps or overlaps: their powers add up to the total there.
    freqs, psd = scipy.signal.welch(signal[:, 0].reshape(7, EPOCH), fs=FS, nperseg=int(4 * FS))
    in_range = (freqs >= 0.5) & (freqs < 30.0)
    total = psd[:, in_range].sum(axis=1) * (freqs[1] - freqs[0])
    absolute = 10.0 ** per_channel[:, 0, : len(baseline.BANDS)]
    np.testing.assert_allclose(absolute.sum(-1), total, rtol=1e-5)
    # White noise: absolute power grows with the band's width (beta is 14 Hz wide, theta 4 Hz).
    log_power = per_channel[:, :2, : len(baseline.BANDS)]
    assert (log_power[..., 4] > log_power[..., 1]).all()


# Half a hertz inside each band edge (the periodogram's 0.25 Hz bins spread a sine over +-0.25 Hz),
# so that a band boundary off by a bin fails, and 10 Hz: alpha.
@pytest.mark.parametrize("band, hz", [
    ("delta", 1.0), ("delta", 3.5), ("theta", 4.5), ("theta", 7.5), ("alpha", 8.5),
    ("alpha", 10.0), ("alpha", 11.5), ("sigma", 12.5), ("sigma", 15.5), ("beta", 16.5),
    ("beta", 29.5),
])  # fmt: skip
def test_a_pure_sine_puts_its_power_in_its_band(band, hz):
    fs, samples = 200.0, 6000
    t = np.arange(3 * samples) / fs
    signal = np.stack([np.sin(2 * np.pi * hz * t), 0.5 * np.sin(2 * np.pi * hz * t + 1.0)], 1)
    x = baseline.band_power_features(signal, fs, samples).reshape(3, 2, -1)
    which = [b[0] for b in baseline.BANDS].index(band)
    relative = x[..., len(baseline.BANDS) :]
    assert (relative[..., which] > 0.99).all(), relative
    assert baseline.FEATURE_NAMES[len(baseline.BANDS) + which] == f"relative_{band}"
    # log10 powers: halving the amplitude quarters the power
    np.testing.assert_allclose(x[:, 0, which] - x[:, 1, which], np.log10(4.0), atol=1e-3)


def test_features_reject_a_partial_epoch_and_bad_shapes():
    with pytest.raises(ValueError, match="whole number"):
        baseline.band_power_features(np.zeros((EPOCH + 1, 2)), FS, EPOCH)
    with pytest.raises(ValueError, match="time, channels"):
        baseline.band_power_features(np.zeros(EPOCH), FS, EPOCH)
    bad = np.zeros((EPOCH, 2))
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        baseline.band_power_features(bad, FS, EPOCH)


def test_context_concatenates_neighbours_and_repeats_the_edges():
    features = np.arange(6 * 2).reshape(6, 2) * 1.0  # epoch t has features (2t, 2t + 1)
    np.testing.assert_array_equal(baseline.with_context(features, 0), features)
    x = baseline.with_context(features, 2)
    assert x.shape == (6, 5 * 2)
    blocks = x.reshape(6, 5, 2)[..., 0] / 2  # the epoch index of each block
    np.testing.assert_array_equal(blocks[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(blocks[3], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(blocks[5], [3, 4, 5, 5, 5])
    # a night shorter than the context
    np.testing.assert_array_equal(baseline.with_context(features[:1], 2), np.tile(features[:1], 5))
    with pytest.raises(ValueError):
        baseline.with_context(features, -1)


def test_fit_leaves_out_unscored_epochs():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 5, 40), rng.integers(0, 5, 30)]
    features = [rng.normal(size=(y.size, 6)) + y[:, None] for y in labels]
    labels[0][[3, 17]] = UNSCORED
    labels[1][0] = UNSCORED
    # Unscored epochs are artefacts: wild values that would move the standardiser if counted.
    features[0][[3, 17]] = 1e6
    features[1][0] = -1e6
    model = baseline.fit(features, labels)
    keep = [y != UNSCORED for y in labels]
    clean = baseline.fit(
        [x[k] for x, k in zip(features, keep)], [y[k] for y, k in zip(labels, keep)]
    )
    np.testing.assert_array_equal(model[-1].classes_, np.arange(5))
    np.testing.assert_allclose(model[0].mean_, clean[0].mean_)
    np.testing.assert_allclose(model[-1].coef_, clean[-1].coef_)
    with pytest.raises(ValueError, match="no scored epoch"):
        baseline.fit([features[0]], [np.full(40, UNSCORED)])
    with pytest.raises(ValueError, match="labels"):
        baseline.fit([features[0]], [labels[1]])


@pytest.mark.parametrize("context", [0, 2])
def test_floor_learns_stages_and_keeps_nights_apart(context):
    rng = np.random.default_rng(2)
    nights = []
    for n in (50, 40, 45, 35):
        y = rng.integers(0, 5, n)
        y[rng.integers(0, n, 3)] = UNSCORED
        nights.append((synthetic_night(rng, y), y))
    train, evaluate = nights[:2], nights[2:]
    predictions = baseline.floor(train, evaluate, FS, EPOCH, context=context)
    assert [p.shape for p in predictions] == [(45,), (35,)]
    assert all(p.dtype == np.int64 and set(np.unique(p)) <= set(range(5)) for p in predictions)
    for p, (_, y) in zip(predictions, evaluate):
        scored = y != UNSCORED
        assert np.mean(p[scored] == y[scored]) > 0.9
    # Each night is featurised on its own: a night's predictions do not depend on its neighbours
    # in the list (they would at the edges if nights were concatenated before adding context).
    alone = baseline.floor(train, evaluate[1:], FS, EPOCH, context=context)
    np.testing.assert_array_equal(alone[0], predictions[1])


# --------------------------------------------------------------------------------------------------
# On a small simulated cohort, read through the pipeline as the networks read it.


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory):
    c = data_config()
    c.cache_dir = str(tmp_path_factory.mktemp("tfds"))
    c.simulated.subjects = 4
    c.simulated.hours = 0.5  # 60 epochs a night: every stage, a few unscored epochs
    # What the features carry is the point here, not how well a scorer's labels can be followed.
    c.simulated.scorer_disagreement = False
    return c


@pytest.fixture(scope="module")
def cohort(cohort_config):
    return pipeline.prepare_cohort(cohort_config)


TRAIN, EVALUATE = ("sim-01", "sim-02", "sim-03"), ("sim-04",)


def shuffled_label_kappa(cohort, seed, context):
    """The same features and model, trained on labels permuted across the training nights."""
    rng = np.random.default_rng(seed)

    def night(s):
        scalp, _, y = cohort.read_epochs(s, range(cohort.num_epochs[s]))
        x = baseline.band_power_features(
            scalp.reshape(-1, scalp.shape[-1]), cohort.sampling_rate, cohort.epoch_samples
        )
        return baseline.with_context(x, context), y

    train = [night(s) for s in TRAIN]
    labels = np.concatenate([y for _, y in train])
    scored = np.flatnonzero(labels != UNSCORED)
    labels[scored] = labels[rng.permutation(scored)]
    model = baseline.fit([np.concatenate([x for x, _ in train])], [labels])
    x, y = night(EVALUATE[0])
    return metrics.evaluate_subjects(y, baseline.predict(model, x), np.zeros(y.size, int))[
        "overall"
    ]["kappa"]


@pytest.mark.parametrize("context", [0, 2])
def test_scalp_floor_on_a_simulated_cohort_beats_shuffled_labels(cohort, context):
    result = baseline.cohort_floor(cohort, TRAIN, EVALUATE, "scalp", context=context)
    kappa = result["overall"]["kappa"]
    control = max(shuffled_label_kappa(cohort, seed, context) for seed in range(3))
    assert kappa > 0.6, kappa
    assert control < 0.3 and kappa > control + 0.4, (kappa, control)

    # Every epoch is predicted, unscored ones included; only the scored ones are scored.
    (subject,) = EVALUATE
    labels = cohort.labels[subject]
    assert (labels == UNSCORED).any()  # the simulator marks movement epochs unscored
    assert result["predictions"][subject].shape == labels.shape
    assert result["overall"]["num_epochs"] == int((labels != UNSCORED).sum())
    assert result["per_subject"][subject]["kappa"] == pytest.approx(kappa)


def test_ear_floor_runs_and_arguments_are_checked(cohort):
    result = baseline.cohort_floor(cohort, TRAIN, EVALUATE, "ear")
    assert 0.0 < result["overall"]["kappa"] <= 1.0
    with pytest.raises(ValueError, match="scalp"):
        baseline.cohort_floor(cohort, TRAIN, EVALUATE, "eeg")
    with pytest.raises(ValueError, match="both"):
        baseline.cohort_floor(cohort, TRAIN, ("sim-03",))


def test_validation_floors_score_the_splits_validation_subjects(cohort, cohort_config):
    data_cfg = cohort_config.copy_and_resolve_references()
    data_cfg.validation_subjects, data_cfg.test_subjects = ("sim-04",), ("sim-03",)
    floors = baseline.validation_floors(data_cfg)
    for signal in ("scalp", "ear"):
        want = baseline.cohort_floor(cohort, ("sim-01", "sim-02"), ("sim-04",), signal)
        assert floors[signal] == pytest.approx(want["overall"]["kappa"])
