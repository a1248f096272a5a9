"""Settings that cannot be meant are refused in one line, before a run starts (issue 28)."""

import pytest

from eegkd_jax.configs import offline_kd, online_kd, supervised, transfer
from eegkd_jax.train import settings


@pytest.mark.parametrize("make", [
    lambda: supervised.get_config("ear"), lambda: supervised.get_config("scalp,tiny"),
    lambda: online_kd.get_config("paper"), lambda: offline_kd.get_config(""),
    lambda: transfer.get_config(""), lambda: online_kd.get_config("tiny")])
def test_the_shipped_configs_pass(make):
    settings.check_config(make())


@pytest.mark.parametrize("field, value, must", [
    ("optimizer.learning_rate", -0.004, "> 0"),
    ("optimizer.learning_rate", 0.0, "> 0"),
    ("optimizer.learning_rate", float("nan"), "> 0"),
    ("batch_size", 0, ">= 1"),
    ("num_epochs", -1, ">= 0"),
    ("log_every_steps", 0, ">= 1"),
    ("model.dropout", 1.5, "in [0, 1]"),
    ("optimizer.b1", 1.0, "in [0, 1)"),
    ("optimizer.b2", -0.1, "in [0, 1)"),
    ("kd.temperature", 0.0, "> 0"),
    ("kd.response_weight", -1.0, ">= 0"),
    ("data.sampling_rate", -50.0, "> 0"),
    ("data.simulated.hours", 0.0, "> 0"),
])
def test_a_value_that_cannot_be_meant_is_refused_naming_field_and_value(field, value, must):
    config = online_kd.get_config("")
    config.model = online_kd.common.cmt_config() if field == "model.dropout" else config.model
    group = config
    *parents, last = field.split(".")
    for part in parents:
        group = group[part]
    group[last] = value
    with pytest.raises(settings.ConfigError) as refused:
        settings.check_config(config)
    message = str(refused.value)
    assert message == f"config.{field}={value!r} cannot be meant: it must be {must}"
    assert "\n" not in message


def test_epochs_class_weights_and_band():
    config = supervised.get_config("ear")
    config.num_epochs, config.max_steps = 0, 100  # max_steps steps: meant
    settings.check_config(config)
    config.max_steps = -1
    with pytest.raises(settings.ConfigError, match=r"config\.num_epochs=0 cannot be meant"):
        settings.check_config(config)
    config = supervised.get_config("ear")
    config.class_weights = (1.0, 2.0, -1.0, 1.0, 1.0)
    with pytest.raises(settings.ConfigError, match=r"config\.class_weights=.*>= 0"):
        settings.check_config(config)
    config = supervised.get_config("ear")
    config.data.preprocess.bandpass_hz = (35.0, 0.3)
    with pytest.raises(settings.ConfigError, match=r"bandpass_hz=\(35\.0, 0\.3\)"):
        settings.check_config(config)
    config.data.preprocess.bandpass_hz = (0.3, None)  # a high-pass alone
    settings.check_config(config)


def test_train_and_evaluate_refuses_before_anything_is_written(tmp_path):
    from eegkd_jax.train import loop

    config = supervised.get_config("ear,tiny")
    config.optimizer.learning_rate = -0.004
    with pytest.raises(settings.ConfigError, match=r"learning_rate=-0\.004"):
        loop.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
