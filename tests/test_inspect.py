"""`python -m eegkd_jax.data.inspect PATH`: one JSON object, or one error line and a non-zero exit."""
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eegkd_jax.data import inspect as inspect_cli
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
    code = inspect_cli.main([str(path)])
    out, err = capsys.readouterr()
    return code, out, err


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
    cmd = [sys.executable, "-m", "eegkd_jax.data.inspect"]
    good = subprocess.run(cmd + [str(tmp_path / "ST7132JR-Hypnogram.edf")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["epochs"] == 852
    bad = subprocess.run(cmd + [str(tmp_path / "broken-PSG.edf")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr and "broken-PSG.edf" in bad.stderr
