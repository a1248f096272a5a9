"""Experiment only: which half of the Glorot initialisation matters (kernels or zero biases)."""
import sys
from absl import app
from eegkd_jax.models import layers
import flax.linen as nn

which = sys.argv.pop(1)
orig = layers._inits
def patched(init, fan_in):
    tk, tb = orig("torch", fan_in)
    gk, gb = orig("glorot", fan_in)
    return {"glorot_kernels_torch_bias": (gk, tb), "torch_kernels_zero_bias": (tk, gb)}[which]
layers._inits = patched
from eegkd_jax.cli import train
train.run(sys.argv[1:])
