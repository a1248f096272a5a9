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


# The fixed EDF header, as the spec lays it out: main-header fields at fixed offsets, then each
# per-signal field once for every signal before the next field starts.
MAIN_FIELDS = {"starttime of recording": (176, 8), "number of bytes in header record": (184, 8),
               "number of data records": (236, 8),
               "duration of a data record": (244, 8), "number of signals": (252, 4)}
SIGNAL_FIELDS = [("label", 16), ("transducer type", 80), ("physical dimension", 8), ("physical minimum", 8),
                 ("physical maximum", 8), ("digital minimum", 8), ("digital maximum", 8), ("prefiltering", 80),
                 ("number of samples in each data record", 8), ("reserved", 32)]


def field_at(b, field, signal=None):
    """(offset, width) of a header field in the bytes ``b`` of an EDF file."""
    if signal is None:
        return MAIN_FIELDS[field]
    signals, at = int(b[252:256]), 256
    for name, width in SIGNAL_FIELDS:
        if name == field:
            return at + signal * width, width
        at += signals * width
    raise KeyError(field)


def set_field(path, field, value, signal=None):
    """Overwrite one header field of an EDF file with ``value``, space-padded as EDF stores text."""
    b = bytearray(path.read_bytes())
    at, width = field_at(b, field, signal)
    assert len(value) <= width
    b[at: at + width] = value.encode("latin-1").ljust(width)
    path.write_bytes(bytes(b))


def write_plain_edf(path, seconds, *, fs=200.0, record_seconds=1.0, labels=("EEG Fpz-Cz",), start=START,
                    seed=0):
    """A plain EDF file (no EDF+ "EDF Annotations" signal, so no time-keeping, as Sleep-EDF's PSGs),
    written byte by byte. Digital limits +-32767/8 over physical +-3276.7/8 uV: 0.1 uV a step.

    Returns the microvolts, (samples, signals).
    """
    spr, records, signals = int(round(fs * record_seconds)), int(round(seconds / record_seconds)), len(labels)
    digital = np.random.default_rng(seed).integers(-3000, 3000, (records, signals, spr)).astype("<i2")
    recording = "Startdate " + f"{start:%d-%b-%Y}".upper() + " X X X"
    main = ("0".ljust(8) + "X X X X".ljust(80) + recording.ljust(80) + f"{start:%d.%m.%y%H.%M.%S}" + str(256 * (signals + 1)).ljust(8) + "".ljust(44)
            + str(records).ljust(8) + f"{record_seconds:g}".ljust(8) + str(signals).ljust(4))
    values = {"label": labels, "transducer type": ["AgAgCl electrode"] * signals,
              "physical dimension": ["uV"] * signals, "physical minimum": ["-3276.8"] * signals,
              "physical maximum": ["3276.7"] * signals, "digital minimum": ["-32768"] * signals,
              "digital maximum": ["32767"] * signals, "prefiltering": [""] * signals,
              "number of samples in each data record": [str(spr)] * signals, "reserved": [""] * signals}
    header = main + "".join(v.ljust(width) for name, width in SIGNAL_FIELDS for v in values[name])
    path.write_bytes(header.encode("latin-1") + digital.tobytes())
    return digital.transpose(0, 2, 1).reshape(-1, signals) * 0.1


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
    # What passes read_header's checks but MNE still cannot read: a physical minimum of a channel
    # that is not even read (MNE parses the limits of all of them).
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 30, "Sleep stage W")])
    write_psg(tmp_path / "x-PSG.edf", 40.0)
    set_field(tmp_path / "x-PSG.edf", "physical minimum", "n/a", signal=2)  # EOG horizontal
    with pytest.raises(DataError, match=r"x-PSG.edf: cannot read EDF header \(ValueError"):
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


# ---- The header checks of read_header / read_psg: what a real file gets wrong. Each error names
# the file and the header field.

# The real Sleep-EDF PSG excerpt: in the tests' data folder if it has been copied there, else in the
# ../shared folder beside the project where there is one; the test that needs it is skipped without.
EXCERPT_NAME = "SC4001E0-PSG-first300s.edf"
REAL_EXCERPT = next((p for p in [pathlib.Path(__file__).parent / "data" / "sleep-edf" / EXCERPT_NAME,
                                 pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "sleep-edf"
                                 / EXCERPT_NAME] if p.is_file()), None)


