"""EDF/EDF+ reader: the real Sleep-EDF hypnogram ST7132JR with a synthetic PSG written by MNE (edfio)."""
import datetime
import pathlib
import shutil

import numpy as np
import pytest

from eegkd_jax.data import edf
from eegkd_jax.data.recording import DataError

REAL_HYPNOGRAM = pathlib.Path(__file__).parent / "data" / "sleep-edf" / "ST7132JR-Hypnogram.edf"
# ST7132JR: W 60, S1 89, S2 384, S3 83 + S4 20 = N3 103, R 216 epochs, from 30 s after its start.
REAL_COUNTS = {"W": 60, "N1": 89, "N2": 384, "N3": 103, "REM": 216, "unscored": 0}
START = datetime.datetime(1994, 8, 8, 0, 31, tzinfo=datetime.timezone.utc)  # the hypnogram's header
PSG_CHANNELS = ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal", "EMG submental")


def write_psg(path, seconds, *, fs=100.0, start=START, channels=PSG_CHANNELS, seed=0, edit=None):
    """A Sleep-EDF-like PSG (microvolt noise; EEG Fpz-Cz carries a ramp marking the sample index)."""
    import mne

    n = int(round(seconds * fs))
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((len(channels), n)) * 20.0
    data[0] = np.arange(n) % 1000 - 500.0  # marker: sample index mod 1000
    if edit is not None:
        edit(data)
    types = ["eeg" if c.startswith("EEG") else c.split()[0].lower() for c in channels]
    info = mne.create_info(list(channels), fs, types)
    raw = mne.io.RawArray(data * 1e-6, info, verbose="error")  # MNE holds volts
    raw.set_meas_date(start)
    mne.export.export_raw(str(path), raw, fmt="edf", overwrite=True, verbose="error")
    return data


def write_hypnogram(path, annotations, start=START):
    """An annotation-only EDF+ file with (onset, duration, text) rows, as Sleep-EDF's hypnograms."""
    import edfio

    edf_file = edfio.Edf(
        [],
        annotations=[edfio.EdfAnnotation(o, d, t) for o, d, t in annotations],
        starttime=start.time().replace(tzinfo=None),
        recording=edfio.Recording(startdate=start.date()),
    )
    edf_file.write(str(path))
    return path


@pytest.fixture(scope="module")
def real_night(tmp_path_factory):
    """The real hypnogram beside a synthetic PSG covering its 852 epochs (30 s + 7 h 6 min + 10 s)."""
    d = tmp_path_factory.mktemp("sleep-edf")
    shutil.copyfile(REAL_HYPNOGRAM, d / "ST7132JR-Hypnogram.edf")
    data = write_psg(d / "ST7132J0-PSG.edf", 30.0 + 852 * 30.0 + 10.0)
    return d, data


def test_real_hypnogram_expands_to_the_known_epochs():
    hyp = edf.read_hypnogram(REAL_HYPNOGRAM)
    counts = {name: int(np.sum(hyp.labels == i)) for i, name in enumerate(["W", "N1", "N2", "N3", "REM"])}
    counts["unscored"] = int(np.sum(hyp.labels == -1))
    assert counts == REAL_COUNTS
    assert hyp.first_onset == 30.0 and hyp.start == START
    assert hyp.labels[:41].tolist() == [0] * 40 + [1]  # "+30 1200 W" then "+1230 120 S1"


def test_psg_with_real_hypnogram(real_night):
    d, data = real_night
    rec = edf.read_psg(d / "ST7132J0-PSG.edf", d / "ST7132JR-Hypnogram.edf")
    assert rec.subject == "ST7132J0" and rec.sampling_rate == 100.0
    assert rec.scalp_channels == ("EEG Fpz-Cz", "EEG Pz-Oz") and rec.ear_channels == ()
    assert rec.stage_counts() == REAL_COUNTS
    # Epoch 0 starts 30 s into the PSG: sample 3000, whose marker is 3000 % 1000 - 500.
    assert rec.scalp[0, 0] == pytest.approx(-500.0, abs=0.02)
    assert rec.num_samples == (852 * 30 + 10) * 100
    np.testing.assert_allclose(rec.scalp[:5000, 1], data[1, 3000:8000], atol=0.05)  # microvolts back


def test_directory_pairing_and_read_subject(real_night):
    d, _ = real_night
    assert edf.list_subjects(d) == ["ST7132J0"]
    rec = edf.read_subject(d, "ST7132J0")
    assert rec.labels.shape == (852,)
    with pytest.raises(DataError, match="no such subject"):
        edf.read_subject(d, "SC4001E0")


