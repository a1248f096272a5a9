"""Offline KD: a frozen scalp teacher (trained before, restored from its workdir) teaches an ear
student: CE + feature MSE (decoder outputs), optionally + T^2-scaled KL of softened outputs.

    python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher   # first
    python train.py --config=configs/offline_kd.py \
        --config.kd.teacher_workdir=runs/teacher --workdir=runs/offline_kd

Variants: ``:epoch`` (the MSE of each epoch's mean decoder output instead of every sample's),
``:soft`` (only the T^2-scaled KL of the softened outputs, no feature term), ``:unpaired`` (the
control: the teacher's targets go to the wrong ear windows, see ``kd.unpaired``), ``:tiny`` (a
smoke run; the teacher must be a ``supervised.py:scalp,tiny`` run), ``:paper``.
"""

from eegkd_jax.configs import common


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ("epoch", "soft", "unpaired"))
    if {"epoch", "soft"} <= words:
        raise ValueError("offline_kd.py: choose :epoch or :soft, not both")
    c = common.get_config()
    c.mode = "offline_kd"
    c.kd.feature_weight = 0.0 if "soft" in words else 1.0
    c.kd.feature_level = "epoch" if "epoch" in words else "sample"
    c.kd.response_weight = 1.0 if "soft" in words else 0.0
    c.kd.unpaired = "unpaired" in words
    c.kd.teacher_workdir = "runs/teacher"  # the default workdir of the supervised :scalp command
    return common.apply_size_variant(c, words)
