"""Input pipeline: subject splits, and training and evaluation batches streamed through tf.data.

Shards come from ``builder`` (one array_record split per subject, epoch i of a night at index i), so
any epoch can be read by index, and which windows form a batch is the ``sampler``'s rule, a pure
function of (seed, step, shard): a run started at ``start_step=k`` replays exactly what an
uninterrupted run sees from step k, with no iterator state to checkpoint
(``tf.data.Dataset.shuffle`` is not used for this reason: its buffer would have to be checkpointed).

* A training *window* is L consecutive epochs of one night (L = ``data_cfg.sequence_length``);
  every start offset is used (stride 1), except windows whose epochs are all unscored, which teach
  nothing (every label in them is masked). One pass = all windows of the training subjects.
* Evaluation walks every listed subject in order in non-overlapping L-epoch sequences starting at
  epoch 0, L, 2L, ...; a night's last partial sequence is padded with zeros and label -1, and the
  last global batch is filled with padding rows (``valid`` False, ``subject`` 0, ``epoch`` 0).
* A host feeds the shards of its own devices: its rows of each global batch, which together with
  the other hosts' are the global batch.

tf.data runs the loading: a dataset of step numbers is mapped (in parallel, order kept) through a
function that reads the batch's epochs from the shards, then prefetched; the iterators yield numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from eegkd_jax.data.recording import UNSCORED, DataError
from eegkd_jax.data.sampler import Sampler

Splits = collections.namedtuple("Splits", ["train", "validation", "test"])


@dataclasses.dataclass(eq=False)
class Cohort:
    """A built cohort: what the trainer needs to know, and random access to its epochs.

    Attributes:
      subjects: sorted subject ids.
      num_epochs: subject -> number of 30-s epochs in its night.
      labels: subject -> (num_epochs,) int8 stages (-1 = unscored), from the shards' metadata.
      scalp_names, ear_names: derivation names, e.g. ("A1-A2", "C3-O1", "C4-O2") and
        ("L-R", "L_E", "R_E").
      sampling_rate: Hz. epoch_samples: samples per epoch (S).
      data_dir: where the shards live. built_now: whether ``prepare_cohort`` wrote them this time.
    """

    subjects: tuple[str, ...]
    num_epochs: dict[str, int]
    labels: dict[str, np.ndarray]
    scalp_names: tuple[str, ...]
    ear_names: tuple[str, ...]
    sampling_rate: float
    epoch_samples: int
    data_dir: str
    built_now: bool
    _builder: object = dataclasses.field(repr=False)
    _sources: dict = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def source(self, subject: str):
        """Random-access view of one subject's epochs: ``source[i]`` is a dict for epoch i."""
        with self._lock:
            if subject not in self._sources:
                self._sources[subject] = self._builder.as_data_source(split=subject)
            return self._sources[subject]

    def read_epochs(
        self, subject: str, epochs: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(len(epochs), S, n_scalp), (len(epochs), S, n_ear) float32 and (len(epochs),) int32.

        Each stored example (a ``tf.train.Example`` whose signals are raw float32 bytes, see
        ``builder``) is read and parsed here, one after another into arrays made once, rather than
        through TFDS's generic decoder and the thread pool that ``__getitems__`` starts per call,
        which took most of the time here (benchmarks/README.md)."""
        from tensorflow.core.example import example_pb2  # deferred: only reading needs it

        records = self.source(subject).data_source  # serialized examples, by index
        k, s = len(epochs), self.epoch_samples
        scalp = np.empty((k, s, len(self.scalp_names)), np.float32)
        ear = np.empty((k, s, len(self.ear_names)), np.float32)
        labels = np.empty((k,), np.int32)
        for i, epoch in enumerate(epochs):
            feature = example_pb2.Example.FromString(records[int(epoch)]).features.feature
            scalp[i].reshape(-1)[:] = np.frombuffer(feature["scalp"].bytes_list.value[0], "<f4")
            ear[i].reshape(-1)[:] = np.frombuffer(feature["ear"].bytes_list.value[0], "<f4")
            labels[i] = feature["label"].int64_list.value[0]
        return scalp, ear, labels


def prepare_cohort(data_cfg) -> Cohort:
    """Builds the TFDS shards for ``data_cfg`` under ``data_cfg.cache_dir`` unless an identical
    build exists (see ``builder``), and opens them."""
    from eegkd_jax.data import builder as builder_lib  # TFDS loads only when a cohort is built

    builder, built_now = builder_lib.build(data_cfg)
    meta = builder.info.metadata
    per_subject = meta["subjects"]
    subjects = tuple(sorted(per_subject))
    labels = {s: np.asarray(per_subject[s]["labels"], np.int8) for s in subjects}
    num_epochs = {s: int(builder.info.splits[s].num_examples) for s in subjects}
    for s in subjects:
        if num_epochs[s] != labels[s].shape[0]:
            raise DataError(
                os.fspath(builder.data_dir),
                f"split {s} holds {num_epochs[s]} epochs but its metadata lists "
                f"{labels[s].shape[0]} labels; "
                "delete the directory to rebuild",
            )
    return Cohort(
        subjects=subjects,
        num_epochs=num_epochs,
        labels=labels,
        scalp_names=tuple(meta["scalp_names"]),
        ear_names=tuple(meta["ear_names"]),
        sampling_rate=float(meta["sampling_rate"]),
        epoch_samples=int(meta["epoch_samples"]),
        data_dir=os.fspath(builder.data_dir),
        built_now=built_now,
        _builder=builder,
    )


def subject_splits(subjects: Sequence[str], data_cfg) -> Splits:
    """Disjoint train / validation / test subject tuples (each sorted).

    Explicit ``data_cfg.test_subjects`` / ``validation_subjects`` win; an empty list means "the last
    ``num_test_subjects`` in sorted order" for test, then the last ``num_validation_subjects`` of
    what remains for validation. Everything else trains.
    """
    ordered = tuple(sorted(subjects))
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"duplicate subject ids in {ordered}")

    def explicit(name):
        chosen = tuple(getattr(data_cfg, name) or ())
        unknown = sorted(set(chosen) - set(ordered))
        if unknown:
            raise ValueError(
                f"data.{name} lists {unknown}, which are not in the cohort {list(ordered)}"
            )
        return chosen

    test = explicit("test_subjects")
    if not test:
        n = int(data_cfg.num_test_subjects)
        test = ordered[len(ordered) - n :] if n > 0 else ()
    rest = tuple(s for s in ordered if s not in test)
    validation = explicit("validation_subjects")
    if validation:
        overlap = sorted(set(validation) & set(test))
        if overlap:
            raise ValueError(
                f"subjects {overlap} are in both data.validation_subjects and the test split"
            )
    else:
        n = int(data_cfg.num_validation_subjects)
        validation = rest[len(rest) - n :] if n > 0 else ()
    train = tuple(s for s in rest if s not in validation)
    if not train:
        raise ValueError(
            f"no training subjects left: {len(ordered)} subjects, validation {list(validation)}, "
            f"test {list(test)}"
        )
    return Splits(train, tuple(sorted(validation)), tuple(sorted(test)))


# --------------------------------------------------------------------------------------------------
# Training


def _check_subjects(cohort: Cohort, subjects: Sequence[str]) -> tuple[str, ...]:
    subjects = tuple(subjects)
    if not subjects:
        raise ValueError("no subjects given")
    unknown = [s for s in subjects if s not in cohort.num_epochs]
    if unknown:
        raise ValueError(f"subjects {unknown} are not in the cohort ({list(cohort.subjects)})")
    return subjects


def _sequence_length(data_cfg) -> int:
    seq_len = int(data_cfg.sequence_length)
    if seq_len < 1:
        raise ValueError(f"data.sequence_length must be >= 1, got {seq_len}")
    return seq_len


def training_windows(cohort: Cohort, subjects: Sequence[str], data_cfg) -> np.ndarray:
    """Every training window, in a fixed order (subject order, then start).

    Returns:
      (N, 2) int64 rows of (index into ``subjects``, first epoch).
    """
    subjects = _check_subjects(cohort, subjects)
    seq_len = _sequence_length(data_cfg)
    rows = []
    for i, s in enumerate(subjects):
        labels = cohort.labels[s]
        if labels.shape[0] < seq_len:
            raise DataError(
                s, f"night has {labels.shape[0]} epochs, fewer than sequence_length={seq_len}"
            )
        scored = np.convolve(
            (labels != UNSCORED).astype(np.int64), np.ones(seq_len, np.int64), mode="valid"
        )
        starts = np.flatnonzero(scored > 0)
        rows.append(np.stack([np.full(starts.shape, i), starts], axis=1))
    windows = np.concatenate(rows).astype(np.int64)
    if windows.shape[0] == 0:
        raise DataError(",".join(subjects), "no window with a scored epoch")
    return windows


def _assemble(cohort: Cohort, subjects, rows: np.ndarray, seq_len: int):
    """Reads (subject index, first epoch) rows into (b, L*S, C) float32 and (b, L) int32, padding
    epochs past a night's end with zeros and label -1."""
    b, s = rows.shape[0], cohort.epoch_samples
    scalp = np.zeros((b, seq_len, s, len(cohort.scalp_names)), np.float32)
    ear = np.zeros((b, seq_len, s, len(cohort.ear_names)), np.float32)
    labels = np.full((b, seq_len), UNSCORED, np.int32)
    # One read per subject in the batch: batched reads are much cheaper than one per epoch.
    for subj in np.unique(rows[:, 0]):
        name = subjects[subj]
        n = cohort.num_epochs[name]
        which = np.flatnonzero(rows[:, 0] == subj)
        epochs = rows[which, 1][:, None] + np.arange(seq_len)[None, :]  # (k, L)
        real = epochs < n
        x_scalp, x_ear, y = cohort.read_epochs(name, epochs[real])
        row_idx, pos_idx = np.nonzero(real)
        scalp[which[row_idx], pos_idx] = x_scalp
        ear[which[row_idx], pos_idx] = x_ear
        labels[which[row_idx], pos_idx] = y
    return scalp.reshape(b, seq_len * s, -1), ear.reshape(b, seq_len * s, -1), labels


def _tf():
    import tensorflow as tf  # deferred: only the input pipeline needs it

    return tf


# Batches assembled at once. Each one already reads its epochs through array_record's own thread
# pool, so a few in flight keep the host busy; more would only hold more large batches in memory
# (a batch of 32 sequences of 35 epochs is ~160 MB).
_BATCHES_IN_FLIGHT = max(1, min(4, os.cpu_count() or 1))


def _stream(make_batch, first: int, last: int | None, keys, dtypes, data_cfg) -> Iterator[dict]:
    """tf.data over batch numbers [first, last) (last None: forever), mapped through the numpy
    function ``make_batch`` (which returns arrays in the order of ``keys``) in parallel with order
    kept, then prefetched; yields dicts of numpy arrays."""
    tf = _tf()
    stop = np.iinfo(np.int64).max if last is None else last
    ds = tf.data.Dataset.range(first, stop)
    ds = ds.map(
        lambda k: tf.numpy_function(make_batch, [k], [getattr(tf, d) for d in dtypes]),
        num_parallel_calls=_BATCHES_IN_FLIGHT,
        deterministic=True,
    )
    ds = ds.prefetch(max(1, int(data_cfg.prefetch)))
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    for arrays in ds.as_numpy_iterator():
        yield dict(zip(keys, arrays, strict=True))


def train_batches(
    cohort: Cohort,
    subjects: Sequence[str],
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    stop_step: int | None = None,
    num_shards: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Training batches: this host's rows of global batch ``start_step``, then the next...

    Endless unless ``stop_step`` is given (then batches ``start_step .. stop_step - 1``). A run that
    knows its length should pass it: closing an endless tf.data iterator waits for the batches
    still in flight, which cost 10-17 s at the end of every run on a loaded 2-core host.
    ``num_shards``: the devices along the ``data`` axis (default one per host), the sampler's
    shards (``sampler``); the same rule as the device-resident path.

    Yields:
      {"scalp": (b, L*S, n_scalp) float32, "ear": (b, L*S, n_ear) float32, "labels": (b, L) int32}
      with b = global_batch_size // process_count. The batch at step k depends only on
      (seed, k, the subjects and the cohort).
    """
    subjects = _check_subjects(cohort, subjects)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if stop_step is not None and stop_step < start_step:
        raise ValueError(f"stop_step {stop_step} is before start_step {start_step}")
    seq_len = _sequence_length(data_cfg)
    windows = training_windows(cohort, subjects, data_cfg)
    sampler = Sampler(windows.shape[0], global_batch_size, num_shards or process_count, seed)
    sampler.host_rows(0, process_index, process_count)  # bad shares raise here, not in tf.data

    def make_batch(step):
        rows, _ = sampler.host_rows(int(step), process_index, process_count)
        return _assemble(cohort, subjects, windows[rows], seq_len)

    # Not a generator itself, so that bad arguments raise here rather than at the first next().
    return _stream(
        make_batch,
        int(start_step),
        None if stop_step is None else int(stop_step),
        ("scalp", "ear", "labels"),
        ("float32", "float32", "int32"),
        data_cfg,
    )


def eval_sequences(cohort: Cohort, subjects: Sequence[str], data_cfg) -> np.ndarray:
    """(M, 2) rows (index into ``subjects``, first epoch): every epoch once, in order."""
    subjects = _check_subjects(cohort, subjects)
    seq_len = _sequence_length(data_cfg)
    rows = [
        np.stack([np.full(len(starts), i), starts], axis=1)
        for i, s in enumerate(subjects)
        for starts in [np.arange(0, cohort.num_epochs[s], seq_len)]
    ]
    return np.concatenate(rows).astype(np.int64)


def eval_batches(
    cohort: Cohort,
    subjects: Sequence[str],
    data_cfg,
    *,
    global_batch_size: int,
    num_shards: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Finite evaluation batches covering every epoch of ``subjects`` exactly once.

    Yields:
      the train keys plus "subject" (b,) int32 index into ``subjects``, "epoch" (b,) int32 first
      epoch of the sequence, "valid" (b,) bool (False on padding rows). Every host yields the same
      number of batches, ceil(M / global_batch_size) for M sequences.
    """
    subjects = _check_subjects(cohort, subjects)
    seq_len = _sequence_length(data_cfg)
    sequences = eval_sequences(cohort, subjects, data_cfg)
    sampler = Sampler(sequences.shape[0], global_batch_size, num_shards or process_count)
    sampler.host_rows(0, process_index, process_count)  # bad shares raise here

    def make_batch(k):
        at, valid = sampler.host_rows(int(k), process_index, process_count)
        scalp, ear, labels = _assemble(cohort, subjects, sequences[at], seq_len)
        scalp[~valid], ear[~valid], labels[~valid] = 0.0, 0.0, UNSCORED
        subject = np.where(valid, sequences[at, 0], 0).astype(np.int32)
        epoch = np.where(valid, sequences[at, 1], 0).astype(np.int32)
        return scalp, ear, labels, subject, epoch, valid

    return _stream(
        make_batch,
        0,
        sampler.num_batches,
        ("scalp", "ear", "labels", "subject", "epoch", "valid"),
        ("float32", "float32", "int32", "int32", "int32", "bool"),
        data_cfg,
    )
