"""The predict tool on tiny hand-made runs: synthetic EDF and EESM .set recordings staged by an
ear U-Sleep, a scalp U-Sleep and an ear transformer whose checkpoints are written directly through
the checkpoint API (staging needs no training), checked against a plain forward pass."""

import datetime
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from matplotlib import image as mpl_image

from eegkd_jax.configs import common, supervised
from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import predict, report
from eegkd_jax.data.recording import DataError, Recording
from eegkd_jax.train import state as state_lib
from test_bids import make_night
from test_edf import write_hypnogram, write_psg
from test_inspect import write_edf

MODEL_RATE = 10.0  # 300 samples per 30-s epoch: tiny models, and a multiple of the CMT's stride
EDF_RATE = 100.0
SCALP = ("EEG C3", "EEG C4", "EEG O1", "EEG O2", "EEG A1", "EEG A2")
EAR = tuple(f"EEG {e}" for e in ("ELA", "ELB", "ELE", "ELG", "ELI", "ELK",
                                 "ERA", "ERB", "ERE", "ERG", "ERI", "ERK"))
START = datetime.datetime(2017, 3, 1, 22, 0, tzinfo=datetime.timezone.utc)
SCORED_EPOCHS = 9
# Stages of the hypnogram beside the EDF; it starts 30 s after the PSG, as Sleep-EDF's do.
STAGES = [(30, 60, "Sleep stage W"), (90, 90, "Sleep stage 2"), (180, 30, "Sleep stage 3"),
          (210, 60, "Sleep stage R"), (270, 30, "Sleep stage 1")]


# Only forward passes run here, and compilation dominates.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def save_run(workdir, config, state, scale, steps=((1, 0.5),)):
    """Writes config.json and checkpoints of ``state`` with its parameters scaled by
    ``scale * (1 + 0.3 * step)``, so that every run and step is a different network."""
    ckpt_lib.save_config(config, workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=5)
    saved = {}
    for step, kappa in steps:
        params = jax.tree.map(lambda p, s=step: p * scale * (1.0 + 0.3 * s), state.params)
        saved[step] = state.replace(step=state.step + step, params=params)
        checkpointer.save(saved[step].to_dict(), metrics={"kappa": kappa})
    checkpointer.close()
    return saved


