"""Online KD: scalp teacher and ear student trained together in one jitted step, each with its own
Adam state (``:mutual``: deep mutual learning).

The config itself is ``eegkd_jax/configs/online_kd.py`` (so the installed package has it too).
"""

from eegkd_jax.configs.online_kd import get_config  # noqa: F401