def test_header_of_real_files():
    # Sleep-EDF hypnograms hold annotations alone, with a record duration of 0 (the spec allows it).
    header = edf.read_header(REAL_HYPNOGRAM)
    assert header.records == 1 and header.record_seconds == 0 and header.labels == ("EDF Annotations",)


@pytest.mark.skipif(REAL_EXCERPT is None, reason="the Sleep-EDF PSG excerpt is not here")
def test_real_sleep_edf_psg_excerpt(tmp_path):
    # A real plain-EDF PSG: 10 records of 30 s, EEG at 100 Hz beside 1-Hz channels.
    header = edf.read_header(REAL_EXCERPT)
    assert (header.records, header.record_seconds) == (10, 30.0)
    assert header.samples_per_record == (3000, 3000, 3000, 30, 30, 30, 30)
    rec = edf.read_psg(REAL_EXCERPT, None)
    assert rec.sampling_rate == 100.0 and rec.scalp_channels == ("EEG Fpz-Cz", "EEG Pz-Oz")
    assert rec.labels.shape == (10,) and rec.num_samples == 30000

    # Its hypnogram-to-be: all wake from the PSG's start (1989-04-24 16:13:00) over its 300 s.
    start = datetime.datetime(1989, 4, 24, 16, 13, tzinfo=datetime.timezone.utc)
    write_hypnogram(tmp_path / "SC4001EC-Hypnogram.edf", [(0, 300, "Sleep stage W")], start=start)
    psg = tmp_path / "SC4001E0-PSG.edf"
    shutil.copyfile(REAL_EXCERPT, psg)
    psg.chmod(0o644)
    assert edf.read_subject(tmp_path, "SC4001E0").labels.tolist() == [0] * 10
    set_field(psg, "duration of a data record", "60")  # 50 Hz, a rate that exists, but 600 s
    with pytest.raises(DataError, match=r"SC4001E0-PSG\.edf: signal runs 600 s \(10 records of 60 s by "
                                        r"header field 'duration of a data record'\), more than 1\.5 times"):
        edf.read_subject(tmp_path, "SC4001E0")
    set_field(psg, "duration of a data record", "300")  # 10 Hz: no EEG
    with pytest.raises(DataError, match=r"SC4001E0-PSG\.edf: signal 1 \('EEG Fpz-Cz'\) would be sampled at "
                                        r"10 Hz .*header fields 'duration of a data record'"):
        edf.read_subject(tmp_path, "SC4001E0")
    psg.write_bytes(REAL_EXCERPT.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"SC4001E0-PSG\.edf: truncated: header field 'number of data records' "
                                        r"is '10'.*\(5 whole records and 6752 bytes, 5 records missing\)"):
        edf.read_subject(tmp_path, "SC4001E0")


def test_truncated_or_overlong_file_is_refused(tmp_path):
    # Cut to half its size, the header still promising all of its records: not read in part.
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 600, "Sleep stage 2")])
    write_psg(tmp_path / "x-PSG.edf", 600.0)  # 600 records of 1 s (MNE's exporter)
    whole = (tmp_path / "x-PSG.edf").read_bytes()
    (tmp_path / "x-PSG.edf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"x-PSG\.edf: truncated: header field 'number of data records' is "
                                        r"'600': 600 records of 808 bytes after a 1536-byte header make "
                                        rf"{len(whole)} bytes, the file is {len(whole) // 2} .*301 records missing"):
        edf.read_subject(tmp_path, "x")
    # Longer than promised: the records past the count would be dropped without a word.
    (tmp_path / "x-PSG.edf").write_bytes(whole)
    set_field(tmp_path / "x-PSG.edf", "number of data records", "300")
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'number of data records' is '300'.*"
                                        r"\(242400 bytes more\): the record count is wrong"):
        edf.read_subject(tmp_path, "x")
    # Shorter than a header at all.
    (tmp_path / "x-PSG.edf").write_bytes(b"0       not an edf header")
    with pytest.raises(DataError, match=r"x-PSG\.edf: file is 25 bytes, shorter than the 256-byte EDF header"):
        edf.read_subject(tmp_path, "x")
    (tmp_path / "x-PSG.edf").write_bytes(whole[:1000])
    with pytest.raises(DataError, match=r"x-PSG\.edf: file is 1000 bytes, it ends inside its 1536-byte header"):
        edf.read_header(tmp_path / "x-PSG.edf")