def test_pairing_rules(tmp_path):
    for name in ["SC4001E0-PSG.edf", "SC4001EC-Hypnogram.edf", "SC4002E0-PSG.edf", "SC4002EC-Hypnogram.edf",
                 "night-PSG.edf", "night-Hypnogram.edf"]:
        (tmp_path / name).touch()
    pairs = edf.pair_files(tmp_path)
    assert sorted(pairs) == ["SC4001E0", "SC4002E0", "night"]
    assert pairs["SC4001E0"][1].name == "SC4001EC-Hypnogram.edf"
    (tmp_path / "SC4001EX-Hypnogram.edf").touch()
    with pytest.raises(DataError, match="SC4001E0-PSG.edf: several hypnograms"):
        edf.pair_files(tmp_path)
    (tmp_path / "SC4001EX-Hypnogram.edf").unlink()
    (tmp_path / "SC4003E0-PSG.edf").touch()
    with pytest.raises(DataError, match=r"SC4003E0-PSG.edf: no hypnogram pairs with it \(expected SC4003E\?-Hypnogram.edf\)"):
        edf.pair_files(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no \\*-PSG.edf files"):
        edf.list_subjects(empty)
    with pytest.raises(DataError, match="does not exist"):
        edf.list_subjects(tmp_path / "nowhere")


def corrupt(path, how):
    """Make the header non-compliant in ways real recorders do, without changing the samples."""
    b = bytearray(path.read_bytes())
    ns = int(b[252:256])
    field = lambda offset, width, i: 256 + offset * ns + i * width  # noqa: E731
    if how == "reserved":  # free text after the EDF+C marker
        b[192:236] = b"EDF+C  exported by RecorderSoft 2.1".ljust(44)
    elif how == "signal_reserved":
        for i in range(ns):
            b[field(224, 32, i): field(224, 32, i) + 32] = b"calibrated 03/94 #7".ljust(32)
    elif how == "float_digital":  # digital min/max written as decimals
        b[field(120, 8, 0): field(120, 8, 0) + 8] = b"-32768.0"
        b[field(128, 8, 0): field(128, 8, 0) + 8] = b"32767.00"
    elif how == "date_format":
        b[168:176] = b"8.8.94  "
    elif how == "latin1_patient":
        b[8:88] = "X X X Müller".ljust(80).encode("latin-1")
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["reserved", "signal_reserved", "float_digital", "date_format", "latin1_patient"])
def test_non_compliant_headers_still_read(tmp_path, how):
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage W"), (60, 30, "Sleep stage 2")])
    data = write_psg(tmp_path / "x-PSG.edf", 100.0)
    corrupt(tmp_path / "x-PSG.edf", how)
    rec = edf.read_subject(tmp_path, "x")
    assert rec.labels.tolist() == [0, 0, 2]
    np.testing.assert_allclose(rec.scalp[:, 1], data[1], atol=0.05)


def test_unreadable_header_is_a_data_error(tmp_path):
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 30, "Sleep stage W")])
    write_psg(tmp_path / "x-PSG.edf", 40.0)
    b = bytearray((tmp_path / "x-PSG.edf").read_bytes())
    b[184:192] = b"99999   "  # header length that contradicts the number of signals
    (tmp_path / "x-PSG.edf").write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"x-PSG.edf: cannot read EDF header"):
        edf.read_subject(tmp_path, "x")


def test_hypnogram_rules(tmp_path):
    h = tmp_path / "h.edf"
    write_hypnogram(h, [(30, 60, "Sleep stage 4"), (90, 30, "Movement time"), (150, 30, "Sleep stage R"),
                        (180, 30, "Sleep stage ?"), (210, 30, "Sleep stage 3")])
    hyp = edf.read_hypnogram(h)
    assert hyp.labels.tolist() == [3, 3, -1, -1, 4, -1, 3]  # the 120-150 s gap is unscored
    assert hyp.first_onset == 30.0
    write_hypnogram(h, [(0, 30, "Sleep stage W"), (30, 30, "Lights off")])
    with pytest.raises(DataError, match="unknown annotation 'Lights off' at 30 s"):
        edf.read_hypnogram(h)
    write_hypnogram(h, [(0, 45, "Sleep stage W")])
    with pytest.raises(DataError, match="lasts 45 s, not a whole number of 30-s epochs"):
        edf.read_hypnogram(h)
    write_hypnogram(h, [(0, 60, "Sleep stage W"), (30, 30, "Sleep stage 1")])
    with pytest.raises(DataError, match="overlaps the previous annotation"):
        edf.read_hypnogram(h)
    write_hypnogram(h, [(0, 30, "Sleep stage W"), (40, 30, "Sleep stage 1")])
    with pytest.raises(DataError, match="gap of 10 s before 40 s"):
        edf.read_hypnogram(h)


def test_start_times_align_hypnogram_and_psg(tmp_path):
    # The PSG starts 60 s before the hypnogram: epoch 0 is PSG sample 6000.
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage 2")])
    write_psg(tmp_path / "x-PSG.edf", 150.0, start=START - datetime.timedelta(seconds=60))
    rec = edf.read_subject(tmp_path, "x")
    assert rec.scalp[0, 0] == pytest.approx(6000 % 1000 - 500.0, abs=0.02)
    write_psg(tmp_path / "x-PSG.edf", 150.0, start=START + datetime.timedelta(seconds=60))
    with pytest.raises(DataError, match="scoring starts 60 s before the PSG"):
        edf.read_subject(tmp_path, "x")


