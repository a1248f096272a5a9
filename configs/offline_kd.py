"""Offline KD: a frozen scalp teacher (trained before, restored from its workdir) teaches an ear
student: CE + feature MSE (decoder outputs), optionally + T^2-scaled KL of softened outputs.

The config itself is ``eegkd_jax/configs/offline_kd.py`` (so the installed package has it too).
"""

from eegkd_jax.configs.offline_kd import get_config  # noqa: F401