def test_unknown_record_count_is_counted_from_the_file_size(tmp_path):
    # -1: the spec's "still recording"; the file size gives the count, but not half a record.
    data = write_plain_edf(tmp_path / "x-PSG.edf", 90.0)
    set_field(tmp_path / "x-PSG.edf", "number of data records", "-1")
    assert edf.read_header(tmp_path / "x-PSG.edf").records == 90
    rec = edf.read_psg(tmp_path / "x-PSG.edf", None)
    np.testing.assert_allclose(rec.scalp[:, 0], data[:, 0], atol=1e-3)
    whole = (tmp_path / "x-PSG.edf").read_bytes()
    (tmp_path / "x-PSG.edf").write_bytes(whole[:-100])
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'number of data records' is '-1' \(unknown\), "
                                        r"and the 35900 bytes .*\(89 records and 300 bytes\): the file ends inside"):
        edf.read_psg(tmp_path / "x-PSG.edf", None)


def test_record_duration_against_time_keeping(tmp_path):
    # EDF+ (MNE's exporter writes EDF+C): each record opens with its onset, which the duration must match.
    write_psg(tmp_path / "x-PSG.edf", 100.0)
    psg = tmp_path / "x-PSG.edf"
    whole = psg.read_bytes()
    set_field(psg, "duration of a data record", "2")  # was 1: would read as 50 Hz, 200 s
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'duration of a data record' is '2', but the "
                                        r"records' EDF\+ time-keeping annotations step by 1 s"):
        edf.read_psg(psg, None)

    # One record out of place: a gap. EDF+C promises none; EDF+D allows them, but MNE would join them.
    record_bytes, annotation_at = 4 * 200 + 6, 4 * 200  # four 100-Hz signals, then 3 annotation samples
    b = bytearray(whole)
    at = 1536 + 50 * record_bytes + annotation_at
    assert b[at: at + 4] == b"+50\x14"
    b[at: at + 4] = b"+60\x14"
    psg.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"x-PSG\.edf: data record 51 of 100 starts at 60 s by its time-keeping "
                                        r"annotation, a gap of 10 s after data record 50 \(49 s \+ 1 s by header "
                                        r"field 'duration of a data record'\); an EDF\+C file's records must be"):
        edf.read_psg(psg, None)
    b[192:197] = b"EDF+D"
    psg.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"x-PSG\.edf: data record 51 of 100 .*discontinuous EDF\+D recordings "
                                        "are not supported"):
        edf.read_psg(psg, None)
    b[at: at + 6] = bytes(6)  # no onset at all
    psg.write_bytes(bytes(b))
    with pytest.raises(DataError, match=r"x-PSG\.edf: data record 51 of 100: its 'EDF Annotations' signal does "
                                        "not open with a time-keeping onset"):
        edf.read_psg(psg, None)


def test_record_duration_of_a_plain_edf_against_the_hypnogram(tmp_path):
    # Without time-keeping annotations, a wrong record duration shows as a signal that runs far past
    # or stops short of its scoring, or as a rate no EEG has.
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 600, "Sleep stage 2")])
    psg = tmp_path / "x-PSG.edf"
    write_plain_edf(psg, 600.0)
    assert edf.read_subject(tmp_path, "x").labels.shape == (20,)
    set_field(psg, "duration of a data record", "2")  # 100 Hz, a plausible rate, but 1200 s
    with pytest.raises(DataError, match=r"x-PSG\.edf: signal runs 1200 s \(600 records of 2 s by header field "
                                        r"'duration of a data record'\), more than 1\.5 times the 600 s that its "
                                        r"hypnogram x-Hypnogram\.edf covers"):
        edf.read_subject(tmp_path, "x")
    set_field(psg, "duration of a data record", "0.5")  # 400 Hz, 300 s
    with pytest.raises(DataError, match=r"x-PSG\.edf: signal is shorter than the scoring.*10 scored epochs past "
                                        r"the end; the signal's length is 600 records of 0\.5 s by header field "
                                        r"'duration of a data record'\)"):
        edf.read_subject(tmp_path, "x")
    set_field(psg, "duration of a data record", "0.001")  # 200 kHz
    with pytest.raises(DataError, match=r"x-PSG\.edf: signal 1 \('EEG Fpz-Cz'\) would be sampled at 200000 Hz "
                                        r"\(200 samples per 0\.001-s record\), not a plausible EEG rate"):
        edf.read_subject(tmp_path, "x")


