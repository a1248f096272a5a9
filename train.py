"""Train any mode: flags -> config -> ``eegkd_jax.train.loop.train_and_evaluate``.

    python train.py --config=configs/online_kd.py [--workdir=runs/online_kd]
    python train.py --config=configs/supervised.py:scalp --config.optimizer.learning_rate=3e-4

Re-running the same command resumes from the latest checkpoint in the workdir.
"""

import json
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<mode>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<mode>.")
flags.mark_flags_as_required(["config"])


class _QuietOrbax(std_logging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from eegkd_jax import compilation_cache
    from eegkd_jax.train.loop import train_and_evaluate

    compilation_cache.enable()  # a rerun skips the tens of seconds of step compilation

    config = _CONFIG.value
    workdir = _WORKDIR.value or f"runs/{config.mode}"
    logging.info("config:\n%s", config)
    result = train_and_evaluate(config, workdir)
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"final validation ({workdir}): {json.dumps(summary)}")
    if "kappa" in result:
        line = f"validation kappa: {'student' if 'teacher_kappa' in result else 'model'} " \
               f"{result['kappa']:.3f}"
        if "teacher_kappa" in result:
            line += f", teacher {result['teacher_kappa']:.3f}"
        print(line)


if __name__ == "__main__":
    app.run(main)
