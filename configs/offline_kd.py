"""Offline KD: a frozen scalp teacher (trained before, restored from its workdir) teaches an ear
student: CE + feature MSE (decoder outputs), optionally + T^2-scaled KL of softened outputs.

    python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher   # first
    python train.py --config=configs/offline_kd.py \
        --config.kd.teacher_workdir=runs/teacher --workdir=runs/offline_kd

Variants: ``:tiny`` (one-minute smoke run; the teacher must be a ``supervised.py:scalp,tiny`` run),
``:paper``. ``--config.kd.response_weight=1.0`` adds response (logit) distillation.
"""

from configs import common


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ())
    c = common.get_config()
    c.mode = "offline_kd"
    c.kd.feature_weight = 1.0
    c.kd.response_weight = 0.0
    c.kd.teacher_workdir = "runs/teacher"  # the default workdir of the supervised :scalp command
    return common.apply_size_variant(c, words)