def test_duplicate_labels_are_refused(tmp_path):
    # MNE would rename them ELA-0 and ELA-1, and the bare names would pass for scalp electrodes.
    write_psg(tmp_path / "x-PSG.edf", 60.0, channels=("EEG ELA", "EEG ERA", "EOG horizontal"))
    set_field(tmp_path / "x-PSG.edf", "label", "EEG ELA", signal=1)
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'label' 'EEG ELA' is used by signals 1 and "
                                        r"2: duplicate channel labels are ambiguous"):
        edf.read_psg(tmp_path / "x-PSG.edf", None)
    set_field(tmp_path / "x-PSG.edf", "label", "eeg ela", signal=1)  # electrode names know no case
    with pytest.raises(DataError, match=r"'eeg ela' is used by signals 1 and 2"):
        edf.read_psg(tmp_path / "x-PSG.edf", None)
    set_field(tmp_path / "x-PSG.edf", "label", "EEG ERA", signal=1)
    assert edf.read_psg(tmp_path / "x-PSG.edf", None).ear_channels == ("EEG ELA", "EEG ERA")


@pytest.mark.parametrize("field, signal, value, problem", [
    ("duration of a data record", None, "nan", "not a positive number"),
    ("duration of a data record", None, "-1", "not a positive number"),
    ("duration of a data record", None, "one", "not a positive number"),
    ("duration of a data record", None, "0", r"not a positive number \(0 is allowed only in a file of annotations"),
    ("number of data records", None, "0", r"not a positive whole number \(or -1\)"),
    ("number of data records", None, "-5", r"not a positive whole number \(or -1\)"),
    ("number of data records", None, "nan", r"not a positive whole number \(or -1\)"),
    ("number of signals", None, "0", "not a positive whole number"),
    ("number of signals", None, "-2", "not a positive whole number"),
    ("number of signals", None, "four", "not a positive whole number"),
    ("number of samples in each data record", 0, "0", "not a positive whole number"),
    ("number of samples in each data record", 1, "-100", "not a positive whole number"),
    ("number of samples in each data record", 1, "1e2", "not a positive whole number"),
    ("number of bytes in header record", None, "99999", r"but a header of 5 signals is 256 \+ 5 x 256 = 1536"),
])
def test_header_fields_that_are_no_numbers(tmp_path, field, signal, value, problem):
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage W")])
    write_psg(tmp_path / "x-PSG.edf", 60.0)
    set_field(tmp_path / "x-PSG.edf", field, value, signal)
    names = " of signal 1 \\('EEG Fpz-Cz'\\)" if signal == 0 else " of signal 2 \\('EEG Pz-Oz'\\)" if signal else ""
    with pytest.raises(DataError, match=rf"x-PSG\.edf: header field '{field}'{names} is '{value}', {problem}"):
        edf.read_subject(tmp_path, "x")


def test_limits_of_the_eeg_signals(tmp_path):
    # Equal digital limits make MNE's scale infinite; equal physical limits make it zero.
    write_psg(tmp_path / "x-PSG.edf", 60.0)
    psg = tmp_path / "x-PSG.edf"
    whole = psg.read_bytes()
    at, width = field_at(whole, "digital minimum", 1)
    assert whole[at: at + width].strip() == b"-32767"  # MNE's exporter keeps -32768 free
    set_field(psg, "digital maximum", "-32767", signal=1)
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'digital maximum' of signal 2 \('EEG Pz-Oz'\) "
                                        r"is '-32767', not above the digital minimum '-32767'"):
        edf.read_psg(psg, None)
    psg.write_bytes(whole)
    set_field(psg, "physical maximum", "bad", signal=0)
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'physical maximum' of signal 1 "
                                        r"\('EEG Fpz-Cz'\) is 'bad', not a number"):
        edf.read_psg(psg, None)
    psg.write_bytes(whole)
    at, width = field_at(whole, "physical minimum", 0)
    set_field(psg, "physical maximum", whole[at: at + width].decode().strip(), signal=0)
    with pytest.raises(DataError, match=r"x-PSG\.edf: header field 'physical maximum' of signal 1 "
                                        r"\('EEG Fpz-Cz'\) equals the physical minimum"):
        edf.read_psg(psg, None)


# ---- Annotations are parsed by us, each in full or refused (MNE's pattern skipped a TAL it could
# not parse: a stage vanished, or the night started later, without a word).

