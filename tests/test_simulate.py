"""The simulator: determinism, hypnogram shape, electrodes, and ear-EEG harder than scalp."""

import numpy as np
import pytest
import scipy.signal

from eegkd_jax.configs.common import data_config
from eegkd_jax.data import simulate
from eegkd_jax.data.preprocess import prepare_night
from eegkd_jax.data.recording import UNSCORED

W, N1, N2, N3, REM = range(5)


@pytest.fixture(scope="module")
def short_night():
    return simulate.simulate_recording("sim-02", seed=3, hours=0.3)


def test_deterministic_given_subject_and_seed(short_night):
    again = simulate.simulate_recording("sim-02", seed=3, hours=0.3)
    np.testing.assert_array_equal(short_night.scalp, again.scalp)
    np.testing.assert_array_equal(short_night.ear, again.ear)
    np.testing.assert_array_equal(short_night.labels, again.labels)
    assert short_night.rejected_channels == again.rejected_channels
    other_seed = simulate.simulate_recording("sim-02", seed=4, hours=0.3)
    other_subject = simulate.simulate_recording("sim-03", seed=3, hours=0.3)
    assert not np.allclose(short_night.scalp, other_seed.scalp)
    assert not np.allclose(short_night.scalp, other_subject.scalp)
    assert simulate.subject_traits("sim-02", 3) != simulate.subject_traits("sim-03", 3)


def test_layout_units_and_dead_electrodes(short_night):
    r = short_night
    assert r.scalp_channels == ("C3", "C4", "O1", "O2", "A1", "A2", "F3", "F4")
    assert r.ear_channels == simulate.EAR_CHANNELS
    assert r.sampling_rate == 200.0 and r.epoch_seconds == 30.0
    assert (
        r.labels.shape == (36,)
        and r.scalp.shape == (36 * 6000, 8)
        and r.ear.shape == (36 * 6000, 12)
    )
    assert r.scalp.dtype == np.float32 and r.ear.dtype == np.float32
    # microvolts: raw common-reference EEG is tens of uV, not volts and not millivolts
    scalp_rms = np.sqrt(np.mean(np.square(r.scalp), axis=0))
    assert np.all((scalp_rms > 5.0) & (scalp_rms < 300.0)), scalp_rms
    assert simulate.subject_ids(3) == ["sim-01", "sim-02", "sim-03"]
    assert simulate.subject_ids(120)[0] == "sim-001"

    # Across a handful of subjects some ear electrodes are dead, and each dead one is either flat
    # or an order of magnitude noisier than its neighbours.
    dead_seen = 0
    for subject in simulate.subject_ids(6):
        rec = simulate.simulate_recording(subject, seed=0, hours=0.05)
        assert rec.rejected_channels <= set(simulate.EAR_CHANNELS)
        good = [i for i, n in enumerate(rec.ear_channels) if n not in rec.rejected_channels]
        good_level = np.median(np.std(np.diff(rec.ear[:, good], axis=0), axis=0))
        for name in rec.rejected_channels:
            dead_seen += 1
            level = np.std(np.diff(rec.ear[:, rec.ear_channels.index(name)]))
            assert level < good_level / 10 or level > good_level * 10, (subject, name)
    assert dead_seen >= 2


def test_stage_proportions_and_cycles():
    """Over many 7.5-h hypnograms: textbook proportions, N3 early, REM late, ~90-min cycles."""
    props, n3_early, n3_late, rem_early, rem_late, rem_gaps = [], [], [], [], [], []
    for subject in simulate.subject_ids(16):
        traits = simulate.subject_traits(subject, 0)
        hyp = simulate.simulate_hypnogram(np.random.default_rng(7), 900, traits)
        assert hyp.dtype == np.int8 and set(np.unique(hyp)) == {W, N1, N2, N3, REM}
        props.append(np.bincount(hyp, minlength=5) / hyp.size)
        third = hyp.size // 3
        n3_early.append(np.mean(hyp[:third] == N3))
        n3_late.append(np.mean(hyp[-third:] == N3))
        rem_early.append(np.mean(hyp[:third] == REM))
        rem_late.append(np.mean(hyp[-third:] == REM))
        # REM periods: runs of REM merged across interruptions shorter than 15 minutes
        rem_epochs = np.flatnonzero(hyp == REM)
        onsets = rem_epochs[np.concatenate(([True], np.diff(rem_epochs) > 30))]
        rem_gaps.extend(np.diff(onsets) / 2.0)  # minutes
    mean = np.mean(props, axis=0)
    lo = np.array([0.13, 0.04, 0.42, 0.10, 0.16])
    hi = np.array([0.22, 0.09, 0.52, 0.19, 0.24])
    assert np.all((mean >= lo) & (mean <= hi)), mean.round(3)
    assert np.mean(n3_early) > 3 * np.mean(n3_late)
    assert np.mean(rem_late) > 1.5 * np.mean(rem_early)
    assert 75.0 <= np.median(rem_gaps) <= 110.0, np.median(rem_gaps)