def test_signal_shorter_than_scoring(tmp_path):
    # Trailing unscored epochs past the end are cut; a scored one is an error.
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage 2"), (60, 600, "Sleep stage ?")])
    write_psg(tmp_path / "x-PSG.edf", 100.0)
    rec = edf.read_subject(tmp_path, "x")
    assert rec.labels.tolist() == [2, 2, -1]
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 90, "Sleep stage 2"), (90, 30, "Sleep stage R")])
    with pytest.raises(DataError, match=r"x-PSG.edf: signal is shorter than the scoring.*1 scored epochs past the end"):
        edf.read_subject(tmp_path, "x")


def test_nan_free_but_flat_gap_and_no_eeg(tmp_path):
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 90, "Sleep stage 2")])

    def flat(data):
        data[:2, 2000:6000] = 0.0

    write_psg(tmp_path / "x-PSG.edf", 90.0, edit=flat)
    with pytest.raises(DataError, match="flat stretch: all 2 channels"):
        edf.read_subject(tmp_path, "x")
    write_psg(tmp_path / "x-PSG.edf", 90.0, channels=("EOG horizontal", "Resp oro-nasal"))
    with pytest.raises(DataError, match="no EEG channels"):
        edf.read_subject(tmp_path, "x")


def test_channel_classes():
    assert [edf.classify_edf_channel(n) for n in ["EEG Fpz-Cz", "EEG ELA", "C3", "ERK", "EOG horizontal",
                                                   "Event marker", "Temp rectal"]] == [
        "scalp", "ear", "scalp", "ear", "drop", "drop", "drop"]


def test_eeg_keeps_its_own_rate_beside_faster_and_slower_channels(tmp_path):
    # Sleep-EDF mixes 100 Hz EEG with 1 Hz respiration; other recorders add a faster ECG. Written
    # with edfio directly, since MNE's exporter needs one rate for all channels.
    import edfio

    rng = np.random.default_rng(0)
    eeg = rng.standard_normal(100 * 90) * 20.0
    signals = [
        edfio.EdfSignal(eeg, sampling_frequency=100, label="EEG Fpz-Cz", physical_dimension="uV"),
        edfio.EdfSignal(rng.standard_normal(90), sampling_frequency=1, label="Resp oro-nasal"),
        edfio.EdfSignal(rng.standard_normal(256 * 90), sampling_frequency=256, label="ECG"),
    ]
    edfio.Edf(signals, starttime=START.time().replace(tzinfo=None),
              recording=edfio.Recording(startdate=START.date())).write(str(tmp_path / "x-PSG.edf"))
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 90, "Sleep stage W")])
    rec = edf.read_subject(tmp_path, "x")
    assert rec.sampling_rate == 100.0 and rec.scalp_channels == ("EEG Fpz-Cz",)
    np.testing.assert_allclose(rec.scalp[:, 0], eeg, atol=0.05)


def test_unscored_psg_and_finding_its_hypnogram(tmp_path):
    # A night nobody scored: the grid starts at the first sample, every whole epoch, all -1.
    data = write_psg(tmp_path / "x-PSG.edf", 100.0)
    rec = edf.read_psg(tmp_path / "x-PSG.edf", None)
    assert rec.labels.tolist() == [-1, -1, -1] and rec.subject == "x"
    np.testing.assert_allclose(rec.scalp[:, 1], data[1], atol=0.05)  # from sample 0
    assert edf.find_hypnogram(tmp_path / "x-PSG.edf") is None
    assert edf.scoring_start(tmp_path / "x-PSG.edf", None) == 0.0
    write_psg(tmp_path / "short-PSG.edf", 20.0)
    with pytest.raises(DataError, match="short-PSG.edf: signal is shorter than one 30-s epoch"):
        edf.read_psg(tmp_path / "short-PSG.edf", None)

    # The pairing rule of a directory, for one PSG; epoch 0 on the PSG's clock.
    write_hypnogram(tmp_path / "xY-Hypnogram.edf", [(0, 60, "Sleep stage 2")],
                    start=START + datetime.timedelta(seconds=30))
    write_psg(tmp_path / "xZ-PSG.edf", 100.0)
    assert edf.find_hypnogram(tmp_path / "xZ-PSG.edf") == tmp_path / "xY-Hypnogram.edf"
    assert edf.scoring_start(tmp_path / "xZ-PSG.edf", tmp_path / "xY-Hypnogram.edf") == 30.0
    (tmp_path / "xW-Hypnogram.edf").touch()
    with pytest.raises(DataError, match="xZ-PSG.edf: several hypnograms"):
        edf.find_hypnogram(tmp_path / "xZ-PSG.edf")
    assert edf.find_hypnogram(tmp_path / "night.edf") is None  # not named *-PSG.edf
