"""Online KD: scalp teacher and ear student trained together in one jitted step, each with its own
Adam state. ``original``: the teacher learns from labels, the student from labels + the detached
teacher (feature MSE); ``:mutual``: deep mutual learning, each also learns from the other's
softened outputs. The CPU-sized default ends by printing the validation kappa of student and
teacher beside the classical floor of each signal (README, "Results", has the measured run):

    python train.py --config=configs/online_kd.py --workdir=runs/online_kd
    python train.py --config=configs/online_kd.py:mutual --workdir=runs/online_kd_mutual
    python train.py --config=configs/online_kd.py --config.optimizer.learning_rate=3e-4

Variants (comma-separated): ``mutual``, ``tiny`` (one-minute smoke run), ``paper`` (the original's
full-size models on whole nights, for real hardware).
"""

from eegkd_jax.configs import common


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ("mutual", "original"))
    c = common.get_config()
    c.mode = "online_kd"
    c.kd.variant = "mutual" if "mutual" in words else "original"
    c.kd.feature_weight = 1.0
    c.kd.response_weight = 1.0 if "mutual" in words else 0.0
    return common.apply_size_variant(c, words)