def test_short_nights_are_compressed_whole_nights():
    traits = simulate.subject_traits("sim-01", 0)
    hyp = simulate.simulate_hypnogram(np.random.default_rng(0), 40, traits)
    assert set(np.unique(hyp)) >= {W, N2, N3, REM}


def test_movement_epochs_are_unscored():
    rec = simulate.simulate_recording("sim-01", seed=0, hours=1.0)
    unscored = np.flatnonzero(rec.labels == UNSCORED)
    assert 1 <= unscored.size <= 10
    # the scorer marked them because the signal is wrecked there
    per_epoch = np.abs(rec.ear.reshape(120, 6000, 12)).max(axis=(1, 2))
    assert np.all(per_epoch[unscored] > np.median(per_epoch))


def test_scorer_agreement_matches_published():
    """Over a long cohort the scored labels agree with the true stages as often as a scorer agrees
    with the AASM majority (Rosenberg & Van Hout 2013), per stage and overall; errors go to
    neighbouring stages and crowd at stage changes."""
    true, scored = [], []
    for i, subject in enumerate(simulate.subject_ids(200)):
        hyp = simulate.simulate_hypnogram(
            np.random.default_rng(i), 900, simulate.subject_traits(subject, 0)
        )
        true.append(hyp)
        scored.append(simulate.score_hypnogram(np.random.default_rng(10_000 + i), hyp))
    boundary = np.concatenate(
        [np.r_[False, np.diff(h) != 0] | np.r_[np.diff(h) != 0, False] for h in true]
    )
    true, scored = np.concatenate(true), np.concatenate(scored)
    assert abs(np.mean(scored == true) - simulate.SCORER_AGREEMENT_OVERALL) < 0.02
    for stage, published in enumerate(simulate.SCORER_AGREEMENT):
        measured = np.mean(scored[true == stage] == stage)
        assert abs(measured - published) < 0.03, (stage, measured, published)
    assert np.argmin(simulate.SCORER_AGREEMENT) == N1
    # N3 is misread as N2, hardly ever as anything else; REM never as N3
    n3_errors = scored[(true == N3) & (scored != N3)]
    assert np.mean(n3_errors == N2) > 0.85
    assert not np.any(scored[true == REM] == N3)
    # disagreement concentrates next to stage changes
    wrong = scored != true
    assert wrong[boundary].mean() > 2.5 * wrong[~boundary].mean()


def test_recording_keeps_true_stages_and_the_scorer_can_be_off():
    scored = simulate.simulate_recording("sim-03", seed=0, hours=1.0)
    truth = simulate.simulate_recording("sim-03", seed=0, hours=1.0, scorer_disagreement=False)
    assert scored.true_labels is not None and scored.true_labels.dtype == np.int8
    np.testing.assert_array_equal(scored.true_labels, truth.true_labels)
    assert set(np.unique(scored.true_labels)) <= {W, N1, N2, N3, REM}  # no -1 in the truth
    # the scorer changes labels only; the signals and the unscored epochs are the same
    np.testing.assert_array_equal(scored.scalp, truth.scalp)
    np.testing.assert_array_equal(scored.ear, truth.ear)
    np.testing.assert_array_equal(scored.labels == UNSCORED, truth.labels == UNSCORED)
    kept = truth.labels != UNSCORED
    np.testing.assert_array_equal(truth.labels[kept], truth.true_labels[kept])
    assert 0 < np.sum(scored.labels[kept] != scored.true_labels[kept]) < 0.4 * kept.sum()


_BANDS = ((0.5, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 12.0), (12.0, 16.0), (16.0, 30.0))


def _band_powers(x: np.ndarray, epoch_samples: int, fs: float) -> np.ndarray:
    """(epochs, channels * bands) log band powers of (time, channels) x."""
    epochs = x.reshape(-1, epoch_samples, x.shape[1])
    freqs, psd = scipy.signal.welch(epochs, fs=fs, nperseg=int(2 * fs), axis=1)
    return np.concatenate(
        [np.log(psd[:, (freqs >= a) & (freqs < b)].mean(axis=1) + 1e-12) for a, b in _BANDS], axis=1
    )


