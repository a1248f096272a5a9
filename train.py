"""Train any mode: flags -> config -> ``eegkd_jax.train.loop.train_and_evaluate``.

    python train.py --config=configs/online_kd.py [--workdir=runs/online_kd]
    python train.py --config=configs/supervised.py:scalp --config.optimizer.learning_rate=3e-4

Re-running the same command resumes from the latest intact checkpoint in the workdir; a rerun with
other model, data or mode settings is refused, naming the fields. A mistake (a misspelt config
field, a bad variant, a busy workdir, a full disk) is reported in one line; --verbose adds the
traceback.
"""

import json
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from eegkd_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<mode>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<mode>.")
flags.mark_flags_as_required(["config"])


class _QuietOrbax(std_logging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


@errors.report_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = errors.config_value(_CONFIG)  # before the slow imports below
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from eegkd_jax import compilation_cache
    from eegkd_jax.train.loop import train_and_evaluate

    compilation_cache.enable()  # a rerun skips the tens of seconds of step compilation

    workdir = _WORKDIR.value or f"runs/{config.mode}"
    logging.info("config:\n%s", config)
    result = train_and_evaluate(config, workdir)
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"final validation ({workdir}): {json.dumps(summary)}")
    if "kappa" in result:
        print(_kappa_line(config, result))


def _kappa_line(config, result) -> str:
    """The validation kappas with the classical floor of the same signal beside each."""
    from eegkd_jax.baseline import validation_floors
    from eegkd_jax.train.steps import student_input

    floors = validation_floors(config.data)
    signal = student_input(config)
    parts = [f"{'student' if 'teacher_kappa' in result else 'model'} ({signal}) "
             f"{result['kappa']:.3f} (floor {floors.get(signal, float('nan')):.3f})"]
    if "teacher_kappa" in result:
        parts.append(f"teacher (scalp) {result['teacher_kappa']:.3f} "
                     f"(floor {floors.get('scalp', float('nan')):.3f})")
    return ("validation kappa: " + ", ".join(parts)
            + "; floor = band powers + logistic regression on the same split")


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
