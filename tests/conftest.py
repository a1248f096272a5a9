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
    # ml_collections' config_flags loads a --config file with the deprecated loader.load_module()
    # (raised from importlib, on Python < 3.12 only); not ours, and users never see it.
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:the load_module\(\) method is deprecated:DeprecationWarning")


@pytest.fixture
def test_data_dir() -> pathlib.Path:
    """The folder of real reference files copied from public datasets (see tests/data/README.md)."""
    return DATA


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The data config of a small simulated cohort: 4 nights of 12 epochs at 200 Hz, built into
    this module's own temporary folder (test_pipeline, test_resident)."""
    from eegkd_jax.configs.common import data_config

    c = data_config()
    c.cache_dir = str(tmp_path_factory.mktemp("tfds"))
    c.simulated.subjects = 4
    c.simulated.hours = 0.1  # 12 epochs a night
    c.prefetch = 2
    return c


@pytest.fixture(scope="module")
def cohort(cfg):
    from eegkd_jax.data import pipeline

    return pipeline.prepare_cohort(cfg)


@pytest.fixture(scope="module")
def fast_compiles():
    """Skips most of XLA's optimisations for one test module, where compiling dominates the run
    time and the programs run once or twice (use with ``pytest.mark.usefixtures``)."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared by every program of one test module (and the subprocesses it
    starts, through JAX_COMPILATION_CACHE_DIR): runs that compile the same few programs reuse them,
    and compiling dominates such tests on a 2-core machine."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = tmp_path_factory.mktemp("xla_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
