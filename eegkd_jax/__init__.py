"""eegkd-jax: cross-modal knowledge distillation from scalp EEG to ear-EEG for sleep staging."""

__version__ = "0.1.0"
