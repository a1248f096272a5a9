"""The leave-one-subject-out study of the paper: every method, fold by fold, one command.

    eegkd study --workdir=runs/loso_reduced --reduced      # the CPU-sized study
    eegkd study --workdir=runs/loso                        # the CPU-sized defaults
    eegkd study --workdir=runs/loso_paper --config=configs/loso.py:paper  # accelerators
    eegkd study --workdir=runs/loso_eesm --data_path=/data/eesm17
    eegkd study --workdir=runs/kd_only \
        --config.study.methods='("scalp_teacher","offline_kd")'
    eegkd study --workdir=runs/loso_all --combine=runs/loso_a,runs/loso_b  # one table

The fields outside ``study`` are the shared settings of every run (data, both networks, optimiser,
schedule): all methods are compared on the same data with the same networks. What differs per method
(mode, input, distillation weights) comes from the mode's own config file (configs/supervised.py,
transfer.py, offline_kd.py, online_kd.py), so the study trains exactly what ``train.py`` would.

Without a variant every fold (each of the 9 simulated subjects held out once) runs for each of
``study.seeds`` (0, 1, 2) and the methods of ``DEFAULT_METHODS``: the scalp teacher, ear-only,
the two controls (ear-only at the compute of teacher and student; offline KD from an unpaired
teacher), transfer, offline KD (sample and epoch targets) and online KD, each a CPU-sized default
run (a few minutes on a 2-core CPU, so hours in all: run it in parts, one set of folds each,
``--config.study.test_subjects``, and join them with ``--combine``). ``REFERENCE`` and ``PRIMARY``
below fix the primary endpoint before anything runs. ``:reduced`` trains depth-6 U-Sleeps over
5-epoch sequences for 300 steps on three folds (sim-01, sim-05, sim-09); ``:paper`` is the
original's full-size setting, for accelerators; ``:tiny`` is what the tests run.
"""

import ml_collections

from eegkd_jax.configs import common

# Method name -> (mode config file, its variant). Order matters: the fold's scalp teacher comes
# first, transfer and offline KD start from it.
METHODS = {
    "scalp_teacher": ("supervised", "scalp"),
    "ear_baseline": ("supervised", "ear"),
    "ear_baseline_matched": ("supervised", "ear"),  # control: the compute of teacher + student
    "transfer": ("transfer", ""),
    "offline_kd": ("offline_kd", ""),  # the original's target: every sample's decoder output
    "offline_kd_epoch": ("offline_kd", "epoch"),  # each epoch's mean decoder output
    "offline_kd_unpaired": ("offline_kd", "unpaired"),  # control: targets of the wrong windows
    "online_kd": ("online_kd", ""),
    "offline_kd_soft": ("offline_kd", "soft"),  # the teacher's softened outputs (T^2 KL)
    "mutual": ("online_kd", "mutual"),
}
# Optimiser steps of a method relative to the shared schedule: the compute-matched ear-only run
# takes as many steps as a KD student and its teacher together (online KD updates both networks
# every step; offline KD and transfer add the teacher's run to their own).
STEPS_FACTOR = {"ear_baseline_matched": 2}
# What the study runs by default; soft targets and mutual learning stay available as options.
DEFAULT_METHODS = ("scalp_teacher", "ear_baseline", "ear_baseline_matched", "transfer",
                   "offline_kd", "offline_kd_epoch", "offline_kd_unpaired", "online_kd")

# The primary endpoint, fixed before the study runs: the test kappa (against the scored labels of
# the held-out subject) of each method in PRIMARY minus that of REFERENCE on the same subject and
# seed; exact Wilcoxon signed-rank p over the subjects' mean differences, a two-level bootstrap
# CI, Holm's correction over PRIMARY. "KD helps" needs it, and the method beating UNPAIRED too.
REFERENCE = "ear_baseline_matched"
PRIMARY = ("transfer", "offline_kd", "offline_kd_epoch", "online_kd")
UNPAIRED = "offline_kd_unpaired"


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ("reduced",))
    c = common.get_config()
    c.study = ml_collections.ConfigDict()
    c.study.methods = DEFAULT_METHODS
    c.study.reference = REFERENCE
    c.study.primary = PRIMARY
    c.study.unpaired = UNPAIRED
    c.study.folds = 0  # 0: every subject is a test subject once; n > 0: the first n in sorted order
    c.study.seeds = (0, 1, 2)  # every fold is trained once per seed: methods compare paired
    c.study.test_subjects = ()  # explicit test subjects, one fold each (overrides folds)
    c.study.num_validation_subjects = 1  # per fold, taken from that fold's training side
    c.study.checkpoint = "best"  # evaluated checkpoint: best validation kappa (or "latest")
    if "reduced" in words:
        if words & {"tiny", "paper"}:
            raise ValueError("loso.py: :reduced is its own size; do not combine it with tiny/paper")
        # Three folds (subjects from the start, middle and end of the cohort) x the three seeds,
        # smaller networks and a shorter schedule than the CPU-sized defaults, on the same 2-h
        # nights (see the module docstring for what it costs and why not all nine folds).
        c.study.test_subjects = ("sim-01", "sim-05", "sim-09")
        c.data.sequence_length = 5
        for m in (c.model, c.teacher):
            m.depth = 6
        c.max_steps = 300
        c.eval_every_steps = 100
        c.checkpoint_every_steps = 100
    return common.apply_size_variant(c, words)
