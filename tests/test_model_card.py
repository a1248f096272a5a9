"""The model card: built from a run's config, cohort and splits, saved, read back, summarised."""
import json
import types

import numpy as np
import pytest

from eegkd_jax.configs import offline_kd, online_kd, supervised
from eegkd_jax import model_card
from eegkd_jax.data.pipeline import Splits


def fake_cohort():
    labels = {f"sim-0{i}": np.array([0, 1, 2, -1, 3, 4], np.int8) for i in range(1, 5)}
    return types.SimpleNamespace(
        subjects=tuple(labels), labels=labels, sampling_rate=200.0,
        scalp_names=("A1-A2", "C3-O1", "C4-O2"), ear_names=("L-R", "L_E", "R_E"))


SPLITS = Splits(("sim-01", "sim-02"), ("sim-03",), ("sim-04",))
VALIDATION = {"accuracy": 0.61234567, "kappa": np.float32(0.4321), "macro_f1": 0.5,
              "teacher_accuracy": 0.7, "teacher_kappa": 0.65, "teacher_macro_f1": 0.6,
              "num_epochs": 6}


def test_card_of_a_simulated_online_kd_run_round_trips(tmp_path):
    card = model_card.build(online_kd.get_config("tiny"), fake_cohort(), SPLITS, VALIDATION, step=4)
    json.dumps(card, allow_nan=False)  # plain JSON all through
    assert card["data"]["source"] == "simulated" and card["data"]["real_recordings"] is False
    simulated = card["data"]["simulated"]
    assert (simulated["subjects"], simulated["hours"], simulated["seed"]) == (4, 0.2, 0)
    assert card["input"]["sampling_rate_hz"] == 200.0
    assert card["input"]["bandpass_hz"] == [0.3, 35.0]
    assert card["networks"]["model"]["input"] == "ear"
    assert card["networks"]["model"]["derivations"] == ["L-R", "L_E", "R_E"]
    assert card["networks"]["teacher"]["derivations"] == ["A1-A2", "C3-O1", "C4-O2"]
    assert card["subjects"]["train"] == {"ids": ["sim-01", "sim-02"], "scored_epochs": 10}
    assert card["metrics"]["validation"]["kappa"] == 0.4321 and card["metrics"]["step"] == 4
    assert card["metrics"]["test"] is None

    assert model_card.load(tmp_path) is None  # no card yet: an older run
    written = model_card.save(tmp_path, card)
    assert written == tmp_path / "model_card.json" and model_card.load(tmp_path) == card
    assert model_card.trained_on_real_recordings(card) is False

    text = model_card.summary(card)
    assert text.splitlines()[0] == ("trained on: simulated nights (eegkd_jax.data.simulate): "
                                    "4 subjects, 0.2 h each, seed 0")
    assert "usleep depth 3, online_kd model, reads ear L-R L_E R_E at 200 Hz" in text
    assert "subjects: train 2 (sim-01, sim-02); validation 1 (sim-03); test 1 (sim-04)" in text
    assert ("validation at step 4 (the checkpoint used): kappa 0.432, accuracy 0.612, macro-F1 "
            "0.500; test: not scored" in text)
    assert ("validation at step 4 (the checkpoint used): kappa 0.650"
            in model_card.summary(card, "teacher"))

    overall = {"accuracy": 0.5, "kappa": 0.25, "macro_f1": 0.4, "g_mean": 0.3, "num_epochs": 5,
               "confusion": [[1]]}
    updated = model_card.record_test(tmp_path, overall, step=4, subjects=["sim-04"])
    assert updated["metrics"]["test"] == {"accuracy": 0.5, "kappa": 0.25, "macro_f1": 0.4,
                                          "g_mean": 0.3, "num_epochs": 5, "step": 4,
                                          "subjects": ["sim-04"]}
    assert model_card.load(tmp_path)["metrics"]["test"]["kappa"] == 0.25
    assert "test: kappa 0.250" in model_card.summary(updated)
    assert model_card.record_test(tmp_path / "older_run", overall, step=1) is None


def test_card_of_real_data_and_of_a_borrowed_teacher(tmp_path):
    teacher_cfg = supervised.get_config("scalp,tiny")
    teacher_cfg.data.source, teacher_cfg.data.path = "eesm17", "/data/eesm17"
    teacher = model_card.build(teacher_cfg, fake_cohort(), SPLITS, None)
    assert teacher["data"] == {"source": "eesm17", "path": "/data/eesm17", "real_recordings": True,
                               "description": model_card.SOURCES["eesm17"]}
    assert teacher["networks"]["model"]["input"] == "scalp" and "teacher" not in teacher["networks"]
    assert "validation: not scored" in model_card.summary(teacher)
    model_card.save(tmp_path / "teacher", teacher)

    config = offline_kd.get_config("tiny")
    config.kd.teacher_workdir = str(tmp_path / "teacher")
    card = model_card.build(config, fake_cohort(), SPLITS, VALIDATION)
    assert card["networks"]["scalp_model_from"] == {"workdir": str(tmp_path / "teacher"),
                                                    "data_source": "eesm17"}
    assert model_card.trained_on_real_recordings(None, config) is False
    assert model_card.trained_on_real_recordings(None) is None


def test_a_file_that_is_no_card(tmp_path):
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_card\.json: not a model card \(invalid JSON"):
        model_card.load(tmp_path)
    (tmp_path / "model_card.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a model card"):
        model_card.load(tmp_path)
