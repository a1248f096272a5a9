"""Supervised training of one network: the scalp teacher (``:scalp``) or the ear baseline (``:ear``).

    python train.py --config=configs/supervised.py:scalp --workdir=runs/teacher
    python train.py --config=configs/supervised.py:ear --workdir=runs/ear_baseline

Add ``,tiny`` (e.g. ``:scalp,tiny``) for a one-minute smoke run, ``,paper`` for the original's
full-size schedule. ``:scalp`` trains ``config.teacher``; that workdir then serves as
``--config.kd.teacher_workdir`` for offline KD and transfer.
"""

from eegkd_jax.configs import common


def get_config(arg: str = "scalp"):
    words = common.parse_variant(arg, ("scalp", "ear"))
    if {"scalp", "ear"} <= words:
        raise ValueError("supervised.py: choose :scalp or :ear, not both")
    c = common.get_config()
    c.mode = "supervised"
    c.supervised_input = "ear" if "ear" in words else "scalp"
    return common.apply_size_variant(c, words)
