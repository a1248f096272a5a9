"""prepare_night: derivations, zero-phase band-pass, polyphase resampling, robust scaling, trimming."""
import numpy as np
import pytest

from eegkd_jax.configs.common import data_config
from eegkd_jax.data import preprocess
from eegkd_jax.data.recording import DataError, PairedNight, Recording
from test_montage import EAR, SCALP, make_recording


def cfg(**preprocess_overrides):
    d = data_config()
    d.auto_reject_ear = False
    for k, v in preprocess_overrides.items():
        d.preprocess[k] = v
    return d


def sine_recording(fs, seconds, freqs=(5.0,), amplitude=30.0, epochs=None):
    """Noise electrodes, except that C3 = O1 + a sum of sines, so C3-O1 is exactly the sines."""
    t = np.arange(int(round(seconds * fs))) / fs
    wave = sum(amplitude * np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32)
    rec = make_recording(seconds=seconds, fs=fs, epochs=epochs)
    rec.scalp[:, SCALP.index("C3")] = rec.scalp[:, SCALP.index("O1")] + wave
    return rec, t


def test_shapes_names_dtype_and_labels():
    rec = make_recording(seconds=95.0, fs=200.0)  # 3 epochs + 5 s past the last one
    night = preprocess.prepare_night(rec, cfg())
    assert isinstance(night, PairedNight)
    assert night.epoch_samples == 6000 and night.num_epochs == 3 and night.sampling_rate == 200.0
    assert night.scalp.shape == (18000, 3) and night.ear.shape == (18000, 3)
    assert night.scalp.dtype == np.float32 and night.ear.dtype == np.float32
    assert night.scalp_names == ("A1-A2", "C3-O1", "C4-O2") and night.ear_names == ("L-R", "L_E", "R_E")
    np.testing.assert_array_equal(night.labels, rec.labels)


def test_robust_scaling_and_clipping():
    rec = make_recording(seconds=90.0, fs=200.0)
    rec.scalp[7000, SCALP.index("A1")] = 1e6  # one huge spike
    night = preprocess.prepare_night(rec, cfg(bandpass_hz=None, clip_iqr=20.0))
    for x in np.concatenate([night.scalp, night.ear], axis=1).T:
        q25, q50, q75 = np.percentile(x, [25, 50, 75])
        assert abs(q50) < 1e-3 and q75 - q25 == pytest.approx(1.0, abs=1e-3)
    assert night.scalp[7000, 0] == 20.0 and np.abs(night.scalp).max() == 20.0
    unclipped = preprocess.prepare_night(rec, cfg(bandpass_hz=None, clip_iqr=None))
    assert unclipped.scalp[7000, 0] > 1000


@pytest.mark.parametrize("fs", [256.0, 100.0, 200.0])
def test_resampling_to_200_hz_keeps_the_waveform(fs):
    rec, _ = sine_recording(fs, 60.0, freqs=(5.0,))
    night = preprocess.prepare_night(rec, cfg(bandpass_hz=None, scaling="none"))
    t = np.arange(night.scalp.shape[0]) / 200.0
    want = 30.0 * np.sin(2 * np.pi * 5.0 * t)
    inner = slice(400, -400)  # polyphase filters ring at the very ends
    assert night.scalp.shape[0] == 12000
    np.testing.assert_allclose(night.scalp[inner, 1], want[inner], atol=0.05)


def test_bandpass_is_zero_phase_and_removes_out_of_band():
    rec, t = sine_recording(200.0, 60.0, freqs=(10.0, 60.0))
    night = preprocess.prepare_night(rec, cfg(bandpass_hz=(0.3, 35.0), scaling="none"))
    want = 30.0 * np.sin(2 * np.pi * 10.0 * t)  # the 10 Hz part, undelayed; 60 Hz gone
    inner = slice(2000, -2000)
    np.testing.assert_allclose(night.scalp[inner, 1], want[inner], atol=0.3)


def test_bandpass_edges_must_fit_the_rate():
    rec = make_recording(seconds=60.0, fs=64.0)
    with pytest.raises(DataError, match=r"upper edge 35 Hz must lie below Nyquist \(32 Hz at 64 Hz\)"):
        preprocess.prepare_night(rec, cfg(bandpass_hz=(0.3, 35.0)))
    with pytest.raises(DataError, match="lower edge"):
        preprocess.bandpass_sos((20.0, 10.0), 200.0)
    assert preprocess.bandpass_sos(None, 200.0) is None
    assert preprocess.bandpass_sos((None, 30.0), 200.0).shape == (2, 6)  # 4th-order low-pass


def test_resample_ratios():
    assert preprocess.resample_ratio(256.0, 200.0) == (25, 32)
    assert preprocess.resample_ratio(100.0, 200.0) == (2, 1)
    assert preprocess.resample_ratio(200.0, 200.0) == (1, 1)
    with pytest.raises(DataError, match="no simple rational resampling"):
        preprocess.resample_ratio(200.0 + 1e-4, 200.0)


def test_epoch_not_whole_samples_and_epoch_length_mismatch():
    rec = make_recording(seconds=60.0, fs=100.01)
    with pytest.raises(DataError, match=r"30 s is not a whole number of samples at 100\.01 Hz"):
        preprocess.prepare_night(rec, cfg())
    d = cfg()
    d.epoch_seconds = 20.0
    with pytest.raises(DataError, match="scored in 30-s epochs, config says 20 s"):
        preprocess.prepare_night(make_recording(seconds=60.0), d)