def fresh_state(config, seed):
    """(module, TrainState) of the config's trained model, freshly initialised."""
    from eegkd_jax.models import build_model, init_variables
    from eegkd_jax.configs import trained_model_config

    n_in = len(config.data[f"{config.supervised_input}_derivations"])
    module = build_model(trained_model_config(config), in_channels=n_in,
                         sampling_rate=MODEL_RATE)
    tx = state_lib.make_optimizer(config.optimizer, 10)
    state = jax.jit(lambda key: state_lib.create_state(
        key, lambda k: init_variables(module, k, (1, 300, n_in)), tx))(jax.random.PRNGKey(seed))
    return module, state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs: "ear" (U-Sleep on ear-EEG, best step 1, latest 2), "scalp" (U-Sleep on scalp),
    "cmt" (a narrow transformer on ear-EEG). Their data configs build a 10-Hz simulated cohort in
    the tmp dir (used by the test against evaluate_checkpoint)."""
    root = tmp_path_factory.mktemp("runs")
    configs = {}
    for name, variant in (("ear", "ear,tiny"), ("scalp", "scalp,tiny"), ("cmt", "ear,tiny")):
        config = supervised.get_config(variant)
        config.data.sampling_rate = MODEL_RATE
        config.data.cache_dir = str(root / "tfds")
        if name == "cmt":
            config.model = common.cmt_config()
            config.model.update(d_model=16, num_heads=2, d_ff=32)
        configs[name] = config
    # Scalp and ear U-Sleeps have the same shapes (three derivations each): one init serves both.
    usleep, usleep_state = fresh_state(configs["ear"], 3)
    cmt, cmt_state = fresh_state(configs["cmt"], 4)
    return {
        "ear": (root / "ear", usleep,
                save_run(root / "ear", configs["ear"], usleep_state, 1.0, ((1, 0.5), (2, 0.1)))),
        "scalp": (root / "scalp", usleep, save_run(root / "scalp", configs["scalp"], usleep_state,
                                                   0.8)),
        "cmt": (root / "cmt", cmt, save_run(root / "cmt", configs["cmt"], cmt_state, 1.0)),
    }


@pytest.fixture(scope="module")
def edf_dir(tmp_path_factory):
    """A PSG with scalp and ear electrodes, 10 whole epochs, and its hypnogram (9 epochs from
    30 s)."""
    d = tmp_path_factory.mktemp("edf")
    write_psg(d / "night1-PSG.edf", 10 * 30.0 + 12.0, fs=EDF_RATE, start=START,
              channels=SCALP + EAR, seed=1)
    write_hypnogram(d / "night1-Hypnogram.edf", STAGES, start=START)
    return d


def direct_probabilities(run, new, state):
    """The whole night through module.apply, no sharding, batching or collector."""
    workdir, module, _ = run
    model = predict.load_trained_model(workdir, "latest")
    night = predict.prepare_input(new, model)
    x = night.ear if model.input_key == "ear" else night.scalp
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if model.model_config.name == "cmt":
        x = x.reshape(-1, 300, x.shape[1])  # one epoch per row
    else:
        x = x[None]
    logits = jax.jit(lambda v, x: module.apply(v, x, train=False)[0])(variables, x)
    return np.asarray(jax.nn.softmax(logits, axis=-1)).reshape(-1, 5)


def check_outputs(result, epochs, first_onset):
    onsets, stages, probabilities = report.read_hypnogram_tsv(result["tsv"])
    assert stages.size == epochs == result["epochs"]  # one row per epoch
    np.testing.assert_allclose(onsets, first_onset + 30.0 * np.arange(epochs))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=2e-3)
    assert np.all(stages >= 0)  # every epoch staged, scored or not
    image = mpl_image.imread(result["png"])  # a real PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    info = json.loads(pathlib.Path(result["json"]).read_text())
    assert info["epochs"] == epochs and info["first_onset_seconds"] == first_onset
    return stages, probabilities, info


def test_edf_with_hypnogram_ear_model_whole_night(runs, edf_dir, tmp_path):
    workdir, _, saved = runs["ear"]
    result = predict.predict_recording(workdir, edf_dir / "night1-PSG.edf", tmp_path / "out")
    assert result["step"] == 1  # best validation kappa, not the latest
    assert result["scored"] and result["name"] == "night1"
    stages, probabilities, info = check_outputs(result, SCORED_EPOCHS, 30.0)
    assert info["metrics"]["num_epochs"] == SCORED_EPOCHS
    assert info["checkpoint"]["input"] == "ear"
    assert info["checkpoint"]["derivations"] == ["L-R", "L_E", "R_E"]
    assert sum(info["predicted_stage_counts"].values()) == SCORED_EPOCHS
    new = predict.read_new_recording(edf_dir / "night1-PSG.edf")
    assert new.recording.labels.tolist() == [0, 0, 2, 2, 2, 3, 4, 4, 1]
    expected = direct_probabilities(runs["ear"], new, saved[1])
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)  # the TSV keeps 4 decimals
    np.testing.assert_array_equal(stages, expected.argmax(axis=1))


def test_edf_without_hypnogram_stages_every_epoch(runs, edf_dir, tmp_path):
    shutil.copyfile(edf_dir / "night1-PSG.edf", tmp_path / "night1-PSG.edf")  # no hypnogram here
    workdir = runs["ear"][0]
    result = predict.predict_recording(workdir, tmp_path / "night1-PSG.edf", tmp_path / "out",
                                       which="latest")
    assert result["step"] == 2 and not result["scored"] and result["metrics"] is None
    _, _, info = check_outputs(result, 10, 0.0)  # 312 s: ten whole epochs from the first sample
    assert info["scored"] is False and info["metrics"] is None
    # Ignoring a hypnogram that is there gives the same unscored night.
    ignored = predict.predict_recording(workdir, edf_dir / "night1-PSG.edf", tmp_path / "ignored",
                                        which="latest", hypnogram=None)
    assert ignored["epochs"] == 10 and not ignored["scored"]


def test_eesm_set_and_subject_directory_scalp_model(runs, tmp_path):
    root = tmp_path / "bids"
    set_path, _, _ = make_night(root, "sub-001", epochs=6, sfreq=EDF_RATE, extra_seconds=40.0)
    workdir, _, saved = runs["scalp"]
    result = predict.predict_recording(workdir, set_path, tmp_path / "set")
    new = predict.read_new_recording(set_path)
    start = new.start_seconds
    assert new.scored and start == float(int(start))  # Lights Off truncated to the second
    stages, probabilities, info = check_outputs(result, 6, start)
    assert info["checkpoint"]["input"] == "scalp" and result["metrics"]["num_epochs"] <= 6
    np.testing.assert_allclose(probabilities, direct_probabilities(runs["scalp"], new, saved[1]),
                               atol=1e-4)
    by_directory = predict.predict_recording(workdir, root / "sub-001", tmp_path / "dir")
    np.testing.assert_array_equal(report.read_hypnogram_tsv(by_directory["tsv"])[1], stages)

    # Without its scoring file the night is staged to the end of the signal, nothing compared.
    scoring = next(set_path.parent.glob("*_acq-scoring_events.tsv"))
    scoring.unlink()
    unscored = predict.predict_recording(workdir, set_path, tmp_path / "unscored")
    assert not unscored["scored"] and unscored["epochs"] == 7  # the 40 s extra hold one more epoch


def test_transformer_predicts_epoch_by_epoch(runs, tmp_path):
    set_path, _, _ = make_night(tmp_path / "bids", "sub-002", epochs=11, sfreq=EDF_RATE)
    workdir, _, saved = runs["cmt"]
    # 11 single-epoch sequences over 8 devices: two batches of 8, the second mostly padding.
    result = predict.predict_recording(workdir, set_path, tmp_path / "out", batch_size=8)
    new = predict.read_new_recording(set_path)
    _, probabilities, info = check_outputs(result, 11, new.start_seconds)
    assert info["checkpoint"]["model"] == "cmt"
    np.testing.assert_allclose(probabilities, direct_probabilities(runs["cmt"], new, saved[1]),
                               atol=1e-4)


def test_usleep_in_pieces_when_asked(runs, edf_dir):
    model = predict.load_trained_model(runs["ear"][0], "best")
    new = predict.read_new_recording(edf_dir / "night1-PSG.edf")
    night = predict.prepare_input(new, model)
    probabilities, predicted = predict.predict_probabilities(
        model, night.ear, night.labels, max_sequence_epochs=2, batch_size=8)
    # Five 2-epoch sequences (the last one padded), each staged on its own.
    assert probabilities.shape == (SCORED_EPOCHS, 5) and predicted.shape == (SCORED_EPOCHS,)
    first_two, _ = predict.predict_probabilities(model, night.ear[: 2 * 300], night.labels[:2])
    np.testing.assert_allclose(probabilities[:2], first_two, atol=1e-5)


def test_an_exported_simulated_night_is_staged_as_evaluation_staged_it(runs, tmp_path):
    """The cohort's test night sim-04, written to EDF and staged by the predict tool, gets the
    stages and probabilities evaluate_checkpoint gave it from the training pipeline's shards: the
    tool feeds the model what it was trained on (derivations, rejections, filtering, rate,
    scaling)."""
    import mne

    from eegkd_jax import evaluate
    from eegkd_jax.data import simulate

    workdir = runs["ear"][0]
    evaluate.evaluate_checkpoint(workdir, tmp_path / "eval", subjects=["sim-04"], batch_size=8)
    _, want_stages, want_probabilities = report.read_hypnogram_tsv(
        tmp_path / "eval" / "hypnograms" / "sim-04.tsv")

    config = ckpt_lib.load_config(workdir)
    night = simulate.simulate_recording("sim-04", seed=config.data.simulated.seed,
                                        hours=config.data.simulated.hours)
    signal = np.concatenate([night.scalp, night.ear], axis=1).T.astype(np.float64) * 1e-6
    names = [*night.scalp_channels, *night.ear_channels]
    raw = mne.io.RawArray(signal, mne.create_info(names, night.sampling_rate, "eeg"),
                          verbose="error")
    mne.export.export_raw(str(tmp_path / "sim-04-PSG.edf"), raw, fmt="edf", verbose="error")
    # The training windows were single epochs (sequence_length 1): stage the same way.
    result = predict.predict_recording(workdir, tmp_path / "sim-04-PSG.edf", tmp_path / "pred",
                                       max_sequence_epochs=1)
    _, stages, probabilities = report.read_hypnogram_tsv(result["tsv"])
    np.testing.assert_array_equal(stages, want_stages)
    np.testing.assert_allclose(probabilities, want_probabilities, atol=2e-4)


def test_wrong_channels_and_rate_name_the_file(runs, tmp_path):
    workdir = runs["ear"][0]
    sleep_edf = tmp_path / "sc-PSG.edf"  # Sleep-EDF style: two bipolar scalp channels only
    write_psg(sleep_edf, 120.0, fs=EDF_RATE, channels=("EEG Fpz-Cz", "EEG Pz-Oz"))
    with pytest.raises(DataError) as refused:
        predict.predict_recording(workdir, sleep_edf, tmp_path / "x")
    message = str(refused.value)
    # The channels present, the derivations needed, an example map, and the ear electrodes.
    assert message.startswith(f"{sleep_edf}: cannot form the ear derivations ['L-R', 'L_E', 'R_E'] "
                              "that the model reads (L-R: the recording has none of ELA, ELB, ELE, "
                              "ELG, ELI, ELK; L_E: the recording has none of ELA, ELB")
    assert "The recording's EEG channels are ['EEG Fpz-Cz', 'EEG Pz-Oz']" in message
    # Two signals for three inputs: each channel once, then one repeated, and said so.
    assert ("--channel_map='L-R=EEG Fpz-Cz,L_E=EEG Pz-Oz,R_E=EEG Fpz-Cz'" in message
            and "R_E repeats the signal of L-R" in message
            and "ELA ELB ELE ELG ELI ELK (left)" in message and "--network=teacher" in message)
    with pytest.raises(DataError, match=r"sc-PSG\.edf: cannot form the scalp derivations.*"
                                        r"A1-A2: no channel has A1 and A2"):
        predict.predict_recording(runs["scalp"][0], sleep_edf, tmp_path / "x")
    with pytest.raises(DataError, match=r"--channel_map: maps \['C3-O1'\], which the model does "
                                        r"not read; it reads the ear derivations"):
        predict.predict_recording(workdir, sleep_edf, tmp_path / "x", channel_map="C3-O1=C3")

    # A 10-Hz model saw up to 5 Hz: a 50-Hz recording carries that, though the run's 35-Hz edge
    # lies above its Nyquist frequency: the high-pass alone is applied.
    slow = tmp_path / "slow-PSG.edf"
    write_psg(slow, 120.0, fs=50.0, channels=SCALP + EAR)
    staged = predict.predict_recording(workdir, slow, tmp_path / "slow")
    assert json.loads(staged["json"].read_text())["bandpass_hz"] == [0.3, None]
    # An 8-Hz recording does not: refused, with the model rate that would fit it.
    rng = np.random.default_rng(0)
    too_slow = Recording(subject="s", source=str(tmp_path / "s.edf"), sampling_rate=8.0,
                         scalp=np.zeros((960, 0), np.float32), scalp_channels=(),
                         ear=rng.standard_normal((960, 12)).astype(np.float32),
                         ear_channels=tuple(e.removeprefix("EEG ") for e in EAR),
                         labels=np.full(4, -1, np.int8))
    model = predict.load_trained_model(workdir)
    with pytest.raises(DataError, match=r"s\.edf: sampled at 8 Hz \(content up to 4 Hz\), but the "
                                        r"model was trained on 10-Hz input band-passed to "
                                        r"\[0\.3, 35\.0\] Hz: content up to 5 Hz, which needs a "
                                        r"recording rate of 10 Hz or more.*add "
                                        r"--config\.data\.sampling_rate=8 to the training command"):
        predict.check_compatible(predict.NewRecording(too_slow, tmp_path / "s.edf", False, 0.0),
                                 model)
    assert not (tmp_path / "x").exists()  # refused before anything was written

    with pytest.raises(DataError, match="must be a BIDS subject directory"):
        predict.read_new_recording(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not an EDF/EDF. file"):
        predict.read_new_recording(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no such file"):
        predict.read_new_recording(tmp_path / "missing.edf")
    with pytest.raises(ValueError, match="holds no teacher"):
        predict.load_trained_model(workdir, network="teacher")


def test_checkpoints_directory_and_cli(runs, edf_dir, tmp_path, capsys):
    from absl import flags

    from eegkd_jax.cli import common as cli_common
    from eegkd_jax.cli import predict as command
    from test_cli import absl_command

    workdir = runs["ear"][0]
    assert predict.run_workdir(workdir / "checkpoints") == workdir
    main = cli_common.report_errors(command.main)  # as `eegkd predict` runs it
    with absl_command("predict"):
        command.define_flags()
        flags.FLAGS(["predict", f"--checkpoint={workdir / 'checkpoints'}", "--which=2",
                     f"--out={tmp_path / 'cli'}"])
        main(["predict", str(edf_dir / "night1-PSG.edf")])
        captured = capsys.readouterr()
        printed = captured.out
        assert printed.startswith("night1: 9 epochs staged (step 2); against the scoring: acc ")
        assert f"no model card in {workdir}" in printed
        # A simulated-only model says so, in one line.
        from eegkd_jax import model_card
        assert captured.err.count(model_card.SIMULATED_WARNING + "\n") == 1
        assert (tmp_path / "cli" / "night1_hypnogram.png").is_file()
        write_psg(tmp_path / "sc-PSG.edf", 60.0, fs=EDF_RATE, channels=("EEG Fpz-Cz",))
        with pytest.raises(SystemExit) as done:
            main(["predict", str(tmp_path / "sc-PSG.edf")])
        err = capsys.readouterr().err
        assert done.value.code == 1 and err.count("\n") == 1
        assert re.match(r"error: .*sc-PSG\.edf: cannot form the ear", err)


def test_referenced_labels_give_the_derivations_of_monopolar_ones(runs, tmp_path):
    """DREAMS-like labels, everything against A1 ('EEG C3-A1', 'EEG A2-A1'): A1-A2, C3-O1 and C4-O2
    come from chains of channels, and stage the night as the same electrodes recorded monopolar."""
    mono = write_psg(tmp_path / "mono.edf", 150.0, fs=EDF_RATE, channels=SCALP, seed=4)
    c3, c4, o1, o2, a1, a2 = mono
    labels = ("EEG C3-A1", "EEG C4-A1", "EEG O1-A1", "EEG O2-A1", "EEG A2-A1")

    def referenced(data):
        data[:] = np.stack([c3 - a1, c4 - a1, o1 - a1, o2 - a1, a2 - a1])

    write_psg(tmp_path / "ref.edf", 150.0, fs=EDF_RATE, channels=labels, edit=referenced)
    workdir = runs["scalp"][0]
    want = predict.predict_recording(workdir, tmp_path / "mono.edf", tmp_path / "mono")
    got = predict.predict_recording(workdir, tmp_path / "ref.edf", tmp_path / "ref")
    assert got["inputs"] == {"A1-A2": "-EEG A2-A1", "C3-O1": "EEG C3-A1 - EEG O1-A1",
                             "C4-O2": "EEG C4-A1 - EEG O2-A1"}
    assert want["inputs"]["C3-O1"] == "EEG C3 - EEG O1"
    _, want_stages, want_p = report.read_hypnogram_tsv(want["tsv"])
    _, got_stages, got_p = report.read_hypnogram_tsv(got["tsv"])
    np.testing.assert_allclose(got_p, want_p, atol=2e-3)  # EDF keeps 16 bits of each channel


def test_channel_map_stands_in_for_missing_electrodes(runs, tmp_path, capsys):
    """napview-like: F3 F4 C3 C4 O1 O2, no A1 / A2. The scalp model says what is missing and how to
    map it; with the map it stages the night, and the JSON says what stood for what."""
    from eegkd_jax import model_card
    from test_model_card import SPLITS, VALIDATION, fake_cohort

    path = tmp_path / "eeg.edf"
    write_psg(path, 120.0, fs=EDF_RATE, channels=tuple(
        f"EEG {e}" for e in ("F3", "F4", "C3", "C4", "O1", "O2")), seed=2)
    workdir = runs["scalp"][0]
    with pytest.raises(DataError, match=r"eeg\.edf: cannot form the scalp derivations \['A1-A2', "
                                        r"'C3-O1', 'C4-O2'\] that the model reads \(A1-A2: no "
                                        r"channel has A1 and A2 .*--channel_map='A1-A2=EEG F3'"):
        predict.predict_recording(workdir, path, tmp_path / "x")
    result = predict.predict_recording(workdir, path, tmp_path / "out", channel_map="A1-A2=F3-F4")
    info = json.loads(result["json"].read_text())
    assert info["channel_map"] == {"A1-A2": "F3-F4"}
    assert info["inputs"] == {"A1-A2": "EEG F3 - EEG F4", "C3-O1": "EEG C3 - EEG O1",
                              "C4-O2": "EEG C4 - EEG O2"}
    assert info["model_card"] is None and result["trained_on_real_recordings"] is False
    assert predict.card_lines(result) == [
        f"no model card in {workdir} (a run from before model cards were saved)"]

    # With a card: predict prints it, and warns in one line that the model never saw a real night.
    config = ckpt_lib.load_config(workdir)
    card = model_card.build(config, fake_cohort(), SPLITS, VALIDATION, step=1)
    card_dir = tmp_path / "with_card"
    shutil.copytree(workdir, card_dir)
    model_card.save(card_dir, card)
    result = predict.predict_recording(card_dir, path, tmp_path / "card", channel_map="A1-A2=F3-F4")
    lines = predict.card_lines(result)
    assert lines[0] == f"model card ({card_dir / 'model_card.json'}):"
    assert lines[1].startswith("  trained on: simulated nights")
    assert json.loads(result["json"].read_text())["model_card"] == card
    capsys.readouterr()


def test_labels_without_type_prefix_are_read(runs, tmp_path):
    # DREAMS writes "C3-A1", "O1-A1" without "EEG ".
    labels = ("C3-A1", "C4-A1", "O1-A1", "O2-A1", "A2-A1", "EOG1-A1")
    write_edf(tmp_path / "excerpt3.edf", labels, 120.0, fs=EDF_RATE)
    result = predict.predict_recording(runs["scalp"][0], tmp_path / "excerpt3.edf", tmp_path / "o")
    assert result["inputs"]["C3-O1"] == "C3-A1 - O1-A1" and result["epochs"] == 4


# The real Sleep-EDF PSG crop (tests/data/README.md): here, or in the shared data beside the
# project.
CROP_NAME = "SC4001E0-PSG-first300s.edf"
REAL_CROP = next((p for p in [pathlib.Path(__file__).parent / "data" / "sleep-edf" / CROP_NAME,
                              pathlib.Path(__file__).parents[2] / "shared" / "data" / "sleep-edf"
                              / CROP_NAME] if p.is_file()), None)
# The channel sets of the three real recordings a newcomer tried: the Sleep-EDF crop (two bipolar
# channels and an EOG) and DREAMS excerpts (everything against A1, no A2, with EOG and EMG).
REAL_CHANNEL_SETS = {
    "sleep-edf": ("EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal"),
    "dreams": ("FP1-A1", "CZ-A1", "O1-A1", "C3-A1", "EOG1-A1", "EMG1"),
    "dreams-reordered": ("O1-A1", "C3-A1", "FP1-A1", "EOG1-A1"),
}


def suggested_map(error: DataError) -> str:
    import re

    found = re.search(r"--channel_map='([^']*)'", str(error))
    assert found, str(error)
    return found.group(1)


@pytest.mark.parametrize("channels", sorted(REAL_CHANNEL_SETS))
def test_the_suggested_channel_map_runs_as_printed(runs, tmp_path, channels):
    """Every suggestion stages the night when pasted back, for the scalp and the ear model; a
    channel fills two inputs only where the recording has too few, and both the refusal and the
    result say so. Inputs read as the channels they are, without "- mean()"."""
    path = tmp_path / "night.edf"
    write_edf(path, REAL_CHANNEL_SETS[channels], 150.0, fs=EDF_RATE)
    for name in ("scalp", "ear"):
        with pytest.raises(DataError) as refused:
            predict.predict_recording(runs[name][0], path, tmp_path / "x")
        pasted = suggested_map(refused.value)
        result = predict.predict_recording(runs[name][0], path, tmp_path / name,
                                           channel_map=pasted)
        assert result["epochs"] == 5
        assert not any("mean()" in formed for formed in result["inputs"].values())
        if channels == "sleep-edf":
            assert "fewer distinct EEG signals" in str(refused.value)
            assert len(result["repeated_inputs"]) == 1
            assert "repeats" in predict.repeat_warning(result["repeated_inputs"])
        else:
            assert result["repeated_inputs"] == {} and "repeats" not in str(refused.value)
    assert pasted.count("=") == 3  # the ear model: all three inputs mapped


def test_the_figure_reads_clock_time_and_carries_the_simulated_only_caveat(runs, edf_dir,
                                                                           tmp_path, monkeypatch):
    from eegkd_jax import model_card

    drawn = {}
    plot = report.plot_hypnogram

    def spy(path, stages, **kwargs):
        drawn.update(kwargs)
        return plot(path, stages, **kwargs)

    monkeypatch.setattr(report, "plot_hypnogram", spy)
    result = predict.predict_recording(runs["ear"][0], edf_dir / "night1-PSG.edf", tmp_path)
    assert drawn["clock_start"] == START.replace(tzinfo=None)
    assert drawn["note"] == model_card.SIMULATED_CAVEAT  # the fixture's runs saw simulated nights
    info = json.loads(result["json"].read_text())
    assert info["start_time"] == "2017-03-01T22:00:00" and info["caveat"] == drawn["note"]
    label, ticks = report.time_axis(drawn["clock_start"], 0.1)
    assert label == "Clock time (recording started 2017-03-01 22:00:00)"
    assert ticks(0.5) == "22:30:00" and report.time_axis(None, 1.0) == ("Time (hours)", None)


@pytest.mark.skipif(REAL_CROP is None, reason="the Sleep-EDF PSG crop is not here")
def test_stage_raw_from_python_matches_the_command(runs, tmp_path):
    """``stage_raw`` on the real Sleep-EDF crop read by MNE gives, through the same code, the
    stages and probabilities that ``predict_recording`` writes for the file."""
    import mne

    workdir = runs["scalp"][0]
    channel_map = {"A1-A2": "EEG Fpz-Cz - EEG Pz-Oz", "C3-O1": "EEG Fpz-Cz", "C4-O2": "EEG Pz-Oz"}
    raw = mne.io.read_raw_edf(REAL_CROP, verbose="error")
    staging = predict.stage_raw(raw, workdir, channel_map)
    assert staging.stages.shape == (10,) and staging.probabilities.shape == (10, 5)
    assert staging.step == 1 and staging.repeated_inputs == {}
    assert staging.trained_on_real_recordings is False
    np.testing.assert_allclose(staging.onsets, 30.0 * np.arange(10))
    assert staging.hypnogram == [report.STAGES[s] for s in staging.stages]
    assert staging.records()[0]["onset"] == 0.0 and set(staging.records()[0]) == {
        "onset", "stage", "p_W", "p_N1", "p_N2", "p_N3", "p_REM"}
    result = predict.predict_recording(workdir, REAL_CROP, tmp_path, channel_map=channel_map)
    _, stages, probabilities = report.read_hypnogram_tsv(result["tsv"])
    np.testing.assert_array_equal(staging.stages, stages)
    np.testing.assert_allclose(staging.probabilities, probabilities, atol=1e-4)
    # A recording the model cannot read is refused as the command refuses it.
    with pytest.raises(DataError, match="cannot form the scalp derivations"):
        predict.stage_raw(raw, workdir)


def run_command(*args, cwd=None):
    """``python -m eegkd_jax.cli ARGS`` in a fresh process, as a user runs it (no test settings
    that quiet TensorFlow)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).parents[1])
    return subprocess.run([sys.executable, "-m", "eegkd_jax.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_predict_is_quiet_and_has_its_own_help(runs, edf_dir, tmp_path):
    """No library chatter before the answer or the error: a good file prints the answer (and the
    simulated-only warning), a bad one a single line; --help is the command's own, exit 0."""
    workdir = runs["ear"][0]
    done = run_command("predict", f"--checkpoint={workdir}", f"--out={tmp_path / 'o'}",
                       str(edf_dir / "night1-PSG.edf"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("night1: 9 epochs staged (step 1)")
    from eegkd_jax import model_card
    assert done.stderr == model_card.SIMULATED_WARNING + "\n"
    write_psg(tmp_path / "sc-PSG.edf", 60.0, fs=EDF_RATE, channels=("EEG Fpz-Cz",))
    done = run_command("predict", f"--checkpoint={workdir}", str(tmp_path / "sc-PSG.edf"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    done = run_command("predict", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: eegkd predict --checkpoint=RUN [flags] RECORDING")
    assert "--channel_map:" in done.stdout and "one entry point" not in done.stdout
