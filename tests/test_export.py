"""Export to LiteRT and ONNX: the files run in the LiteRT interpreter and onnxruntime and give
JAX's probabilities on a simulated night; the card travels inside and beside them."""
import json
import pathlib

import jax
import numpy as np
import pytest

from eegkd_jax.configs import common, supervised
from eegkd_jax import export, model_card
from test_predict import MODEL_RATE, fresh_state, save_run

pytestmark = pytest.mark.usefixtures("fast_compiles")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the export extra is not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained-looking runs: an ear U-Sleep ("usleep") and an ear transformer ("cmt"),
    10-Hz input (300 samples an epoch); the U-Sleep run has a model card, the other none."""
    root = tmp_path_factory.mktemp("export_runs")
    out = {}
    for name in ("usleep", "cmt"):
        config = supervised.get_config("ear,tiny")
        config.data.sampling_rate = MODEL_RATE
        if name == "cmt":
            config.model = common.cmt_config()
            config.model.update(d_model=16, num_heads=2, d_ff=32)
        _, state = fresh_state(config, 7)
        save_run(root / name, config, state, 1.0)
        out[name] = root / name
    from test_model_card import SPLITS, VALIDATION, fake_cohort

    config = supervised.get_config("ear,tiny")
    model_card.save(out["usleep"], model_card.build(config, fake_cohort(), SPLITS, VALIDATION))
    return out


def jax_probabilities(workdir, windows):
    from eegkd_jax import predict

    model = predict.load_trained_model(workdir)
    return np.asarray(jax.jit(export.probability_fn(model))(windows))


def test_exported_usleep_equals_jax_on_a_simulated_night(runs):
    from eegkd_jax import predict

    exported = {fmt: export.export_model(runs["usleep"], fmt, check_hours=0.1)
                for fmt in ("litert", "onnx")}
    # Each file runs in its own runtime on another simulated night, one epoch at a time.
    model = predict.load_trained_model(runs["usleep"])
    windows = export.simulated_windows(model, 1, hours=0.1, subject="sim-07")
    want = jax_probabilities(runs["usleep"], windows)
    for fmt, result in exported.items():
        assert result.path == runs["usleep"] / "export" / f"model-ear-step1{export.FORMATS[fmt]}"
        assert result.size_bytes == result.path.stat().st_size > 1000
        assert result.check["max_abs_difference"] <= export.TOLERANCE
        assert result.check["kappa_agreement"] == 1.0 and result.check["epochs"] == 12
        runner = export.Runner(result.path)
        assert runner.input_shape == (1, 300, 3)
        got = np.concatenate([runner(w[None]) for w in windows])
        assert got.shape == want.shape == (12, 1, 5)
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)

        # The card: inside the file, beside it, and what it says about the input.
        inside = export.read_card(result.path)
        assert inside == json.loads(result.card_path.read_text()) == result.card
        assert inside["input"]["shape"] == [1, 300, 3]
        assert inside["input"]["derivations"] == ["L-R", "L_E", "R_E"]
        assert inside["output"]["stages"] == ["W", "N1", "N2", "N3", "REM"]
        assert inside["model_card"]["data"]["source"] == "simulated"
        assert inside["exported"]["format"] == fmt and inside["check"] == result.check


def test_exported_transformer_equals_jax_in_onnx(runs, tmp_path):
    # The transformer's feed-forward layers are the LiteRT FULLY_CONNECTED whose bias tf2onnx
    # used to drop.
    result = export.export_model(runs["cmt"], "onnx", tmp_path / "cmt.onnx", check_hours=0.1)
    assert result.check["max_abs_difference"] <= export.TOLERANCE
    assert result.card["model_card"] is None  # a run without a card still exports
    from eegkd_jax import predict

    model = predict.load_trained_model(runs["cmt"])
    windows = export.simulated_windows(model, 1, hours=0.1, subject="sim-08")
    got = np.concatenate([export.Runner(result.path)(w[None]) for w in windows])
    np.testing.assert_allclose(got, jax_probabilities(runs["cmt"], windows), atol=1e-4)


def test_quantized_litert_variants_report_their_agreement(runs, tmp_path):
    float16 = export.export_model(runs["usleep"], "litert", tmp_path / "f16.tflite",
                                  quantize="float16", check_hours=0.1)
    int8 = export.export_model(runs["usleep"], "litert", tmp_path / "int8.tflite",
                               quantize="int8", check_hours=0.1)
    for variant in (float16, int8):
        assert 0.0 <= variant.check["stage_agreement"] <= 1.0
        assert -1.0 <= variant.check["kappa_agreement"] <= 1.0
        assert variant.card["exported"]["quantize"] in ("float16", "int8")
    assert float16.check["max_abs_difference"] < 1e-2
    with pytest.raises(export.ExportError, match="--quantize int8 is for --format litert"):
        export.export_model(runs["usleep"], "onnx", quantize="int8")
    with pytest.raises(export.ExportError, match="x.onnx: a litert file must end in .tflite"):
        export.export_model(runs["usleep"], "litert", tmp_path / "x.onnx")
    with pytest.raises(export.ExportError, match="cmt scores one epoch at a time"):
        export.export_model(runs["cmt"], "litert", epochs=2)


def run_export(capsys, *args):
    """``eegkd export ARGS`` in this process: (exit status, stdout, stderr)."""
    import sys

    from eegkd_jax import cli
    from test_cli import absl_command

    argv = list(sys.argv)
    try:
        with absl_command("export"), pytest.raises(SystemExit) as done:
            cli.main(["export", *args])
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


def test_command_line(runs, tmp_path, capsys):
    out = tmp_path / "student.tflite"
    code, printed, err = run_export(capsys, "--checkpoint", str(runs["usleep"]), "--format",
                                    "litert", "--out", str(out), "--check_hours", "0.1")
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0].startswith(f"wrote {out} (") and lines[0].endswith(f"its card {out}.json")
    assert lines[1] == ("input [1, 300, 3] float32 (L-R L_E R_E at 10 Hz), output [1, 1, 5] "
                        "probabilities of W N1 N2 N3 REM")
    assert lines[2].startswith("check on 12 windows of a 0.1-h simulated night")
    assert err == model_card.SIMULATED_WARNING + "\n"
    code, printed, err = run_export(capsys, "--checkpoint", str(runs["usleep"]),
                                    "--format=onnx", "--network=teacher")
    assert code == 1 and printed == ""
    assert err.startswith("error: ") and "holds no teacher" in err and err.count("\n") == 1


def test_the_command_prints_no_runtime_notices(runs, tmp_path):
    """In a fresh process, as a user runs it: TensorFlow's and LiteRT's C++ notices (oneDNN, the
    XNNPACK delegate, the converter's ignored options) stay off the screen, for ONNX too."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-m", "eegkd_jax.cli", "export", "--checkpoint", str(runs["usleep"]),
         "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--check_hours", "0.1"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == model_card.SIMULATED_WARNING + "\n"
    assert done.stdout.startswith(f"wrote {tmp_path / 'm.onnx'}")
