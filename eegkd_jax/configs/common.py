"""Defaults shared by every training mode. Each mode file imports ``get_config`` from here and
overrides a few fields; nothing reads this file directly from the command line.

Field groups:
  data       where the nights come from, how they are derived, preprocessed, split and batched, and
             whether the training nights live on the devices (device_resident).
  model      the network that learns from ear-EEG (the student, or the only model in supervised mode).
  teacher    the network that sees scalp EEG (KD modes and the scalp supervised run).
  optimizer  Adam as the original's (betas, eps, L2 weight decay), with a CPU-sized rate and schedule.
  kd         distillation weights and temperature.

The defaults are sized for a 2-core CPU: every mode finishes in minutes on the simulated cohort
and learns past the classical floor. Whole 7.5-h nights (shorter ones would be time-compressed,
see docs/simulator.md) at 50 Hz (the 0.3-35 Hz band is filtered at the recording's rate before
resampling, and the sleep rhythms lie below 25 Hz); U-Sleep over 7-epoch sequences as the U-Sleep
paper trains it, depth 8, initialised as the U-Sleep authors' implementation does (Glorot; with
PyTorch's defaults the ear-only network does not learn, docs/ear_only.md); 1,200 steps at a
higher rate decayed to 0 so the final weights settle. ``:paper`` restores the original's
full-size networks, rate and schedule (:func:`apply_size_variant`); ``:tiny`` is the tests' smoke
run.
"""

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # "simulated" (the embedded default), "eesm17" (a BIDS directory) or "edf" (Sleep-EDF style).
    d.source = "simulated"
    d.path = ""  # directory of the cohort for "eesm17" / "edf"
    d.cache_dir = "data/tfds"  # where built TFDS shards live, reused across runs
    d.sampling_rate = 200.0  # the model rate; recordings are resampled to it
    d.epoch_seconds = 30.0
    d.sequence_length = 1  # L consecutive epochs per example (1 = single 30-s windows)
    d.scalp_derivations = ("A1-A2", "C3-O1", "C4-O2")
    d.ear_derivations = ("L-R", "L_E", "R_E")
    # Per-subject electrodes to leave out of the ear averages, e.g. {"sub-003": ("ELK", "ERA")}.
    d.ear_rejections = ml_collections.ConfigDict()
    d.auto_reject_ear = True  # also reject flat or wildly noisy ear electrodes found in the signal

    d.preprocess = ml_collections.ConfigDict()
    d.preprocess.bandpass_hz = (0.3, 35.0)  # None to skip filtering
    d.preprocess.scaling = "robust"  # per-night median / IQR per channel, as U-Sleep does
    d.preprocess.clip_iqr = 20.0  # clip at +-20 IQR after scaling (None: no clipping)

    d.simulated = ml_collections.ConfigDict()
    d.simulated.subjects = 9
    d.simulated.hours = 7.5
    d.simulated.seed = 0
    # Labels are a simulated scorer's reading of the true stages, at the per-stage agreement of
    # Rosenberg & Van Hout 2013 (docs/simulator.md); False: labels are the true stages.
    d.simulated.scorer_disagreement = True

    # Subject-level splits; subjects are ids such as "sub-001". Empty validation / test lists mean
    # "take the last subjects in sorted order" (see pipeline.subject_splits).
    d.test_subjects = ()
    d.validation_subjects = ()
    d.num_test_subjects = 1
    d.num_validation_subjects = 1

    d.prefetch = 2
    # Training data on the devices (data/resident.py): "auto" when the training subjects fit
    # device_budget_gb per device, "yes" always, "no" streams batches through tf.data.
    d.device_resident = "auto"
    d.device_budget_gb = 4.0
    d.resident_dtype = "float16"  # float16 | float32; float16 is refused for unscaled signals
    return d


def usleep_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "usleep"
    m.depth = 12
    m.kernel_size = 9
    m.initial_filters = 5
    m.complexity_factor = 1.67
    m.num_classes = 5
    m.dtype = "float32"  # compute dtype; parameters stay float32
    # "torch": PyTorch's layer defaults, as the original project; "glorot": Glorot-uniform kernels
    # and zero biases, as the U-Sleep authors' own implementation (models/layers.py).
    m.initializer = "torch"
    return m


def cmt_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "cmt"
    m.d_model = 256
    m.num_heads = 8
    m.d_ff = 1024
    m.dropout = 0.1
    m.num_classes = 5
    m.dtype = "float32"
    return m