def _nearest_centroid_accuracy(train, test) -> float:
    xs, ys = zip(*train, strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    keep = y != UNSCORED
    x, y = x[keep], y[keep]
    mu, sd = x.mean(0), x.std(0) + 1e-9
    centroids = np.stack([((x[y == k] - mu) / sd).mean(0) for k in range(5)])
    xt, yt = test
    keep = yt != UNSCORED
    z = (xt[keep] - mu) / sd
    pred = np.argmin(((z[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(pred == yt[keep]))


def test_ear_is_harder_than_scalp():
    """Log band powers of the derived channels -> nearest centroid, leave one night out: scalp is
    clearly better than ear, and both clearly beat always answering the majority stage. Scored
    against the true stages: this is about what the signals carry, not about the scorer."""
    cfg = data_config()
    nights = [
        prepare_night(
            simulate.simulate_recording(s, seed=0, hours=1.0, scorer_disagreement=False), cfg
        )
        for s in simulate.subject_ids(4)
    ]
    feats = {
        group: [
            (_band_powers(getattr(n, group), n.epoch_samples, n.sampling_rate), n.labels)
            for n in nights
        ]
        for group in ("scalp", "ear")
    }
    acc = {
        group: np.mean(
            [_nearest_centroid_accuracy(f[:i] + f[i + 1 :], f[i]) for i in range(len(f))]
        )
        for group, f in feats.items()
    }
    labels = np.concatenate([n.labels for n in nights])
    majority = np.bincount(labels[labels >= 0]).max() / np.sum(labels >= 0)
    assert acc["scalp"] > acc["ear"] + 0.05, acc
    assert acc["ear"] > majority + 0.15, (acc, majority)


@pytest.mark.parametrize("rate", [100.0, 125.0, 256.0])
def test_other_sampling_rates(rate):
    rec = simulate.simulate_recording("sim-01", seed=0, hours=0.05, sampling_rate=rate)
    assert rec.sampling_rate == rate and rec.scalp.shape == (int(6 * 30 * rate), 8)
    night = prepare_night(rec, data_config())  # resampled to the 200 Hz model rate
    assert night.scalp.shape == (6 * 6000, 3) and night.ear.shape == (6 * 6000, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="whole number"):
        simulate.simulate_recording("sim-01", seed=0, hours=0.05, sampling_rate=100.5)
    with pytest.raises(ValueError, match="shorter than one"):
        simulate.simulate_recording("sim-01", seed=0, hours=0.001)
    with pytest.raises(ValueError, match="at least one"):
        simulate.subject_ids(0)


def test_stage_signatures_in_the_derivations():
    """The textbook signs, measured on C3-O1 in microvolts: big slow waves in N3, spindle-band
    power in N2, alpha and muscle in wake, muscle lowest in REM; the ear sees less of everything."""
    cfg = data_config()
    cfg.preprocess.scaling = "none"  # keep microvolts
    night = prepare_night(simulate.simulate_recording("sim-05", seed=1, hours=2.0), cfg)
    epochs = night.scalp[:, 1].reshape(-1, night.epoch_samples)  # C3-O1
    power = _band_powers(night.scalp[:, 1:2], night.epoch_samples, night.sampling_rate)
    delta, _, _, alpha, sigma, beta = power.T

    def mean(values, stage):
        return values[night.labels == stage].mean()

    assert mean(delta, N3) > mean(delta, N2) + 1.0 > mean(delta, W) + 1.0  # log power: e-fold gaps
    assert mean(sigma, N2) > max(mean(sigma, W), mean(sigma, REM))
    assert mean(alpha, W) > max(mean(alpha, N2), mean(alpha, N3))
    assert mean(beta, W) > mean(beta, REM)
    # high-amplitude delta: a typical N3 epoch swings well over 75 uV peak to peak
    swing = np.ptp(epochs[night.labels == N3], axis=1)
    assert np.median(swing) > 75.0, np.median(swing)
    # the ear's view of the same slow waves is a fraction of the scalp's
    n3 = night.labels == N3
    ear_n3 = np.median(night.ear[:, 0].reshape(-1, night.epoch_samples)[n3].std(axis=1))
    scalp_n3 = np.median(epochs[n3].std(axis=1))
    assert ear_n3 < 0.4 * scalp_n3, (ear_n3, scalp_n3)