def test_trims_past_the_last_scored_epoch_before_judging_electrodes():
    rec = make_recording(seconds=100.0, fs=100.0, epochs=2)
    rec.ear[6000:, EAR.index("ELA")] = 0.0  # electrode removed after the scored span: irrelevant
    d = cfg()
    d.auto_reject_ear = True
    night = preprocess.prepare_night(rec, d)
    assert night.scalp.shape == (12000, 3)


def test_uses_configured_rejections_and_names_subject_when_a_side_is_empty():
    rec = make_recording(seconds=60.0, subject="sub-006")
    d = cfg()
    d.ear_rejections["sub-006"] = ("ELA", "ELB")
    with pytest.raises(DataError, match="sub-006: derivation L_E: every electrode of ELA, ELB is rejected"):
        preprocess.prepare_night(rec, d)
    d.ear_derivations = ("L-R",)
    night = preprocess.prepare_night(rec, d)
    assert night.ear_names == ("L-R",)


def test_rejections_are_logged(caplog):
    rec = make_recording(seconds=60.0, subject="sub-002")
    rec.ear[:, EAR.index("ERG")] *= 50.0
    d = cfg()
    d.auto_reject_ear = True
    d.ear_rejections["sub-002"] = ("ELA",)
    with caplog.at_level("INFO", logger="eegkd_jax.data.preprocess"):
        preprocess.prepare_night(rec, d)
    assert "sub-002: rejected ELA (listed in data.ear_rejections); ERG (noisy" in caplog.text


def test_constant_derivation_cannot_be_scaled():
    x = np.zeros(100)
    with pytest.raises(DataError, match="sub-001: L-R has zero inter-quartile range"):
        preprocess.robust_scale(x, 20.0, "sub-001", "L-R")


def test_sleep_edf_style_night_with_no_ear_channels():
    rec = make_recording(seconds=60.0, fs=100.0, scalp=("EEG Fpz-Cz", "EEG Pz-Oz"), ear=())
    d = cfg()
    d.scalp_derivations = ("Fpz-Cz", "Pz-Oz")
    d.ear_derivations = ()
    night = preprocess.prepare_night(rec, d)
    assert night.scalp.shape == (12000, 2) and night.ear.shape == (12000, 0)
    assert isinstance(rec, Recording)


# ----------------------------------------------------------------------------- sources -> prepare_night


def test_unknown_source_and_missing_path():
    from eegkd_jax.data import sources

    d = cfg()
    d.source = "physionet"
    with pytest.raises(ValueError, match="unknown data.source 'physionet'"):
        sources.list_subjects(d)
    d.source = "eesm17"
    with pytest.raises(ValueError, match="set data.path"):
        sources.load_recording(d, "sub-001")


def test_eesm17_source_end_to_end(tmp_path):
    from eegkd_jax.data import sources
    from test_bids import make_night

    make_night(tmp_path, "sub-002", epochs=2)
    make_night(tmp_path, "sub-001", epochs=3, seed=1)
    d = data_config()
    d.source, d.path = "eesm17", str(tmp_path)
    assert sources.list_subjects(d) == ["sub-001", "sub-002"]
    night = preprocess.prepare_night(sources.load_recording(d, "sub-001"), d)
    assert night.subject == "sub-001" and night.scalp.shape == (18000, 3) and night.ear.shape == (18000, 3)
    assert night.labels.tolist() == [1, 1, 2]
    with pytest.raises(DataError, match="sub-003: subject directory does not exist"):
        sources.load_recording(d, "sub-003")


def test_edf_source_end_to_end(tmp_path):
    from eegkd_jax.data import sources
    from test_edf import write_hypnogram, write_psg

    write_hypnogram(tmp_path / "SC4001EC-Hypnogram.edf", [(30, 60, "Sleep stage 2"), (90, 30, "Sleep stage R")])
    write_psg(tmp_path / "SC4001E0-PSG.edf", 130.0)
    d = data_config()
    d.source, d.path = "edf", str(tmp_path)
    d.scalp_derivations, d.ear_derivations = ("Fpz-Cz", "Pz-Oz"), ()
    assert sources.list_subjects(d) == ["SC4001E0"]
    night = preprocess.prepare_night(sources.load_recording(d, "SC4001E0"), d)  # 100 Hz -> 200 Hz
    assert night.sampling_rate == 200.0 and night.scalp.shape == (18000, 2) and night.ear.shape == (18000, 0)
    assert night.labels.tolist() == [2, 2, 4]


def test_simulated_source_end_to_end():
    from eegkd_jax.data import sources

    d = data_config()
    d.simulated.subjects, d.simulated.hours = 3, 0.05
    assert sources.list_subjects(d) == ["sim-01", "sim-02", "sim-03"]
    rec = sources.load_recording(d, "sim-03")
    assert rec.subject == "sim-03" and rec.labels.shape == (6,)
    night = preprocess.prepare_night(rec, d)
    assert night.scalp.shape == (36000, 3) and night.ear.shape == (36000, 3)
    with pytest.raises(DataError, match="sim-04: not in the simulated cohort of 3"):
        sources.load_recording(d, "sim-04")