MODELS = {"usleep": usleep_config, "cmt": cmt_config}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "supervised"  # supervised | offline_kd | online_kd | transfer
    # Supervised mode only: "scalp" trains the teacher network (config.teacher) on scalp EEG, "ear"
    # the ear baseline (config.model) on ear EEG.
    c.supervised_input = "ear"
    c.data = data_config()  # at the recordings' rate, single epochs; the CPU-sized run:
    c.data.sampling_rate = 50.0
    c.data.sequence_length = 7
    c.model = usleep_config()  # the ear model (student / baseline)
    c.teacher = usleep_config()  # the scalp model
    for m in (c.model, c.teacher):
        m.depth = 8
        m.initializer = "glorot"

    c.batch_size = 8  # global, across all devices and hosts: sequences of 7 epochs, 56 epochs
    c.num_epochs = 10  # passes over the training subjects; an upper bound when max_steps > 0
    c.max_steps = 1200  # >0 ends the run there (within the second pass here)
    c.log_every_steps = 50
    c.eval_every_steps = 200  # -1: once per epoch
    c.checkpoint_every_steps = 200  # -1: once per epoch
    c.keep_checkpoints = 2
    # Train steps run per compiled call (parallel.jit_train_steps, written out one after another);
    # calls end at every log, eval and checkpoint step, so those see the same states as with 1.
    c.steps_per_call = 1
    # Stop when a logged loss exceeds this many times its running level (the mean of the last 10
    # logged values, at least 1), naming the last good checkpoint.
    c.divergence_factor = 1e3

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 4e-3
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-9
    c.optimizer.weight_decay = 1e-4  # L2 added to the gradient, as torch.optim.Adam does
    c.optimizer.schedule = "cosine"  # constant | cosine
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    c.class_weights = ()  # empty: unweighted cross-entropy; else 5 weights W N1 N2 N3 REM

    c.kd = ml_collections.ConfigDict()
    c.kd.feature_weight = 1.0  # MSE between student and teacher features (the original's KD)
    # "sample": U-Sleep's per-sample decoder output, as the original; "epoch": each epoch's mean.
    c.kd.feature_level = "sample"
    c.kd.response_weight = 0.0  # T^2-scaled KL between softened teacher and student outputs
    c.kd.temperature = 4.0
    c.kd.variant = "original"  # online KD: "original" | "mutual"
    # Offline KD control: each ear window learns from another window's teacher targets (rolled by
    # one along the batch), so the pairing of scalp and ear is broken while the targets stay real.
    c.kd.unpaired = False
    c.kd.teacher_workdir = ""  # offline KD / transfer: workdir of the trained scalp model
    c.kd.teacher_checkpoint = "best"  # which of its checkpoints: "best" (val kappa), "latest" or a step

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto | yes | no: call jax.distributed.initialize
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


def parse_variant(arg: str | None, allowed: tuple[str, ...]) -> set[str]:
    """``"scalp,tiny"`` -> {"scalp", "tiny"}: the words after the colon of ``--config=file.py:...``
    (comma-separated); raises on a word the mode does not know."""
    words = {w for w in (arg or "").replace("+", ",").split(",") if w}
    unknown = words - set(allowed) - {"tiny", "paper"}
    if unknown:
        raise ValueError(f"unknown config variant(s) {sorted(unknown)}; "
                         f"choose from {sorted(set(allowed) | {'tiny', 'paper'})}")
    if {"tiny", "paper"} <= words:
        raise ValueError("a config is either :tiny or :paper, not both")
    return words


def apply_size_variant(c: ml_collections.ConfigDict, words: set[str]) -> ml_collections.ConfigDict:
    """``tiny``: a few steps of very small U-Sleeps on a very small simulated cohort (about a minute
    on a 2-core CPU; what the tests run). ``paper``: the original's full-size models on whole
    nights (for real hardware)."""
    if "tiny" in words:
        c.data.simulated.subjects = 4  # 2 train, 1 validation, 1 test
        c.data.simulated.hours = 0.2  # 24 epochs per night
        c.data.cache_dir = "data/tfds_tiny"
        c.data.sampling_rate = 200.0
        c.data.sequence_length = 1
        for m in (c.model, c.teacher):
            m.name = "usleep"
            m.depth = 3
            m.initial_filters = 3
            m.complexity_factor = 1.0
        c.batch_size = 8  # a multiple of the 8 fake CPU devices of the tests
        c.num_epochs = 1
        c.max_steps = 4
        c.log_every_steps = 2
        c.eval_every_steps = 2
        c.checkpoint_every_steps = 2
        c.optimizer.learning_rate = 1e-3
        c.optimizer.schedule = "constant"
        c.optimizer.warmup_steps = 0
    if "paper" in words:
        # The original's settings: full-size U-Sleeps on single 30-s epochs at 200 Hz, whole
        # nights, batch 32, Adam at 1e-3 with no schedule.
        c.data.simulated.hours = 7.5
        c.data.sampling_rate = 200.0
        c.data.sequence_length = 1
        for m in (c.model, c.teacher):
            m.update(usleep_config())  # depth 12, 5 filters, complexity 1.67: 3.1 M parameters
        c.batch_size = 32
        c.num_epochs = 10
        c.max_steps = -1
        c.eval_every_steps = -1
        c.checkpoint_every_steps = -1
        c.log_every_steps = 100
        c.optimizer.learning_rate = 1e-3
        c.optimizer.schedule = "constant"
        c.optimizer.warmup_steps = 0
    return c
