"""TFDS builder that turns a cohort of nights into per-subject shards of paired 30-s epochs.

One TFDS split per subject (the split is named by the subject id, e.g. ``"sim-03"`` or
``"sub-001"``), one example per scoring epoch, in epoch order (shuffling at write time is disabled:
the pipeline needs epoch i of a night at index i to assemble L-epoch sequences). Each example holds

  ``scalp`` (S, n_scalp) float32, ``ear`` (S, n_ear) float32, ``label`` int32 (-1 = unscored),
  ``epoch`` int32 (its index in the night),

S = epoch_seconds * sampling_rate. The files are ``array_record``, so the pipeline reads any epoch
by index (``builder.as_data_source``) and can replay the same order from any step. The per-night
labels, derivation names and sources are also stored in the dataset's ``metadata.json`` so that
windows can be planned without reading the shards.

Caching: the builder config name is ``<source>-<hash>``, the hash covering every data-config field
that changes what is written (source, path, rate, derivations, rejections, filtering, scaling, the
simulator's cohort) and ``FORMAT_VERSION``. A changed preprocessing config therefore lands in a new
directory and is built afresh, while an unchanged one reuses the shards under
``data_cfg.cache_dir``.

Memory: splits are generated one after another and each generator loads its night only when TFDS
starts writing that split, so at most the night being written (its raw recording briefly, then its
derivations plus the serialized examples awaiting the write) is in memory.

No network: ``try_download_gcs`` is off and there is nothing to download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from eegkd_jax import files
from eegkd_jax.data.recording import DataError

# Bump when the layout of the examples or the meaning of the stored values changes.
FORMAT_VERSION = "1.1.0"
DATASET_NAME = "eegkd_cohort"

# Fields of the data config that change the written shards (and nothing else).
_HASHED_FIELDS = (
    "source", "path", "sampling_rate", "epoch_seconds", "scalp_derivations", "ear_derivations",
    "ear_rejections", "auto_reject_ear", "preprocess",
)  # fmt: skip
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][\w-]*$")


def build_spec(data_cfg) -> dict:
    """The part of ``data_cfg`` that determines the shards, as plain JSON-able data."""
    spec = {name: files.plain(data_cfg[name]) for name in _HASHED_FIELDS}
    if spec["path"]:
        spec["path"] = os.path.abspath(os.path.expanduser(spec["path"]))
    if data_cfg.source == "simulated":
        spec["simulated"] = files.plain(data_cfg.simulated)
    spec["format_version"] = FORMAT_VERSION
    return spec


def config_name(data_cfg) -> str:
    """``<source>-<12 hex digits>``: the builder config (and directory) name for ``data_cfg``."""
    spec = build_spec(data_cfg)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{data_cfg.source}-{digest}"


@dataclasses.dataclass
class CohortConfig(tfds.core.BuilderConfig):
    """Builder config carrying the data config it was made from (as JSON, so it pickles simply)."""

    spec_json: str = "{}"


def _load_night(data_cfg, subject: str):
    """One PairedNight, read and preprocessed by the readers' code (imported here, not at module
    import, so that building is the only thing that needs the readers)."""
    from eegkd_jax.data import preprocess, sources

    recording = sources.load_recording(data_cfg, subject)
    return preprocess.prepare_night(recording, data_cfg)


def _list_subjects(data_cfg) -> list[str]:
    from eegkd_jax.data import sources

    return list(sources.list_subjects(data_cfg))


class EegkdCohort(tfds.core.GeneratorBasedBuilder):
    """Per-subject splits of paired scalp / ear epochs; see the module docstring."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    RELEASE_NOTES = {"1.0.0": "Per-subject array_record splits of paired 30-s epochs.",
                     "1.1.0": "Simulated labels are a simulated scorer's reading."}

    def __init__(self, *, data_cfg, data_dir: str, **kwargs):
        self._data_cfg = data_cfg
        spec = build_spec(data_cfg)
        config = CohortConfig(
            name=config_name(data_cfg),
            version=FORMAT_VERSION,
            description=f"{data_cfg.source} cohort",
            spec_json=json.dumps(spec, sort_keys=True),
        )
        super().__init__(data_dir=data_dir, config=config, file_format="array_record", **kwargs)

    # TFDS prints "Downloading and preparing dataset ..." to stdout although nothing is
    # downloaded; where the shards are being built goes to the log instead.
    def _log_download_bytes(self) -> None:
        logging.info("building the cohort's shards in %s", self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("cohort shards written to %s", self.data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self._data_cfg
        epoch_samples = int(round(cfg.epoch_seconds * cfg.sampling_rate))
        n_scalp, n_ear = len(cfg.scalp_derivations), len(cfg.ear_derivations)
        bytes_ = tfds.features.Encoding.BYTES  # raw float32 bytes: decoding is one frombuffer
        return tfds.core.DatasetInfo(
            builder=self,
            description="Paired scalp / ear-EEG 30-s epochs, a split per subject, in epoch order.",
            features=tfds.features.FeaturesDict(
                {
                    "scalp": tfds.features.Tensor(
                        shape=(epoch_samples, n_scalp), dtype=np.float32, encoding=bytes_
                    ),
                    "ear": tfds.features.Tensor(
                        shape=(epoch_samples, n_ear), dtype=np.float32, encoding=bytes_
                    ),
                    "label": tfds.features.Scalar(dtype=np.int32),
                    "epoch": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            # Epoch i of a night must stay at index i.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        subjects = _list_subjects(self._data_cfg)
        if not subjects:
            raise DataError(self._data_cfg.path or self._data_cfg.source, "no subjects found")
        for subject in subjects:
            if not _SPLIT_NAME.match(subject):
                raise DataError(
                    subject, "subject ids must be letters, digits, '_' or '-' to name a split"
                )
        self.info.metadata["subjects"] = {}
        return {subject: self._generate_examples(subject) for subject in subjects}

    def _generate_examples(self, subject: str):
        # Generators are lazy: this body (and the night's memory) starts only when TFDS writes this
        # split, after the previous split is written.
        cfg = self._data_cfg
        night = _load_night(cfg, subject)
        meta = self.info.metadata
        expected = int(round(cfg.epoch_seconds * cfg.sampling_rate))
        if night.epoch_samples != expected or float(night.sampling_rate) != float(
            cfg.sampling_rate
        ):
            raise DataError(
                night.source or subject,
                f"prepared night has {night.epoch_samples} samples per epoch at "
                f"{night.sampling_rate:g} Hz; "
                f"the config asks for {expected} at {cfg.sampling_rate:g} Hz",
            )
        for key, names in (("scalp_names", night.scalp_names), ("ear_names", night.ear_names)):
            if key not in meta:
                meta[key] = list(names)
            elif list(names) != meta[key]:
                raise DataError(
                    night.source or subject,
                    f"{key} {list(names)} differ from the cohort's {meta[key]}",
                )
        meta["sampling_rate"] = float(night.sampling_rate)
        meta["epoch_samples"] = int(night.epoch_samples)
        meta["subjects"][subject] = {
            "labels": night.labels.astype(int).tolist(),
            "source": night.source,
        }
        s = night.epoch_samples
        for i in range(night.num_epochs):
            yield (
                i,
                {
                    "scalp": night.scalp[i * s : (i + 1) * s],
                    "ear": night.ear[i * s : (i + 1) * s],
                    "label": int(night.labels[i]),
                    "epoch": i,
                },
            )


def cohort_builder(data_cfg) -> EegkdCohort:
    """The builder for ``data_cfg`` under ``data_cfg.cache_dir`` (nothing is built yet)."""
    return EegkdCohort(data_cfg=data_cfg, data_dir=os.path.expanduser(data_cfg.cache_dir))


def build(data_cfg) -> tuple[EegkdCohort, bool]:
    """Builds the shards for ``data_cfg`` unless they already exist.

    Returns:
      (builder, built_now): the prepared builder, and whether this call wrote the shards.
    """
    builder = cohort_builder(data_cfg)
    built_now = not builder.is_prepared()
    if built_now:
        tfds.disable_progress_bar()  # one bar per split floods logs and CI output
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
        except Exception:
            # Several processes sharing one cache_dir (hosts of a multi-host run) may all start
            # building; TFDS writes into a private temporary directory and renames it into place,
            # so the losers of that race fail at the rename. Finished shards are as good as ours.
            if not cohort_builder(data_cfg).is_prepared():
                raise
            built_now = False
        # Re-open from disk so that what we return reads exactly what later runs will read.
        builder = cohort_builder(data_cfg)
    return builder, built_now
