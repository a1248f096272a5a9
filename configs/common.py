"""The shared defaults of every mode: ``eegkd_jax/configs/common.py``."""

from eegkd_jax.configs.common import *  # noqa: F401,F403
