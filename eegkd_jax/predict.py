"""Stage a new night with a trained run: a hypnogram (TSV + PNG) for one recording.

    eegkd predict --checkpoint=runs/offline_kd night-PSG.edf
    eegkd predict --checkpoint runs/teacher --which latest --out out/ \\
        data/eesm17/sub-003                       # a BIDS subject directory (or its *_eeg.set)
    eegkd predict --checkpoint runs/teacher --channel_map='A1-A2=M1-M2' psg.edf

Any EDF/EDF+ file whose channels can form the model's derivations will do: labels are read with or
without their type and reference ("EEG C3-A1", "C3-A1", "C3:M2"), and a derivation such as C3-O1
is formed from C3-A1 and O1-A1 (``montage``). ``--channel_map`` says which recording channels stand
for inputs the recording lacks. The ear-EEG student reads the EESM17 ear electrodes (ELA ... ERK);
a scalp-only recording needs a scalp model (``--network=teacher`` of a KD run, or a supervised
:scalp run). The run's model card is printed, with a one-line warning when the model never saw a
real recording.

The flow, one recording at a time::

    EDF/EDF+ (+ hypnogram beside it, if any) or EESM BIDS .set ──readers──▶ Recording
    ──check channels (and --channel_map) and rate against the run──▶ prepare_night with the run's saved data config
    (only the derivations the model reads) ──▶ (epochs * S, C) ──sharded forward──▶ (epochs, 5)
    ──▶ <name>_hypnogram.tsv, <name>_hypnogram.png, <name>_prediction.json

The run's own saved config decides everything about the input (derivations, rejections, band-pass,
model rate, scaling), so the model sees what it was trained on: an ear-trained student gets the ear
derivations, a scalp model the scalp ones. A recording that cannot give that input (electrodes of a
derivation missing, or a sampling rate too low to carry the trained band) is refused with an error
naming the file, before anything is computed.

U-Sleep stages the whole night as one sequence (it is fully convolutional; ``max_sequence_epochs``
splits very long nights into chunks when memory is short); the cross-modal transformer, which scores
one epoch at a time, gets batches of single epochs. Both go through ``evaluate.make_predict_fn``
(the sharded predict step of evaluation) and ``metrics.NightCollector`` (which insists every epoch
comes back exactly once).

With scoring (an EDF hypnogram, an EESM scoring file) the true hypnogram is drawn above the
prediction and the metrics go into the JSON; without it every epoch is still predicted.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from eegkd_jax import checkpoint as ckpt_lib
from eegkd_jax import configs
from eegkd_jax import evaluate
from eegkd_jax import files
from eegkd_jax import metrics as metrics_lib
from eegkd_jax import model_card, parallel
from eegkd_jax import report as report_lib
from eegkd_jax.data import montage
from eegkd_jax.data.recording import STAGES, DataError, PairedNight, Recording
from eegkd_jax.data.sampler import Sampler

# Networks scored epoch by epoch (they take L == 1); every other model gets the whole night.
SINGLE_EPOCH_MODELS = frozenset({"cmt"})
NETWORKS = ("model", "teacher")


# --------------------------------------------------------------------------------------------------
# The trained model


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
    """A restored network with everything needed to feed it.

    Attributes:
      workdir: the training run's directory.
      config: the run's saved config (data, models, mode).
      step: the restored checkpoint's step. which: how it was chosen ("best", "latest", a step).
      network: "model" (the trained model: ear student / baseline, or the scalp model of a
        supervised :scalp run) or "teacher" (the scalp teacher held in a KD checkpoint).
      input_key: "scalp" or "ear": which derivations it reads.
      derivations: their names, e.g. ("L-R", "L_E", "R_E").
      model_config: its config group (name, sizes).
      module: the Flax module; variables: {"params", ["batch_stats"]} host arrays.
    """

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    step: int
    which: str | int
    network: str
    input_key: str
    derivations: tuple[str, ...]
    model_config: ml_collections.ConfigDict
    module: Any
    variables: dict

    @property
    def sampling_rate(self) -> float:
        return float(self.config.data.sampling_rate)

    @property
    def epoch_seconds(self) -> float:
        return float(self.config.data.epoch_seconds)

    @property
    def epoch_samples(self) -> int:
        from eegkd_jax.models import epoch_samples_for

        return epoch_samples_for(self.sampling_rate, self.epoch_seconds)

    def describe(self) -> str:
        return (f"{self.workdir} step {self.step} ({self.config.mode}, {self.model_config.name} "
                f"on {self.input_key} {list(self.derivations)} at {self.sampling_rate:g} Hz)")


def run_workdir(checkpoint: str | pathlib.Path) -> pathlib.Path:
    """The run directory for ``--checkpoint``: a workdir, or its ``checkpoints`` directory."""
    path = pathlib.Path(checkpoint).absolute()
    if ckpt_lib.checkpoint_dir(path.parent) == path and not ckpt_lib.checkpoint_dir(path).is_dir():
        return path.parent
    return path


def load_trained_model(
    checkpoint: str | pathlib.Path, which: str | int = "best", *, network: str = "model"
) -> TrainedModel:
    """Restores one network of a training run.

    Args:
      checkpoint: the run's workdir or its ``checkpoints`` directory.
      which: "best" (highest validation kappa), "latest" or a step number.
      network: "model" (what the run trained on its own input) or "teacher" (the scalp teacher
        of an offline / online KD checkpoint).

    Raises:
      FileNotFoundError: no run or no such checkpoint there.
      checkpoint.CheckpointError: the checkpoint asked for (or every one) fails its checks.
      ValueError: ``network="teacher"`` on a run without a teacher.
    """
    from eegkd_jax.models import build_model
    from eegkd_jax.train import steps as steps_lib

    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    workdir = run_workdir(checkpoint)
    # The config saved with the step (verified with it) decides the input, not config.json.
    restored = ckpt_lib.read_run(workdir, which)
    step, state, config = restored.step, restored.state, restored.config
    if network == "teacher":
        if state.get("teacher_params") is None:
            raise ValueError(f"{workdir} ({config.mode}) holds no teacher network")
        input_key, model_cfg = "scalp", config.teacher
        params, stats = state["teacher_params"], state.get("teacher_batch_stats")
    else:
        input_key = configs.student_input(config)
        model_cfg = configs.trained_model_config(config)
        params, stats = state["params"], state.get("batch_stats")
    derivations = tuple(config.data[f"{input_key}_derivations"] or ())
    if not derivations:
        raise ValueError(f"{workdir}: the run's config lists no {input_key} derivations")
    module = build_model(model_cfg, in_channels=len(derivations),
                         sampling_rate=float(config.data.sampling_rate),
                         epoch_seconds=float(config.data.epoch_seconds))
    model = TrainedModel(
        workdir=workdir, config=config, step=int(step), which=which, network=network,
        input_key=input_key, derivations=derivations, model_config=model_cfg, module=module,
        variables=steps_lib.model_variables(params, stats),
    )
    # A step whose config.json no longer describes its state (edited, manifest rehashed) is
    # refused in one line, as eval refuses it, not deep inside flax's apply.
    group = "teacher" if model_cfg is config.teacher else "model"
    window = int(config.data.sequence_length) * model.epoch_samples
    evaluate.check_variables_fit(workdir, int(step), config, group, module, model.variables,
                                 (1, window, len(derivations)))
    return model


# --------------------------------------------------------------------------------------------------
# The recording


@dataclasses.dataclass(frozen=True, eq=False)
class NewRecording:
    """A night read for staging.

    Attributes:
      recording: the raw night; sample 0 is epoch 0.
      path: the signal file (EDF or .set), named in every error.
      scored: whether scoring came with it (a hypnogram / scoring file); if not, every label is -1.
      start_seconds: recording time (seconds from the file's first sample) of epoch 0.
      start_time: the clock time of the file's first sample, where the file says it (EDF
        header, MNE ``meas_date``); None otherwise.
    """

    recording: Recording
    path: pathlib.Path
    scored: bool
    start_seconds: float
    start_time: datetime.datetime | None = None


def edf_start_time(path: str | pathlib.Path) -> datetime.datetime | None:
    """The start date and time in an EDF header (bytes 168-183, "dd.mm.yyhh.mm.ss"; years 85-99
    are 19xx, as the EDF specification says), or None where the header has none that parses."""
    try:
        with open(path, "rb") as f:
            head = f.read(184)[168:184].decode("ascii")
        day, month, year = (int(v) for v in head[:8].split("."))
        hour, minute, second = (int(v) for v in head[8:].split("."))
        year += 1900 if year >= 85 else 2000
        return datetime.datetime(year, month, day, hour, minute, second)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def read_new_recording(
    path: str | pathlib.Path,
    *,
    hypnogram: str | pathlib.Path | None = "auto",
    epoch_seconds: float = 30.0,
) -> NewRecording:
    """Reads an EDF/EDF+ file, an EESM BIDS ``*_eeg.set`` or a BIDS subject directory.

    Args:
      path: the recording.
      hypnogram: EDF only: "auto" takes the Sleep-EDF hypnogram paired with a ``*-PSG.edf`` if one
        lies beside it, None reads the night as unscored, a path names the hypnogram. For BIDS
        the scoring file beside the .set is used when present.
      epoch_seconds: scoring epoch length (the run's).

    Raises:
      DataError: unreadable or unknown input, naming the file.
    """
    from eegkd_jax.data import bids, edf

    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_dir():
        if not path.name.startswith("sub-"):
            raise DataError(path, "a directory must be a BIDS subject directory (sub-<label>)")
        bids_files = bids.subject_files(path.parent, path.name)
    elif path.suffix.lower() == ".set":
        bids_files = bids.BidsFiles.for_set(path)
    elif path.suffix.lower() == ".edf":
        bids_files = None
    else:
        raise DataError(path, "not an EDF/EDF+ file, an EEGLAB .set or a BIDS subject directory")

    if bids_files is not None:
        scored = bids_files.scoring_tsv.is_file()
        recording = bids.read_recording(bids_files, epoch_seconds=epoch_seconds,
                                        require_scoring=False)
        start = bids.scoring_start(bids_files, scored=scored)
        return NewRecording(recording, bids_files.eeg_set, scored, start)

    if isinstance(hypnogram, str) and hypnogram == "auto":
        hypnogram = edf.find_hypnogram(path)
    recording = edf.read_psg(path, hypnogram, epoch_seconds=epoch_seconds)
    start = edf.scoring_start(path, hypnogram, epoch_seconds)
    return NewRecording(recording, path, hypnogram is not None, start, edf_start_time(path))


def input_specs(model: TrainedModel, channel_map: Mapping[str, str] | None = None
                ) -> tuple[str, ...]:
    """The derivation strings to form from the recording, one per model input: the model's own
    derivation names, or what ``channel_map`` puts in their place.

    Raises:
      DataError (named "--channel_map"): the map names a derivation the model does not read.
    """
    channel_map = dict(channel_map or {})
    unknown = [k for k in channel_map if k not in model.derivations]
    if unknown:
        raise DataError(
            "--channel_map",
            f"maps {unknown}, which the model does not read; it reads the {model.input_key} "
            f"derivations {list(model.derivations)}")
    return tuple(channel_map.get(d, d) for d in model.derivations)


def _channels_hint(new: NewRecording, model: TrainedModel, specs: tuple[str, ...],
                   problems: Mapping[str, str]) -> str:
    """What the error of an unformable input tells the user: channels present, derivations
    needed, a channel map that runs as printed (``montage.suggest_map``; it says so where the
    recording has too few distinct signals and repeats one), and, for an ear model on a
    scalp-only recording, another model."""
    recording = new.recording
    labels = list(recording.scalp_channels) + list(recording.ear_channels)
    by_spec = dict(zip(specs, model.derivations))
    detail = "; ".join(f"{by_spec[spec]}" + (f" (mapped to {spec})" if spec != by_spec[spec] else "")
                       + f": {why}" for spec, why in problems.items())
    suggested = montage.suggest_map(recording, specs, problems)
    # The whole map: the user's entries that work, then the suggestion for the rest.
    entries = {by_spec[spec]: spec for spec in specs
               if spec != by_spec[spec] and spec not in problems}
    entries.update({by_spec[spec]: channels for spec, channels in suggested.entries.items()})
    example = ",".join(f"{d}={entries[d]}" for d in model.derivations if d in entries)
    text = (f"cannot form the {model.input_key} derivations {list(model.derivations)} that the "
            f"model reads ({detail}). The recording's EEG channels are {labels}. Say which "
            f"channels stand for each derivation with --channel_map, e.g. "
            f"--channel_map='{example}' (a channel label, 'A - B' of two labels, or electrodes "
            f"X-Y; or a file with one DERIVATION=CHANNELS per line)")
    if suggested.repeated:
        # Named as predict's warning will name them once the map is used: in the model's order.
        formed = {}
        for derivation, spec in zip(model.derivations, specs):
            try:
                formed[derivation] = montage.explain(recording, entries.get(derivation, spec))
            except DataError:
                continue
        repeats = ", ".join(f"{d} repeats the signal of {other}"
                            for d, other in repeated_inputs(formed).items())
        text += (f". The recording has fewer distinct EEG signals than the model's "
                 f"{len(model.derivations)} inputs, so in this map {repeats}: the model never saw "
                 f"such input, and its stages are less reliable")
    if model.input_key == "ear" and not recording.ear_channels:
        text += (". This model reads ear-EEG: the EESM17 ear electrodes ELA ELB ELE ELG ELI ELK "
                 "(left) and ERA ERB ERE ERG ERI ERK (right); for a scalp-only recording use a "
                 "scalp model, e.g. --network=teacher of a KD run or a supervised :scalp run")
    return text


def repeated_inputs(inputs: Mapping[str, str]) -> dict[str, str]:
    """{derivation: the earlier derivation it repeats} for model inputs formed from the same
    signal (``inputs``: derivation -> ``montage.explain`` text), e.g. one channel mapped into
    two slots."""
    first: dict[str, str] = {}
    out = {}
    for derivation, formed in inputs.items():
        key = formed.removeprefix("-")
        if key in first:
            out[derivation] = first[key]
        else:
            first[key] = derivation
    return out


def input_band(new: NewRecording, model: TrainedModel) -> tuple[float | None, float | None] | None:
    """The band-pass to apply at the recording's rate: the run's, or, where its upper edge lies at
    or above the recording's Nyquist frequency, its high-pass alone (the model never saw content
    above its own Nyquist frequency, and ``check_compatible`` has made sure that the recording
    carries everything up to it)."""
    band = model.config.data.preprocess.bandpass_hz
    if band is None or band[1] is None or float(band[1]) < new.recording.sampling_rate / 2:
        return None if band is None else tuple(band)
    return (band[0], None)


def check_compatible(new: NewRecording, model: TrainedModel,
                     channel_map: Mapping[str, str] | None = None) -> None:
    """Raises a DataError naming the file unless the recording can give the model its input.

    Checks: every derivation the model reads (or what ``channel_map`` puts in its place) can be
    formed from the recording's channels (``montage.unformable``: ear derivations need one kept
    electrode per side); and the recording carries every frequency the model saw: up to the
    run's band-pass edge or the model's Nyquist frequency, whichever is lower (upsampling cannot
    invent frequencies a recording never had). A recording sampled too slowly for the run's
    band-pass edge but fast enough for what the model saw is filtered with the high-pass alone
    (``input_band``). A refusal says what would work: channels and an example map, or the model
    rate to train for this recording. The rational-ratio check of resampling runs too.
    """
    from eegkd_jax.data import preprocess

    recording, source = new.recording, str(new.path)
    specs = input_specs(model, channel_map)
    problems = montage.unformable(recording, specs)
    if problems:
        raise DataError(source, _channels_hint(new, model, specs, problems))
    rate_in, rate_out = float(recording.sampling_rate), model.sampling_rate
    band = model.config.data.preprocess.bandpass_hz
    high = None if band is None or band[1] is None else float(band[1])
    seen = rate_out / 2 if high is None else min(high, rate_out / 2)  # the top the model saw
    nyquist = rate_in / 2
    if nyquist < seen:
        trained = (f"band-passed to {list(band)} Hz" if band is not None else "unfiltered")
        raise DataError(
            source,
            f"sampled at {rate_in:g} Hz (content up to {nyquist:g} Hz), but the model was trained "
            f"on {rate_out:g}-Hz input {trained}: content up to {seen:g} Hz, which needs a "
            f"recording rate of {2 * seen:g} Hz or more; resampling cannot restore frequencies "
            f"the recording lacks. To stage it, train a model at this recording's rate: add "
            f"--config.data.sampling_rate={rate_in:g} to the training command",
        )
    preprocess.resample_ratio(rate_in, rate_out, source)


def prepare_input(new: NewRecording, model: TrainedModel,
                  channel_map: Mapping[str, str] | None = None) -> PairedNight:
    """``prepare_night`` with the run's data config, deriving only the model's own input group
    (a recording without the other group's electrodes still works), each input formed as
    ``input_specs`` says, filtered with ``input_band``. Errors name the file."""
    from eegkd_jax.data import preprocess

    data_cfg = model.config.data.copy_and_resolve_references()
    key = model.input_key
    other = "ear" if key == "scalp" else "scalp"
    specs = input_specs(model, channel_map)
    unique = tuple(dict.fromkeys(specs))  # a channel mapped into several inputs is derived once
    data_cfg[f"{other}_derivations"] = ()
    data_cfg[f"{key}_derivations"] = unique
    data_cfg.preprocess.bandpass_hz = input_band(new, model)
    try:
        night = preprocess.prepare_night(new.recording, data_cfg)
    except DataError as err:
        if err.source == str(new.path):
            raise
        raise DataError(new.path, f"{err.source}: {err.problem}") from None
    if unique == specs:
        return night
    columns = [unique.index(spec) for spec in specs]
    return dataclasses.replace(night, **{key: getattr(night, key)[:, columns],
                                         f"{key}_names": model.derivations})


# --------------------------------------------------------------------------------------------------
# Prediction


def _sequence_length(model: TrainedModel, num_epochs: int, max_sequence_epochs: int) -> int:
    if model.model_config.name in SINGLE_EPOCH_MODELS:
        return 1
    if max_sequence_epochs and max_sequence_epochs > 0:
        return min(int(max_sequence_epochs), num_epochs)
    return num_epochs


def predict_probabilities(
    model: TrainedModel,
    signal: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int | None = None,
    max_sequence_epochs: int = 0,
    name: str = "night",
) -> tuple[np.ndarray, np.ndarray]:
    """Stage probabilities for one prepared night.

    Args:
      model: the restored network.
      signal: (epochs * S, C) float32 derivations at the model rate (``PairedNight.ear`` or
        ``.scalp``).
      labels: (epochs,) true stages (-1 = unscored), passed along for the collector's checks;
        default all -1.
      batch_size: sequences per global batch when the night is split (rounded up to a multiple of
        the device count); default the run's ``config.batch_size``.
      max_sequence_epochs: U-Sleep only: 0 stages the whole night as one sequence; n > 0 splits
        it into n-epoch sequences (for memory), the last one padded.
      name: names the night in errors.

    Returns:
      (probabilities (epochs, 5) float64, predicted stages (epochs,) int64).
    """
    s = model.epoch_samples
    if signal.ndim != 2 or signal.shape[1] != len(model.derivations):
        raise DataError(name, f"signal must be (time, {len(model.derivations)}), "
                              f"got {signal.shape}")
    if signal.shape[0] == 0 or signal.shape[0] % s:
        raise DataError(name, f"{signal.shape[0]} samples are not whole {s}-sample epochs")
    num_epochs = signal.shape[0] // s
    labels = np.full(num_epochs, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (num_epochs,):
        raise DataError(name, f"{labels.shape[0]} labels for {num_epochs} epochs")
    seq_len = _sequence_length(model, num_epochs, max_sequence_epochs)
    starts = np.arange(0, num_epochs, seq_len)

    if starts.size == 1:
        # One sequence (the whole night): one device; sharding a batch of 1 would only pad it.
        mesh = parallel.make_mesh(jax.devices()[:1])
        global_batch = 1
    else:
        mesh = parallel.make_mesh()
        n_dev = mesh.devices.size
        wanted = int(batch_size or model.config.batch_size)
        global_batch = n_dev * math.ceil(min(wanted, starts.size) / n_dev)

    sampler = Sampler(starts.size, global_batch)  # in order, as evaluation reads nights

    def batches() -> Iterator[dict]:
        for k in range(sampler.num_batches):
            at, valid = sampler.rows(k, 0)
            x = np.zeros((global_batch, seq_len * s, signal.shape[1]), np.float32)
            y = np.full((global_batch, seq_len), -1, np.int32)
            for i in np.flatnonzero(valid):
                e = starts[at[i]]
                stop = min(e + seq_len, num_epochs)  # the last sequence is padded with zeros
                x[i, : (stop - e) * s] = signal[e * s: stop * s]
                y[i, : stop - e] = labels[e:stop]
            yield {model.input_key: x, "labels": y, "subject": np.zeros(global_batch, np.int32),
                   "epoch": np.where(valid, starts[at], 0).astype(np.int32), "valid": valid}

    collector = metrics_lib.NightCollector({name: num_epochs}, (name,), source=name)
    predict_fn = evaluate.make_predict_fn(model.module, model.input_key, mesh)
    variables = parallel.replicate(model.variables, mesh)
    evaluate.predict_nights(predict_fn, variables, batches(), model.input_key, collector, mesh)
    (_, predicted), = collector.hypnograms().values()
    return collector.probabilities()[name], predicted


@dataclasses.dataclass(frozen=True, eq=False)
class StagedNight:
    """One night staged by one model: what ``predict_recording`` writes and ``stage_raw`` returns.

    Attributes:
      model: the restored network. new: the recording as read.
      labels: (epochs,) the scoring (-1 = unscored).
      probabilities: (epochs, 5) float64. stages: (epochs,) int64 predicted stages.
      inputs: {model derivation: how it was formed from the recording's channels}.
      repeated_inputs: {derivation: the earlier one whose signal it repeats} (``repeated_inputs``).
    """

    model: TrainedModel
    new: NewRecording
    labels: np.ndarray
    probabilities: np.ndarray
    stages: np.ndarray
    inputs: dict[str, str]
    repeated_inputs: dict[str, str]


def stage_night(model: TrainedModel, new: NewRecording,
                channel_map: Mapping[str, str] | None = None, *, batch_size: int | None = None,
                max_sequence_epochs: int = 0) -> StagedNight:
    """Checks, prepares and stages one read recording: the one path of ``eegkd predict`` and of
    ``stage_raw``.

    Raises:
      DataError naming the file: the recording cannot give the model its input.
    """
    check_compatible(new, model, channel_map)
    night = prepare_input(new, model, channel_map)
    inputs = {d: montage.explain(new.recording, spec)
              for d, spec in zip(model.derivations, input_specs(model, channel_map))}
    logging.info("staging %s (%d epochs) with %s", new.path, night.num_epochs, model.describe())
    signal = night.ear if model.input_key == "ear" else night.scalp
    probabilities, predicted = predict_probabilities(
        model, signal, night.labels, batch_size=batch_size,
        max_sequence_epochs=max_sequence_epochs, name=str(new.path))
    return StagedNight(model, new, night.labels.astype(np.int64), probabilities, predicted,
                       inputs, repeated_inputs(inputs))


def predict_recording(
    checkpoint: str | pathlib.Path,
    recording_path: str | pathlib.Path,
    out_dir: str | pathlib.Path | None = None,
    *,
    which: str | int = "best",
    network: str = "model",
    hypnogram: str | pathlib.Path | None = "auto",
    batch_size: int | None = None,
    max_sequence_epochs: int = 0,
    channel_map: str | Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Stages one recording with a trained run and writes its hypnogram.

    Args:
      checkpoint: the run's workdir or its checkpoints directory.
      recording_path: an EDF/EDF+ file, an EESM BIDS ``*_eeg.set`` or a BIDS subject directory.
      out_dir: where to write; default ``<workdir>/predictions/<recording name>``.
      which: "best", "latest" or a step. network: "model" or "teacher" (see ``load_trained_model``).
      hypnogram: EDF scoring: "auto" (beside the PSG, if any), None (ignore), or a path.
      batch_size, max_sequence_epochs: see ``predict_probabilities``.
      channel_map: which recording channels stand for which model input: {derivation: channels}
        or its text form (``montage.parse_channel_map``: "A1-A2=M1-M2,C3-O1=C3-A2" or a file).

    Returns:
      {"name", "epochs", "scored", "step", "tsv", "png", "json", "metrics", "inputs",
      "repeated_inputs", "model_card", "trained_on_real_recordings"}: the TSV has one row per
      epoch (onset on the recording's clock, duration, stage, p_W .. p_REM); "metrics" is the
      pooled summary against the scoring (``metrics.summarize``), or None without scoring;
      "inputs" says how each model input was formed from the recording's channels;
      "repeated_inputs" names inputs fed the same signal as another; "model_card" is the run's
      card (None for a run without one).

    Raises:
      DataError: the recording or the channel map cannot be read, or the recording cannot give
        the model its input (channels, rate); the message names the file and what would work.
    """
    model = load_trained_model(checkpoint, which, network=network)
    if isinstance(channel_map, str):
        channel_map = montage.parse_channel_map(channel_map)
    input_specs(model, channel_map)  # a map that names no model input fails before any reading
    card = model_card.load(model.workdir)
    new = read_new_recording(recording_path, hypnogram=hypnogram,
                             epoch_seconds=model.epoch_seconds)
    staged = stage_night(model, new, channel_map, batch_size=batch_size,
                         max_sequence_epochs=max_sequence_epochs)
    probabilities, predicted, inputs = staged.probabilities, staged.stages, staged.inputs
    name = new.recording.subject

    truth = staged.labels
    scored = new.scored and bool((truth >= 0).any())
    summary = None
    if scored:
        results = metrics_lib.evaluate_subjects(truth, predicted, np.zeros(truth.size, np.int64),
                                                subject_names=[name], source=str(new.path))
        summary = results["overall"]

    real = model_card.trained_on_real_recordings(card, model.config)
    caveat = model_card.SIMULATED_CAVEAT if real is False else None
    out_dir = pathlib.Path(out_dir or model.workdir / "predictions" / name)
    epoch_seconds = model.epoch_seconds
    onsets = new.start_seconds + epoch_seconds * np.arange(predicted.size)
    tsv = report_lib.write_hypnogram_tsv(out_dir / f"{name}_hypnogram.tsv", onsets, predicted,
                                         probabilities, duration_s=epoch_seconds)
    title = f"{name}: {model.config.mode} {model.model_config.name} ({model.input_key}), " \
            f"step {model.step}"
    if summary is not None:
        title += f"\n{metrics_lib.summary_line(summary)}"
    png = report_lib.plot_hypnogram(
        out_dir / f"{name}_hypnogram.png", predicted, epoch_seconds=epoch_seconds,
        true_stages=truth if scored else None, probabilities=probabilities, title=title,
        start_seconds=new.start_seconds, clock_start=new.start_time, note=caveat or "")
    counts = {stage: int(np.sum(predicted == i)) for i, stage in enumerate(STAGES)}
    info = {
        "recording": str(new.path),
        "name": name,
        "epochs": int(predicted.size),
        "epoch_seconds": epoch_seconds,
        "first_onset_seconds": new.start_seconds,
        "start_time": new.start_time.isoformat() if new.start_time else None,
        "recording_sampling_rate": float(new.recording.sampling_rate),
        "bandpass_hz": input_band(new, model),
        "scored": scored,
        "predicted_stage_counts": counts,
        "checkpoint": {"workdir": str(model.workdir), "which": model.which, "step": model.step,
                       "mode": model.config.mode, "network": model.network,
                       "model": model.model_config.name, "input": model.input_key,
                       "derivations": list(model.derivations),
                       "sampling_rate": model.sampling_rate},
        "inputs": inputs,
        "repeated_inputs": staged.repeated_inputs,
        "channel_map": dict(channel_map or {}),
        "metrics": summary,
        "caveat": caveat,
        "files": {"tsv": tsv.name, "png": png.name},
        "model_card": card,
    }
    json_path = files.write_json(out_dir / f"{name}_prediction.json", info)
    return {"name": name, "epochs": int(predicted.size), "scored": scored, "step": model.step,
            "tsv": tsv, "png": png, "json": json_path, "metrics": summary, "inputs": inputs,
            "repeated_inputs": staged.repeated_inputs,
            "model_card": card, "network": model.network, "workdir": model.workdir,
            "trained_on_real_recordings": real}


def repeat_warning(repeated: Mapping[str, str]) -> str | None:
    """The one-line warning for model inputs that repeat another's signal (None if none do)."""
    if not repeated:
        return None
    pairs = ", ".join(f"{d} repeats {other}" for d, other in repeated.items())
    return (f"warning: the recording has fewer distinct EEG signals than the model has inputs "
            f"({pairs}); the model never saw such input, so its stages are less reliable")


# --------------------------------------------------------------------------------------------------
# Staging from Python


@dataclasses.dataclass(frozen=True, eq=False)
class Staging:
    """The stages of one night, as ``stage_raw`` returns them.

    Attributes:
      stages: (epochs,) int64 predicted stages, 0=W 1=N1 2=N2 3=N3 4=REM.
      probabilities: (epochs, 5) float64 stage probabilities, columns W N1 N2 N3 REM.
      onsets: (epochs,) float64 seconds from the recording's first sample to each epoch.
      epoch_seconds: the epoch length.
      step: the checkpoint's step; network: "model" or "teacher".
      inputs: {model derivation: how it was formed from the recording's channels}.
      repeated_inputs: {derivation: the input whose signal it repeats} (too few channels).
      trained_on_real_recordings: False for a model that only ever saw simulated nights.
    """

    stages: np.ndarray
    probabilities: np.ndarray
    onsets: np.ndarray
    epoch_seconds: float
    step: int
    network: str
    inputs: dict[str, str]
    repeated_inputs: dict[str, str]
    trained_on_real_recordings: bool | None

    @property
    def hypnogram(self) -> list[str]:
        """The stages by name, one per epoch ("W", "N1", "N2", "N3", "REM")."""
        return [STAGES[int(s)] for s in self.stages]

    def records(self) -> list[dict[str, Any]]:
        """One dict per epoch: onset, stage and p_W .. p_REM (``pandas.DataFrame(records())``)."""
        return [{"onset": float(t), "stage": STAGES[int(s)],
                 **{f"p_{name}": float(p) for name, p in zip(STAGES, row)}}
                for t, s, row in zip(self.onsets, self.stages, self.probabilities)]


def recording_from_raw(raw, epoch_seconds: float = 30.0) -> NewRecording:
    """An ``mne.io.BaseRaw`` as a night to stage: its EEG channels (by label, as the EDF reader
    sorts them: 10-20 and ear-EEG names, with or without type and reference) in microvolts,
    every whole epoch unscored; channels in ``raw.info["bads"]`` are rejected.

    Raises:
      DataError naming the raw's file (or "mne raw"): no EEG channel, shorter than an epoch.
    """
    from eegkd_jax.data import bids

    filenames = [f for f in (getattr(raw, "filenames", None) or ()) if f]
    source = pathlib.Path(filenames[0]) if filenames else pathlib.Path("mne-raw")
    groups = {n: montage.eeg_group(n) for n in raw.ch_names}
    scalp = [n for n in raw.ch_names if groups[n] == "scalp"]
    ear = [n for n in raw.ch_names if groups[n] == "ear"]
    if not scalp and not ear:
        raise DataError(source, f"no EEG channels among {list(raw.ch_names)}")
    fs = float(raw.info["sfreq"])
    samples = epoch_seconds * fs
    if not math.isclose(samples, round(samples)):
        raise DataError(source, f"{epoch_seconds:g}-s epochs are not whole samples at {fs:g} Hz")
    epochs = raw.n_times // int(round(samples))
    if epochs == 0:
        raise DataError(source, f"signal is shorter than one {epoch_seconds:g}-s epoch")
    scalp_signal, ear_signal = bids.read_microvolts(raw, [scalp, ear], 0, raw.n_times, source)
    recording = Recording(
        subject=source.stem, source=str(source), sampling_rate=fs, scalp=scalp_signal,
        scalp_channels=tuple(scalp), ear=ear_signal, ear_channels=tuple(ear),
        labels=np.full(epochs, -1, np.int8), epoch_seconds=epoch_seconds,
        rejected_channels=frozenset(b for b in raw.info["bads"] if b in scalp + ear))
    start = raw.info.get("meas_date")
    start = start.replace(tzinfo=None) if isinstance(start, datetime.datetime) else None
    return NewRecording(recording, source, False, 0.0, start)


def stage_raw(
    raw,
    checkpoint: str | pathlib.Path,
    channel_map: str | Mapping[str, str] | None = None,
    *,
    which: str | int = "best",
    network: str = "model",
    batch_size: int | None = None,
    max_sequence_epochs: int = 0,
) -> Staging:
    """Stages a night held in an ``mne.io.BaseRaw`` with a trained run, through the same code
    as ``eegkd predict`` (the run's own derivations, filter, rate and scaling)::

        raw = mne.io.read_raw_edf("night-PSG.edf")
        staging = predict.stage_raw(raw, "runs/online_kd", network="teacher",
                                    channel_map={"A1-A2": "EEG Fpz-Cz - EEG Pz-Oz"})
        staging.hypnogram[:3], staging.probabilities.shape   # ['W', 'W', 'N1'], (epochs, 5)

    Args:
      raw: the recording (any MNE reader; volts, as MNE keeps them).
      checkpoint: the run's workdir or its checkpoints directory.
      channel_map: {derivation: recording channels} or its text form (see ``predict_recording``).
      which, network, batch_size, max_sequence_epochs: as ``predict_recording``.

    Returns:
      ``Staging``: stages and probabilities per epoch; writes nothing.

    Raises:
      DataError: the recording cannot give the model its input; the message says what would.
    """
    model = load_trained_model(checkpoint, which, network=network)
    if isinstance(channel_map, str):
        channel_map = montage.parse_channel_map(channel_map)
    input_specs(model, channel_map)
    new = recording_from_raw(raw, model.epoch_seconds)
    staged = stage_night(model, new, channel_map, batch_size=batch_size,
                         max_sequence_epochs=max_sequence_epochs)
    card = model_card.load(model.workdir)
    return Staging(
        stages=staged.stages, probabilities=staged.probabilities,
        onsets=new.start_seconds + model.epoch_seconds * np.arange(staged.stages.size),
        epoch_seconds=model.epoch_seconds, step=model.step, network=model.network,
        inputs=staged.inputs, repeated_inputs=staged.repeated_inputs,
        trained_on_real_recordings=model_card.trained_on_real_recordings(card, model.config))


def card_lines(result: Mapping[str, Any]) -> list[str]:
    """What predict prints about the model: its card's summary (or that the run has none)."""
    card = result["model_card"]
    if card is None:
        return [f"no model card in {result['workdir']} (a run from before model cards were saved)"]
    lines = model_card.summary(card, result["network"]).splitlines()
    return [f"model card ({model_card.path(result['workdir'])}):"] + [f"  {t}" for t in lines]
