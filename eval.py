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

import sys

from eegkd_jax.cli import eval as command

if __name__ == "__main__":
    command.run(sys.argv[1:], prog="eval.py")  # the same command as `eegkd eval`
