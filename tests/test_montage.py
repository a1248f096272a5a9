"""Derivations and the ear-electrode rejection mask, on small synthetic recordings."""
import numpy as np
import pytest

from eegkd_jax.data import montage
from eegkd_jax.data.recording import DataError, Recording

SCALP = ("C3", "C4", "O1", "O2", "A1", "A2")
EAR = montage.LEFT_EAR + montage.RIGHT_EAR


def make_recording(seconds=120.0, fs=100.0, *, epochs=None, seed=0, scalp=SCALP, ear=EAR,
                   rejected=(), subject="sub-001", scale=20.0):
    """White-noise electrodes (microvolts), a different level per electrode, and one label per epoch."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fs))
    levels = scale * (1.0 + 0.5 * rng.random(len(scalp) + len(ear))).astype(np.float32)
    signal = rng.standard_normal((n, len(scalp) + len(ear)), dtype=np.float32) * levels
    epochs = int(seconds // 30) if epochs is None else epochs
    return Recording(
        subject=subject, source=f"test:{subject}", sampling_rate=fs,
        scalp=np.ascontiguousarray(signal[:, : len(scalp)]), scalp_channels=tuple(scalp),
        ear=np.ascontiguousarray(signal[:, len(scalp):]), ear_channels=tuple(ear),
        labels=(np.arange(epochs) % 5).astype(np.int8), rejected_channels=frozenset(rejected),
    )


def col(rec, name):
    names = rec.scalp_channels + rec.ear_channels
    return np.concatenate([rec.scalp, rec.ear], axis=1)[:, names.index(name)].astype(np.float64)


def mean(rec, names):
    return np.mean([col(rec, n) for n in names], axis=0)


def test_ear_derivations_follow_the_original_definitions():
    rec = make_recording()
    out, names = montage.derive(rec, ("L-R", "L_E", "R_E"))
    assert names == ("L-R", "L_E", "R_E") and out.shape == (rec.num_samples, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], mean(rec, montage.LEFT_EAR) - mean(rec, montage.RIGHT_EAR), atol=1e-4)
    np.testing.assert_allclose(out[:, 1], mean(rec, ["ELA", "ELB"]) - mean(rec, ["ELE", "ELG", "ELI", "ELK"]), atol=1e-4)
    np.testing.assert_allclose(out[:, 2], mean(rec, ["ERA", "ERB"]) - mean(rec, ["ERE", "ERG", "ERI", "ERK"]), atol=1e-4)


def test_rejected_electrodes_leave_the_averages():
    rec = make_recording()
    out, _ = montage.derive(rec, ("L-R", "L_E"), rejected={"ELA", "ELK", "ERB"})
    left = ["ELB", "ELE", "ELG", "ELI"]
    right = ["ERA", "ERE", "ERG", "ERI", "ERK"]
    np.testing.assert_allclose(out[:, 0], mean(rec, left) - mean(rec, right), atol=1e-4)
    np.testing.assert_allclose(out[:, 1], col(rec, "ELB") - mean(rec, ["ELE", "ELG", "ELI"]), atol=1e-4)


def test_a_side_with_every_electrode_rejected_is_an_error_not_nan():
    rec = make_recording(subject="sub-004")
    with pytest.raises(DataError, match=r"sub-004: derivation R_E: every electrode of ERA, ERB is rejected"):
        montage.derive(rec, ("L-R", "R_E"), rejected={"ERA", "ERB"})


def test_missing_ear_electrode_that_is_not_rejected():
    rec = make_recording(ear=tuple(e for e in EAR if e != "ELG"))
    with pytest.raises(DataError, match="derivation L_E: electrode ELG is missing and not rejected"):
        montage.derive(rec, ("L_E",))
    out, _ = montage.derive(rec, ("L_E",), rejected={"ELG"})  # rejecting it by name is fine
    np.testing.assert_allclose(out[:, 0], mean(rec, ["ELA", "ELB"]) - mean(rec, ["ELE", "ELI", "ELK"]), atol=1e-4)


def test_scalp_pairs_and_ready_made_bipolar_channels():
    rec = make_recording()
    out, names = montage.derive(rec, ("A1-A2", "C3-O1", "C4-O2", "O1"))
    np.testing.assert_array_equal(out[:, 0], rec.scalp[:, 4] - rec.scalp[:, 5])
    np.testing.assert_array_equal(out[:, 1], rec.scalp[:, 0] - rec.scalp[:, 2])
    np.testing.assert_array_equal(out[:, 3], rec.scalp[:, 2])
    # Sleep-EDF style: the channel already is the derivation.
    edf = make_recording(scalp=("EEG Fpz-Cz", "EEG Pz-Oz", "A1-A2"), ear=())
    out, names = montage.derive(edf, ("Fpz-Cz", "Pz-Oz", "A1-A2"))
    np.testing.assert_array_equal(out, edf.scalp)
    assert names == ("Fpz-Cz", "Pz-Oz", "A1-A2")


def test_unknown_derivation_and_bad_scalp_electrodes():
    rec = make_recording(subject="sub-007")
    with pytest.raises(DataError, match="sub-007: derivation F3-O1: no such channel"):
        montage.derive(rec, ("F3-O1",))
    with pytest.raises(DataError, match="derivation A1-A2: electrode A2 is rejected"):
        montage.derive(rec, ("A1-A2",), rejected={"A2"})
    rec.scalp[1000:1000 + 35 * 100, 1] = 3.0  # C4 stuck for 35 s
    with pytest.raises(DataError, match=r"derivation C4-O2: C4 is flat for 35\.0 s from 10\.0 s"):
        montage.derive(rec, ("C4-O2",))


def test_auto_reject_flat_noisy_and_near_dead_but_not_drifting():
    rec = make_recording(seconds=300.0)
    ear = rec.ear
    ear[:, EAR.index("ELE")] = 0.0  # disconnected
    ear[:, EAR.index("ERG")] *= 40.0  # wildly noisy
    ear[:, EAR.index("ERI")] *= 0.02  # barely any signal
    # A large slow drift is normal in unfiltered ear-EEG and must not count as noise.
    ear[:, EAR.index("ELB")] += np.linspace(-5000, 5000, rec.num_samples, dtype=np.float32)
    ear[:, EAR.index("ELK")] *= 2.5  # a bit louder than the rest: still fine
    reasons = montage.auto_reject(rec)
    assert set(reasons) == {"ELE", "ERG", "ERI"}
    assert reasons["ELE"].startswith("flat for 300.0 s")
    assert reasons["ERG"].startswith("noisy") and reasons["ERI"].startswith("near-flat")


def test_auto_reject_flat_stretch_within_the_night():
    rec = make_recording(seconds=300.0)
    rec.ear[5000:5000 + 3000, EAR.index("ERK")] = -12.5  # 30 s stuck mid-night
    rec.ear[20000:20000 + 2900, EAR.index("ERA")] = 1.0  # 29 s: below the threshold
    assert set(montage.auto_reject(rec)) == {"ERK"}


def test_rejection_mask_combines_config_recording_and_auto():
    rec = make_recording(rejected={"ELI"}, subject="sub-003")
    rec.ear[:, EAR.index("ERE")] = 0.0
    cfg = {"sub-003": ("ELK",), "sub-009": ("ERA",)}
    assert montage.rejection_mask(rec, cfg) == {"ELI", "ELK", "ERE"}
    assert montage.rejection_mask(rec, cfg, auto=False) == {"ELI", "ELK"}
    assert montage.rejection_mask(rec, None, auto=False) == {"ELI"}
    assert montage.rejection_mask(rec, {"sub-003": "ERK"}, auto=False) == {"ELI", "ERK"}
    reasons = montage.rejections(rec, cfg)
    assert reasons["ELK"] == "listed in data.ear_rejections"
    assert reasons["ELI"] == "marked bad by the recording"
    assert reasons["ERE"].startswith("flat for 120.0 s")
    with pytest.raises(DataError, match=r"sub-003: ear_rejections names electrodes \['ELX'\]"):
        montage.rejection_mask(rec, {"sub-003": ("ELX",)})


def test_longest_flat_run():
    x = np.array([1.0, 2, 2, 2, 3, 3, 4])
    assert montage.longest_flat_run(x) == (1, 3)
    assert montage.longest_flat_run(np.arange(4.0)) == (0, 1)
    assert montage.longest_flat_run(np.zeros(6)) == (0, 6)


@pytest.mark.parametrize("subject", ["sim-02", "sim-05", "sim-06"])
def test_auto_reject_finds_exactly_the_simulators_dead_electrodes(subject):
    # The simulator makes some ear electrodes dead (flat or disconnected and noisy) and lists them;
    # the rule must find those and only those, without being told.
    from eegkd_jax.data import simulate

    rec = simulate.simulate_recording(subject, seed=0, hours=0.25)
    assert rec.rejected_channels, "this subject is expected to have a dead electrode"
    assert set(montage.auto_reject(rec)) == set(rec.rejected_channels)
