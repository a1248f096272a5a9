"""Supervised training of one network: the scalp teacher (``:scalp``) or the ear baseline (``:ear``).

The config itself is ``eegkd_jax/configs/supervised.py`` (so the installed package has it too).
"""

from eegkd_jax.configs.supervised import get_config  # noqa: F401