@pytest.mark.parametrize("old, new, problem", [
    (b"+1230\x15120\x14", b"+1230\x15nan\x14",
     r"annotation 2 \('\+1230\\x15nan\\x14Sleep stage 1\\x14'\): duration 'nan' is not a number"),
    (b"+30\x151200\x14", b"+30\x1519x0\x14",
     r"annotation 1 \('\+30\\x1519x0\\x14Sleep stage W\\x14'\): duration '19x0' is not a number"),
    (b"+1350\x15", b"+13a0\x15",
     r"annotation 3 \('\+13a0\\x15180\\x14Sleep stage W\\x14'\): onset '\+13a0' is not a signed "
     r"number"),
    (b"+1230\x15120\x14", b"+1230\x15120\x15",
     r"annotation 2 \('\+1230\\x15120\\x15Sleep stage 1\\x14'\): duration '120\\x15Sleep stage 1'"),
    (b"+1530\x1530\x14Sleep stage 1\x14\x00", b"+1530\x1530\x14Sleep stage 1\x00\x00",
     r"annotation 4 \('\+1530\\x1530\\x14Sleep stage 1'\): its text does not end in byte 20"),
])
def test_an_annotation_that_cannot_be_parsed_is_refused(tmp_path, old, new, problem):
    assert len(old) == len(new)
    whole = REAL_HYPNOGRAM.read_bytes()
    assert whole.count(old) >= 1
    hypnogram = tmp_path / "ST7132JR-Hypnogram.edf"
    hypnogram.write_bytes(whole.replace(old, new, 1))
    with pytest.raises(DataError, match=rf"ST7132JR-Hypnogram\.edf: {problem}"):
        edf.read_hypnogram(hypnogram)
    write_psg(tmp_path / "ST7132J0-PSG.edf", 30.0 + 852 * 30.0)  # the cohort reader refuses too
    with pytest.raises(DataError, match=rf"ST7132JR-Hypnogram\.edf: {problem}"):
        edf.read_subject(tmp_path, "ST7132J0")


def test_annotations_agree_with_the_real_hypnogram():
    annotations = edf.read_annotations(REAL_HYPNOGRAM)
    assert len(annotations) == 116 and [a.index for a in annotations] == list(range(1, 117))
    first = annotations[0]
    assert (first.onset, first.duration, first.text) == (30.0, 1200.0, "Sleep stage W")


# ---- A wrong start time or record duration: refused where the file shows it, said where not.

def test_a_start_time_that_is_no_time_is_refused(tmp_path):
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage W")])
    write_psg(tmp_path / "x-PSG.edf", 60.0)
    for value in ("ab.cd.ef", "25.00.00", "12:00:00"):
        set_field(tmp_path / "x-PSG.edf", "starttime of recording", value)
        with pytest.raises(DataError, match=rf"x-PSG\.edf: header field 'starttime of recording' is "
                                            rf"'{value}', not a time of day hh\.mm\.ss"):
            edf.read_subject(tmp_path, "x")


def write_sleep_edf_like(path, seconds=1800.0):
    """A plain EDF file laid out as Sleep-EDF's PSGs: 30-s records of 3000 samples (100 Hz)."""
    return write_plain_edf(path, seconds, fs=100.0, record_seconds=30.0)


def test_a_rate_outside_sleep_eeg_is_warned_about(tmp_path, caplog):
    import logging

    psg = tmp_path / "x-PSG.edf"
    write_sleep_edf_like(psg)
    with caplog.at_level(logging.WARNING):
        edf.read_psg(psg, None)
    assert "outside the" not in caplog.text
    for seconds, rate in (("1", "3000"), ("3", "1000")):  # nothing in a plain EDF contradicts it
        set_field(psg, "duration of a data record", seconds)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            edf.read_psg(psg, None)
        assert (f"x-PSG.edf: signal 1 ('EEG Fpz-Cz') is sampled at {rate} Hz (3000 samples per "
                f"{seconds}-s record by header field 'duration of a data record'; nothing in a "
                "plain EDF file confirms it), outside the 100 to 512 Hz") in caplog.text
    set_field(psg, "duration of a data record", "300")  # 10 Hz: no EEG at all
    with pytest.raises(DataError, match=r"x-PSG\.edf: signal 1 \('EEG Fpz-Cz'\) would be sampled at 10 Hz"):
        edf.read_psg(psg, None)
