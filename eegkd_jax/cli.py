"""The ``eegkd`` command: one entry point for every tool of the package.

    eegkd train --config=configs/online_kd.py --workdir=runs/online_kd
    eegkd eval --workdir=runs/online_kd
    eegkd predict --checkpoint=runs/online_kd night.edf
    eegkd study --workdir=runs/loso --reduced
    eegkd inspect night.edf
    eegkd export --checkpoint runs/online_kd --format litert

``eegkd <command> --help`` lists a command's options. train, eval, predict and study take absl
flags (``--name=value``, and ``--config.field=value`` overrides for train and study); inspect and
export take ordinary options. ``python train.py`` and ``python eval.py`` run the same code as
``eegkd train`` and ``eegkd eval``.

``--config`` takes a config file, or the name of one shipped inside the package
(``--config=online_kd:tiny``), so that an installed ``eegkd`` works
from any directory.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, str] = {
    "train": "train a mode (supervised, offline KD, online KD, transfer) from a config",
    "eval": "score a trained run on its held-out subjects: report.json, report.md, figures",
    "predict": "stage a new recording (EDF/EDF+, EESM17 .set) with a trained run",
    "study": "the paper's leave-one-subject-out comparison of all methods, resumable",
    "inspect": "look at a recording or cohort: channels, rates, duration, stages (JSON)",
    "export": "write a trained network as one LiteRT or ONNX file for on-device scoring",
}
# What follows the command name in each absl command's usage line.
USAGE: dict[str, str] = {
    "train": "--config=CONFIG[:variant] [--workdir=DIR] [--config.FIELD=VALUE ...]",
    "eval": "--workdir=DIR [flags]",
    "predict": "--checkpoint=RUN [flags] RECORDING",
    "study": "--workdir=DIR [--reduced] [--config=CONFIG] [--config.FIELD=VALUE ...]",
}
HELP_ARGS = frozenset({"-h", "-help", "--help", "--helpshort", "--helpfull", "-?"})
PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: eegkd <command> [options]   (eegkd <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def resolve_config(args: Sequence[str]) -> list[str]:
    """``--config=NAME[:variant]`` -> the packaged ``eegkd_jax/configs/NAME.py`` when NAME is no
    file here but the package ships that config; every other argument as it is."""
    out = []
    for arg in args:
        if arg.startswith("--config="):
            value = arg.removeprefix("--config=")
            path, colon, variant = value.partition(":")
            packaged = PACKAGED_CONFIGS / f"{path.removesuffix('.py')}.py"
            if not os.path.exists(path) and os.sep not in path and packaged.is_file():
                arg = f"--config={packaged}{colon}{variant}"
        out.append(arg)
    return out


def _run_absl(prog: str, args: Sequence[str], define: Callable[[], object],
              main: Callable[[list[str]], None]) -> None:
    """Runs an absl main under the name ``prog``, a user's mistake reported in one line
    (``errors``). ml_collections' config flags read their ``--config.*`` overrides from sys.argv
    when they are defined, so sys.argv is set first."""
    from absl import app, flags

    from eegkd_jax import errors

    sys.argv = [prog, *args]
    before = set(flags.FLAGS)
    try:
        define()  # a config flag parses its file and overrides already
    except Exception as error:  # noqa: BLE001 - config_flags raises anything the file raises
        errors.exit_on_flag_error(error, sys.argv)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, errors.VERBOSE_HELP)
    # The command's flags are its own (absl's help lists the key flags of the module argv[0] names).
    for name in sorted(set(flags.FLAGS) - before):
        flags.FLAGS.register_key_flag_for_module(prog, flags.FLAGS[name])
    if help_requested(args):
        print(command_help(prog))
        raise SystemExit(0)
    app.run(errors.report_errors(main), argv=list(sys.argv), flags_parser=errors.parse_flags)


def help_requested(args: Sequence[str]) -> bool:
    """Whether ``args`` ask for help (before a "--" that ends the options)."""
    args = list(args)
    options = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_ARGS for a in options)


def command_help(prog: str) -> str:
    """The help of an absl command: its usage, what it does, and its own flags (not absl's, and
    not the ``eegkd`` overview that absl would print as the main module's docstring)."""
    from absl import flags

    name = prog.split()[-1].removesuffix(".py")
    lines = [f"usage: {prog} {USAGE.get(name, '[flags]')}", ""]
    if name in COMMANDS:
        lines += [f"{name}: {COMMANDS[name]}", ""]
    lines.append("flags:")
    for flag in sorted(flags.FLAGS.get_key_flags_for_module(prog), key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        text = " ".join(str(flag.help).split())
        lines.append(f"  --{flag.name}: {text}{default}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# train


_TRAIN_FLAGS = None


def define_train_flags():
    """``--config`` (a config file and its ``--config.*`` overrides) and ``--workdir``; defined
    once, not at import, so that importing the package leaves absl's flag registry alone."""
    global _TRAIN_FLAGS
    if _TRAIN_FLAGS is None:
        from absl import flags
        from ml_collections import config_flags

        config = config_flags.DEFINE_config_file(
            "config", None, "Config file (configs/<mode>.py[:variant]).", lock_config=True)
        workdir = flags.DEFINE_string("workdir", None, "Run directory; default runs/<mode>.")
        flags.mark_flags_as_required(["config"])
        _TRAIN_FLAGS = (config, workdir)
    return _TRAIN_FLAGS


class _QuietOrbax(std_logging.Filter):
    """Orbax logs a dozen INFO lines per checkpoint; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


class _OnlyOurWarnings(std_logging.Filter):
    """For the screen: warnings and errors, except TFDS's notices that our cohort config is a
    custom one (it always is) and that a cohort not yet built has no dataset_info.json."""

    _NOTICES = ("Using custom data configuration", "has no dataset_info.json")

    def filter(self, record):
        return (record.levelno >= std_logging.WARNING
                and not any(n in record.getMessage() for n in self._NOTICES))


def log_to_file(workdir, name: str) -> pathlib.Path | None:
    """Unless ``--verbose``: every log record (the config, our INFO lines, TFDS's and orbax's) goes
    to ``<workdir>/<name>.log`` and the screen keeps the warnings, the progress bars and the
    summary. Returns the log file (None with ``--verbose``)."""
    from absl import logging

    from eegkd_jax import errors

    if errors.verbose():
        return None
    path = pathlib.Path(workdir) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = std_logging.FileHandler(path)
    to_file.setFormatter(logging.PythonFormatter())
    std_logging.getLogger().addHandler(to_file)
    logging.get_absl_handler().addFilter(_OnlyOurWarnings())
    return path


def quiet_native_logs(args: Sequence[str]) -> None:
    """Unless ``--verbose`` is among ``args``: TensorFlow's C++ notices off (set before TensorFlow
    is imported)."""
    from eegkd_jax import errors

    if not errors.verbose(list(args)):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # TensorFlow only reads data here, so its oneDNN math kernels (and their notice) are unused.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def train_main(argv: Sequence[str]) -> None:
    """absl main of ``eegkd train``: flags -> config -> ``train_and_evaluate``; prints the final
    validation scores beside the classical floor. Re-running the same command resumes from the
    latest intact checkpoint."""
    from absl import app, logging

    from eegkd_jax import errors

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    config_flag, workdir_flag = define_train_flags()
    config = errors.config_value(config_flag)  # before the slow imports below
    from eegkd_jax.train import settings

    settings.check_config(config)  # (train_and_evaluate checks too) before train.log is written
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from eegkd_jax import compilation_cache
    from eegkd_jax.train.loop import train_and_evaluate

    compilation_cache.enable()  # a rerun skips the tens of seconds of step compilation
    workdir = workdir_flag.value or f"runs/{config.mode}"
    log = log_to_file(workdir, "train")
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
    from eegkd_jax.train.steps import student_input

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


def train(args: Sequence[str], prog: str = "eegkd train") -> None:
    quiet_native_logs(args)
    _run_absl(prog, resolve_config(args), define_train_flags, train_main)


# --------------------------------------------------------------------------------------------------
# eval


_EVAL_FLAGS = None


def define_eval_flags():
    """The flags of ``eegkd eval`` (defined once, not at import)."""
    global _EVAL_FLAGS
    if _EVAL_FLAGS is None:
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
        _EVAL_FLAGS = flags.FLAGS
    return _EVAL_FLAGS


def eval_main(argv: Sequence[str]) -> None:
    """absl main of ``eegkd eval``: scores the run's checkpoint on whole held-out subjects and
    writes report.json, report.md, confusion_matrix.png and hypnograms/ (see
    ``evaluate.evaluate_checkpoint``)."""
    import ml_collections
    from absl import app, logging

    from eegkd_jax import compilation_cache, evaluate, metrics, parallel

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
    flags = define_eval_flags()
    logging.set_verbosity(logging.INFO)
    if pathlib.Path(flags.workdir).is_dir():  # a missing one is reported below, in one line
        log_to_file(flags.workdir, "eval")
    compilation_cache.enable()
    checkpoint = flags.checkpoint
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
        flags.workdir, flags.out_dir, checkpoint=checkpoint, split=flags.split,
        subjects=flags.subjects, batch_size=flags.batch_size, teacher=flags.teacher)
    print(f"step {results['step']}: {metrics.summary_line(results['overall'])}")
    if "teacher" in results:
        print(f"teacher: {metrics.summary_line(results['teacher']['overall'])}")
    print(f"({metrics.SUMMARY_LEGEND})")
    print(f"report: {results['out_dir']}/report.md")


def evaluate(args: Sequence[str], prog: str = "eegkd eval") -> None:
    quiet_native_logs(args)
    _run_absl(prog, args, define_eval_flags, eval_main)


# --------------------------------------------------------------------------------------------------
# predict, study, inspect, export


def predict(args: Sequence[str], prog: str = "eegkd predict") -> None:
    quiet_native_logs(args)
    from eegkd_jax import predict as predict_lib

    _run_absl(prog, args, predict_lib.define_flags, predict_lib.main)


def study(args: Sequence[str], prog: str = "eegkd study") -> None:
    from eegkd_jax import study as study_lib

    argv = study_lib.expand_reduced([prog, *resolve_config(args)])
    _run_absl(prog, argv[1:], study_lib.define_flags, study_lib.main)


def inspect(args: Sequence[str], prog: str = "eegkd inspect") -> int:
    from eegkd_jax.data import inspect as inspect_lib

    return inspect_lib.main(list(args), prog=prog)


def export(args: Sequence[str], prog: str = "eegkd export") -> int:
    quiet_native_logs(args)
    from eegkd_jax import export as export_lib

    return export_lib.main(list(args), prog=prog)


RUNNERS: dict[str, Callable[..., int | None]] = {
    "train": train, "eval": evaluate, "predict": predict, "study": study, "inspect": inspect,
    "export": export,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``eegkd <command> [options]``; returns the exit status (absl commands exit themselves)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in RUNNERS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    status = RUNNERS[command](rest)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
