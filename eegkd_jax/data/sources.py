"""Where nights come from: one entry point per cohort source, chosen by ``data_cfg.source``.

* ``"simulated"``: the embedded synthetic cohort, ``data_cfg.simulated.subjects`` subjects named
  ``sim-01`` ... (``eegkd_jax.data.simulate``), ``simulated.hours`` long, seeded by ``simulated.seed``.
* ``"eesm17"``: an EESM17 BIDS root at ``data_cfg.path`` (``eegkd_jax.data.bids``).
* ``"edf"``: a directory of Sleep-EDF style ``*-PSG.edf`` / ``*-Hypnogram.edf`` pairs at
  ``data_cfg.path`` (``eegkd_jax.data.edf``).

Readers return what is on disk; the config's per-subject rejections are applied later, in
``preprocess.prepare_night``, so that one place decides which electrodes are used.
"""

from __future__ import annotations

import pathlib

from eegkd_jax.data import bids, edf
from eegkd_jax.data.recording import DataError, Recording

SOURCES = ("simulated", "eesm17", "edf")


def _check_source(data_cfg) -> str:
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"unknown data.source {source!r}; expected one of {SOURCES}")
    if source != "simulated" and not data_cfg.path:
        raise ValueError(f"data.source {source!r} reads from disk: set data.path to its directory")
    return source


def list_subjects(data_cfg) -> list[str]:
    """Sorted subject ids of the configured cohort (no signal is read)."""
    source = _check_source(data_cfg)
    if source == "simulated":
        from eegkd_jax.data import simulate  # another module's heavy deps load only when used

        return sorted(simulate.subject_ids(int(data_cfg.simulated.subjects)))
    if source == "eesm17":
        return bids.list_subjects(pathlib.Path(data_cfg.path))
    return edf.list_subjects(pathlib.Path(data_cfg.path))


def load_recording(data_cfg, subject: str) -> Recording:
    """One night of ``subject`` from the configured source, raw electrodes in microvolts."""
    source = _check_source(data_cfg)
    epoch_seconds = float(data_cfg.epoch_seconds)
    if source == "simulated":
        from eegkd_jax.data import simulate

        sim = data_cfg.simulated
        known = list_subjects(data_cfg)
        if subject not in known:
            raise DataError(
                subject, f"not in the simulated cohort of {len(known)} ({known[0]}..{known[-1]})"
            )
        recording = simulate.simulate_recording(
            subject, seed=int(sim.seed), hours=float(sim.hours),
            scorer_disagreement=bool(sim.get("scorer_disagreement", True)))
        if recording.epoch_seconds != epoch_seconds:
            raise DataError(
                recording.source,
                f"simulated with {recording.epoch_seconds:g}-s epochs, config says {epoch_seconds:g}",
            )
        return recording
    if source == "eesm17":
        return bids.read_subject(pathlib.Path(data_cfg.path), subject, epoch_seconds=epoch_seconds)
    return edf.read_subject(pathlib.Path(data_cfg.path), subject, epoch_seconds=epoch_seconds)
