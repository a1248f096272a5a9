"""``eegkd eval`` (and ``python eval.py``): scores a run's checkpoint on whole held-out subjects
and writes report.json, report.md, confusion_matrix.png and hypnograms/
(``evaluate.evaluate_checkpoint``)."""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--workdir=DIR [flags]"
SUMMARY = "eval: score a trained run on its held-out subjects: report.json, report.md, figures"


@functools.cache
def define_flags():
    """The flags of ``eegkd eval`` (defined once, not at import)."""
    from absl import flags

    from eegkd_jax import evaluate

    flags.DEFINE_string("workdir", None, "Directory of the trained run.", required=True)
    flags.DEFINE_string("out_dir", None, "Where to write the report (default under the "
                                         "workdir).")
    flags.DEFINE_string("checkpoint", "best",
                        'Which checkpoint: "best", "latest" or a step number.')
    flags.DEFINE_enum("split", "test", list(evaluate.SPLITS),
                      "Which subjects of the run's split.")
    flags.DEFINE_list("subjects", None, "Explicit subject ids to evaluate instead of --split.")
    flags.DEFINE_integer("batch_size", None, "Global batch size (default: the run's).")
    flags.DEFINE_bool("teacher", False, "Also score the scalp teacher held in a KD checkpoint.")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    import ml_collections
    from absl import logging

    from eegkd_jax import compilation_cache, evaluate, metrics, parallel

    flags = define_flags()
    logging.set_verbosity(logging.INFO)
    if pathlib.Path(flags.workdir).is_dir():  # a missing one is reported below, in one line
        common.log_to_file(flags.workdir, "eval")
    compilation_cache.enable()
    checkpoint = common.checkpoint_choice(flags.checkpoint, "checkpoint")
    # A multi-host evaluation is started by its launcher's environment, never by the distributed
    # block saved with the run: that names the training job's hosts (before any device is touched).
    parallel.maybe_initialize_distributed(ml_collections.ConfigDict(
        {"initialize": "auto", "coordinator_address": "", "num_processes": 0, "process_id": -1}))
    results = evaluate.evaluate_checkpoint(
        flags.workdir, flags.out_dir, checkpoint=checkpoint, split=flags.split,
        subjects=flags.subjects, batch_size=flags.batch_size, teacher=flags.teacher)
    print(f"step {results['step']}: {metrics.summary_line(results['overall'])}")
    if "teacher" in results:
        print(f"teacher: {metrics.summary_line(results['teacher']['overall'])}")
    print(f"({metrics.SUMMARY_LEGEND})")
    print(f"report: {results['out_dir']}/report.md")


def run(args: Sequence[str], prog: str = "eegkd eval") -> None:
    common.quiet_native_logs(args)
    common.run_absl(prog, args, define_flags, main, usage=USAGE, summary=SUMMARY)
