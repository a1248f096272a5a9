"""Transfer learning: the scalp teacher's weights, fine-tuned on ear-EEG with labels only.

The config itself is ``eegkd_jax/configs/transfer.py`` (so the installed package has it too).
"""

from eegkd_jax.configs.transfer import get_config  # noqa: F401
