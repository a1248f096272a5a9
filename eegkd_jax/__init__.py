"""eegkd-jax: cross-modal knowledge distillation from scalp EEG to ear-EEG for sleep staging."""

import os as _os
from typing import Mapping as _Mapping

__version__ = "0.1.0"

# The values that turn one of our EEGKD_* on/off switches off (EEGKD_TUNE_MALLOC,
# EEGKD_CPU_KERNELS); anything else, or the variable unset, leaves the feature on.
OFF_VALUES = ("0", "off", "false", "no")


def switched_off(name: str, environ: _Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` turns its feature off (see OFF_VALUES)."""
    environ = _os.environ if environ is None else environ
    return environ.get(name, "").strip().lower() in OFF_VALUES
