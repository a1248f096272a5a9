"""``eegkd train`` (and ``python train.py``): flags -> config -> ``train_and_evaluate``; prints the
final validation scores beside the classical floor. Re-running the same command resumes from the
latest intact checkpoint."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--config=CONFIG[:variant] [--workdir=DIR] [--config.FIELD=VALUE ...]"
SUMMARY = "train: train a mode (supervised, offline KD, online KD, transfer) from a config"


@functools.cache
def define_flags():
    """``--config`` (a config file and its ``--config.*`` overrides) and ``--workdir``; defined
    once, not at import, so that importing the package leaves absl's flag registry alone."""
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/<mode>.py[:variant]).", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Run directory; default runs/<mode>.")
    flags.mark_flags_as_required(["config"])
    return (config, workdir)


def main(argv: Sequence[str]) -> None:
    from absl import logging

    config_flag, workdir_flag = define_flags()
    config = common.config_value(config_flag)  # before the slow imports below
    from eegkd_jax.train import settings

    settings.check_config(config)  # (train_and_evaluate checks too) before train.log is written
    common.quiet_orbax()
    from eegkd_jax import compilation_cache
    from eegkd_jax.train.loop import train_and_evaluate

    compilation_cache.enable()  # a rerun skips the tens of seconds of step compilation
    workdir = workdir_flag.value or f"runs/{config.mode}"
    log = common.log_to_file(workdir, "train")
    if log:
        print(f"{config.mode} in {workdir} (log: {log}; --verbose shows it here)")
    logging.info("config:\n%s", config)
    # The one line a run prints before its progress bar: where it resumed from, or that it
    # starts fresh (the rest of the log goes to train.log).
    result = train_and_evaluate(config, workdir, announce=lambda line: print(line, flush=True))
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    print(f"validation at the last step ({workdir}): {json.dumps(summary)}")
    best = best_validation(workdir)
    if best is not None and "kappa" in best:
        print(kappa_line(config, best, best=True))
    elif "kappa" in result:
        print(kappa_line(config, result, best=False))


def best_validation(workdir) -> dict | None:
    """{"step", "kappa", ...} of the checkpoint that eval, predict and export restore by default
    (the best validation kappa), as the run's model card records it; None without a card or
    validation."""
    from eegkd_jax import model_card

    card = model_card.load(workdir)
    metrics = card["metrics"] if card else {}
    if not metrics.get("validation") or metrics.get("step") is None:
        return None
    return {"step": int(metrics["step"]), **metrics["validation"]}


def kappa_line(config, result, *, best: bool = True) -> str:
    """The validation kappas with the classical floor of the same signal beside each, and the
    step they belong to: the best checkpoint (what the other commands use) where ``best``."""
    from eegkd_jax.baseline import validation_floors
    from eegkd_jax.configs import student_input

    floors = validation_floors(config.data)
    signal = student_input(config)
    parts = [f"{'student' if 'teacher_kappa' in result else 'model'} ({signal}) "
             f"{result['kappa']:.3f} (floor {floors.get(signal, float('nan')):.3f})"]
    if "teacher_kappa" in result:
        parts.append(f"teacher (scalp) {result['teacher_kappa']:.3f} "
                     f"(floor {floors.get('scalp', float('nan')):.3f})")
    where = (f" at step {result['step']}, the best checkpoint (eval, predict and export use it)"
             if best else f" at the last step, {result['step']}")
    return ("validation kappa: " + ", ".join(parts) + where
            + "; floor = band powers + logistic regression on the same split")


def run(args: Sequence[str], prog: str = "eegkd train") -> None:
    common.quiet_native_logs(args)
    common.run_absl(prog, common.resolve_config(args), define_flags, main, usage=USAGE,
                    summary=SUMMARY)
