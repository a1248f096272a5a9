"""``eegkd study``: the leave-one-subject-out study of every method, resumable
(``study.run_study``), or ``--combine``: finished studies tabulated as one
(``study.combine_studies``)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--workdir=DIR [--reduced] [--config=CONFIG] [--config.FIELD=VALUE ...]"
SUMMARY = "study: the paper's leave-one-subject-out comparison of all methods, resumable"
LOSO_CONFIG = common.PACKAGED_CONFIGS / "loso.py"


@functools.cache
def define_flags():
    """Defines the flags once (not at import); returns the ``--config`` holder."""
    from absl import flags
    from ml_collections import config_flags

    holder = config_flags.DEFINE_config_file(
        "config", str(LOSO_CONFIG), "Study config (configs/loso.py[:variant]).",
        lock_config=True)
    flags.DEFINE_string("workdir", "runs/loso", "The study's directory (resumable).")
    flags.DEFINE_list("combine", None,
                      "Study workdirs to tabulate as one study in --workdir, each with its own "
                      "config (e.g. the folds run on different machines); trains nothing.")
    flags.DEFINE_string("data_path", None,
                        "An EESM17 BIDS root: sets data.path (and data.source=eesm17 unless "
                        "the config names another on-disk source).")
    return holder


def expand_reduced(argv: Sequence[str]) -> list[str]:
    """``--reduced`` -> ``--config=<package>/configs/loso.py:reduced``. Done on the arguments
    before the flags are defined, because config_flags reads its ``--config.*`` overrides then."""
    from absl import app

    argv = list(argv)
    if "--reduced" not in argv:
        return argv
    argv.remove("--reduced")
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        raise app.UsageError("--reduced selects configs/loso.py:reduced; with --config, add "
                             "':reduced' to it instead")
    return [argv[0], f"--config={LOSO_CONFIG}:reduced", *argv[1:]]


def main(argv: Sequence[str]) -> None:
    from absl import app, flags, logging

    from eegkd_jax import compilation_cache, study

    logging.set_verbosity(logging.INFO)
    config = common.config_value(define_flags())
    data_path = flags.FLAGS.data_path
    if data_path:
        config.data.path = data_path
        if config.data.source == "simulated":
            config.data.source = "eesm17"
    if flags.FLAGS.combine:
        if flags.FLAGS["config"].present or data_path:
            raise app.UsageError("--combine tabulates finished studies with their own configs; "
                                 "drop --config, --reduced and --data_path")
        result = study.combine_studies(flags.FLAGS.combine, flags.FLAGS.workdir)
        print(result["files"]["results.md"].read_text())
        return
    # Every fold compiles the same programs (same shapes, same networks): with the persistent
    # cache only the first fold pays for compiling, which dominates short runs.
    compilation_cache.enable()
    started = time.time()
    # One line per run (skipped, resumed from a step, or fresh) above its progress bar.
    result = study.run_study(config, flags.FLAGS.workdir,
                             announce=lambda line: print(line, flush=True))
    print(result["files"]["results.md"].read_text())
    print(f"study finished in {time.time() - started:.0f} s: {result['files']['results.md']}")


def run(args: Sequence[str], prog: str = "eegkd study") -> None:
    argv = expand_reduced([prog, *common.resolve_config(args)])
    common.run_absl(prog, argv[1:], define_flags, main, usage=USAGE, summary=SUMMARY)
