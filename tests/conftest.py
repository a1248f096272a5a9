"""Test set-up: 8 fake CPU devices, quiet TensorFlow, and our own warnings treated as errors.

XLA_FLAGS must be set before jax is imported anywhere, which is why this happens at import time of
the conftest rather than in a fixture.
"""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


def pytest_configure(config):
    # "Warnings that we cause are bugs": any warning raised from our package fails the test.
    config.addinivalue_line("filterwarnings", "error::Warning:eegkd_jax")


@pytest.fixture
def test_data_dir() -> pathlib.Path:
    """The folder of real reference files copied from public datasets (see tests/data/README.md)."""
    return DATA
