"""Scores a trained run on whole held-out subjects and writes its report.

    python eval.py --workdir=runs/kd                       # best checkpoint, test subjects
    python eval.py --workdir=runs/kd --checkpoint=latest --split=validation
    python eval.py --workdir=runs/kd --subjects=sub-008,sub-009 --teacher --out_dir=reports/kd

Writes report.json, report.md, confusion_matrix.png and hypnograms/<subject>.{png,tsv} to
``--out_dir`` (default ``<workdir>/eval/<split>-step<step>``). The data and model come from the
config saved with the restored checkpoint; see ``eegkd_jax.evaluate.evaluate_checkpoint``. A
mistake (a missing workdir, a damaged checkpoint) is reported in one line; --verbose adds the
traceback.
"""

import ml_collections
from absl import app, flags, logging

from eegkd_jax import compilation_cache
from eegkd_jax import errors, evaluate, metrics, parallel

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory of the trained run.", required=True)
flags.DEFINE_string("out_dir", None, "Where to write the report (default under the workdir).")
flags.DEFINE_string("checkpoint", "best", 'Which checkpoint: "best", "latest" or a step number.')
flags.DEFINE_enum("split", "test", list(evaluate.SPLITS), "Which subjects of the run's split.")
flags.DEFINE_list("subjects", None, "Explicit subject ids to evaluate instead of --split.")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: the run's).")
flags.DEFINE_bool("teacher", False, "Also score the scalp teacher held in a KD checkpoint.")


@errors.report_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    compilation_cache.enable()
    checkpoint = FLAGS.checkpoint
    if checkpoint not in ("best", "latest"):
        try:
            checkpoint = int(checkpoint)
        except ValueError:
            raise app.UsageError(
                f'--checkpoint must be "best", "latest" or a step number, got {checkpoint!r}'
            ) from None
    # A multi-host evaluation is started by its launcher's environment, never by the distributed
    # block saved with the run: that names the training job's hosts (before any device is touched).
    parallel.maybe_initialize_distributed(ml_collections.ConfigDict(
        {"initialize": "auto", "coordinator_address": "", "num_processes": 0, "process_id": -1}))
    results = evaluate.evaluate_checkpoint(
        FLAGS.workdir,
        FLAGS.out_dir,
        checkpoint=checkpoint,
        split=FLAGS.split,
        subjects=FLAGS.subjects,
        batch_size=FLAGS.batch_size,
        teacher=FLAGS.teacher,
    )
    print(f"step {results['step']}: {metrics.summary_line(results['overall'])}")
    if "teacher" in results:
        print(f"teacher: {metrics.summary_line(results['teacher']['overall'])}")
    print(f"report: {results['out_dir']}/report.md")


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
