"""The leave-one-subject-out study of the paper: every method, fold by fold, one command.

    python -m eegkd_jax.study --workdir=runs/loso                        # full setting (GPU / TPU)
    python -m eegkd_jax.study --workdir=runs/loso_reduced --reduced      # minutes on a 2-core CPU
    python -m eegkd_jax.study --workdir=runs/loso_eesm --data_path=/data/eesm17
    python -m eegkd_jax.study --workdir=runs/kd_only \
        --config.study.methods='("scalp_teacher","offline_kd")'

The fields outside ``study`` are the shared settings of every run (data, both networks, optimiser,
schedule): all methods are compared on the same data with the same networks. What differs per method
(mode, input, distillation weights) comes from the mode's own config file (configs/supervised.py,
transfer.py, offline_kd.py, online_kd.py), so the study trains exactly what ``train.py`` would.

Variants: ``:reduced`` (3 folds of a 4-subject simulated cohort of short nights, small U-Sleeps, a
few dozen steps per run: a few minutes on a 2-core CPU; the numbers show the machinery, not the
paper's), ``:tiny`` (what the tests run), ``:paper`` (the original's full-size models).
"""

import ml_collections

from configs import common

# Method name -> (mode config file, its variant). Order matters: the fold's scalp teacher comes
# first, transfer and offline KD start from it.
METHODS = {
    "scalp_teacher": ("supervised", "scalp"),
    "ear_baseline": ("supervised", "ear"),
    "transfer": ("transfer", ""),
    "offline_kd": ("offline_kd", ""),  # the original's target: every sample's decoder output
    "offline_kd_epoch": ("offline_kd", "epoch"),  # each epoch's mean decoder output
    "offline_kd_soft": ("offline_kd", "soft"),  # the teacher's softened outputs (T^2 KL)
    "online_kd": ("online_kd", ""),
    "mutual": ("online_kd", "mutual"),
}


def get_config(arg: str = ""):
    words = common.parse_variant(arg, ("reduced",))
    c = common.get_config()
    c.study = ml_collections.ConfigDict()
    c.study.methods = tuple(METHODS)
    c.study.folds = 0  # 0: every subject is a test subject once; n > 0: the first n in sorted order
    c.study.seeds = (0, 1, 2)  # every fold is trained once per seed: methods compare paired
    c.study.test_subjects = ()  # explicit test subjects, one fold each (overrides folds)
    c.study.num_validation_subjects = 1  # per fold, taken from that fold's training side
    c.study.checkpoint = "best"  # evaluated checkpoint: best validation kappa (or "latest")
    if "reduced" in words:
        if words & {"tiny", "paper"}:
            raise ValueError("loso.py: :reduced is its own size; do not combine it with tiny/paper")
        c.study.folds = 3
        c.data.simulated.subjects = 4  # per fold: 1 test, 1 validation, 2 training subjects
        c.data.simulated.hours = 0.5  # 60 epochs per night
        c.data.sampling_rate = 50.0  # 1500 samples per epoch; the 0.3-35 Hz band still fits
        c.data.sequence_length = 5
        c.data.cache_dir = "data/tfds_reduced"
        for m in (c.model, c.teacher):
            m.name = "usleep"
            m.depth = 4
            m.initial_filters = 4
            m.complexity_factor = 1.0
        c.batch_size = 8
        c.num_epochs = 4
        c.max_steps = 40
        c.log_every_steps = 10
        c.eval_every_steps = 10
        c.checkpoint_every_steps = 10
    return common.apply_size_variant(c, words)
