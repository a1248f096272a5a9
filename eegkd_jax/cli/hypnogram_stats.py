"""``eegkd hypnogram-stats``: stage shares, bout lengths and transitions of the simulator's nights
(and of a config's cohort) against real scorings, as JSON (``data.hypnogram_stats.report``).

    eegkd hypnogram-stats --sleep_edf=../shared/data/sleep-edf/hypnograms \\
        --eesm17=../shared/data/eesm17 --cohort=online_kd \\
        --out=benchmarks/results/2026-12-07-hypnogram-distance.json
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--sleep_edf=DIR --eesm17=DIR [flags]"
SUMMARY = ("hypnogram-stats: how far simulated (or any) hypnograms are from real scorings "
           "(JSON)")
WHAT = ("Stage shares, mean bout lengths and transition matrices, each night cut to its sleep "
        "period (first to last sleep epoch); distances of the simulator's nights (true stages and "
        "scored labels) and of EESM17 from the real sets. Sleep-EDF: R&K scoring (S3+S4 -> N3, "
        "movement -> unscored); EESM17: AASM.")


@functools.cache
def define_flags():
    from absl import flags

    flags.DEFINE_string("sleep_edf", None, "Directory of *-Hypnogram.edf files.",
                        required=True)
    flags.DEFINE_string("eesm17", None, "EESM17 BIDS root.", required=True)
    flags.DEFINE_integer("subjects", 100, "Simulated nights.")
    flags.DEFINE_integer("seed", 0, "Seed of the simulated nights.")
    flags.DEFINE_float("hours", 7.5, "Length of the simulated nights.")
    flags.DEFINE_string("cohort", "", "Also the cohort a mode's defaults build, e.g. "
                                      "online_kd.")
    flags.DEFINE_string("out", "", "JSON file to write (default: print).")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from eegkd_jax.data import hypnogram_stats

    f = define_flags()
    common.warnings_only()
    result = {"command": " ".join(["eegkd hypnogram-stats", *sys.argv[1:]]), "what": WHAT,
              **hypnogram_stats.report(f.sleep_edf, f.eesm17, f.subjects, f.seed, f.hours,
                                       f.cohort)}
    text = json.dumps(result, indent=1)
    if f.out:
        pathlib.Path(f.out).write_text(text + "\n")
    else:
        print(text)


def run(args: Sequence[str], prog: str = "eegkd hypnogram-stats") -> None:
    common.run_absl(prog, args, define_flags, main, usage=USAGE, summary=SUMMARY)
