"""The leave-one-subject-out study of the paper: every method, fold by fold, one command.

The config itself is ``eegkd_jax/configs/loso.py`` (so the installed package has it too).
"""

from eegkd_jax.configs.loso import METHODS, get_config  # noqa: F401
