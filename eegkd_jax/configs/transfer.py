"""Transfer learning: the scalp teacher's weights, fine-tuned on ear-EEG with labels only.

    python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher   # first
    python train.py --config=configs/transfer.py \
        --config.kd.teacher_workdir=runs/teacher --workdir=runs/transfer

The ear model (``config.model``) must have the teacher's architecture (it is initialised from it);
this config copies the teacher settings into it. Variants: ``:tiny``, ``:paper``.
"""

from eegkd_jax.configs import common


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ())
    c = common.apply_size_variant(common.get_config(), words)
    c.mode = "transfer"
    c.kd.teacher_workdir = "runs/teacher"
    c.model = c.teacher.copy_and_resolve_references()
    return c
