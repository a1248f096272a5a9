"""``eegkd export``: a trained network as one LiteRT or ONNX file, checked before it is kept
(``export.export_model``); one line per fact on stdout."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--checkpoint=RUN --format=litert|onnx [flags]"
SUMMARY = "export: write a trained network as one LiteRT or ONNX file for on-device scoring"


@functools.cache
def define_flags():
    from absl import flags

    from eegkd_jax.export import FORMATS, QUANTIZATIONS
    from eegkd_jax.predict import NETWORKS

    flags.DEFINE_string("checkpoint", None,
                        "The training run: its workdir or checkpoints directory.",
                        required=True)
    flags.DEFINE_enum("format", None, sorted(FORMATS), "The file format.", required=True)
    flags.DEFINE_string("out", None, "The file to write (default <workdir>/export/...).")
    flags.DEFINE_string("which", "best", 'Which checkpoint: "best", "latest" or a step.')
    flags.DEFINE_enum("network", "model", list(NETWORKS),
                      "model: the run's trained network (the ear student of a KD run); "
                      "teacher: its scalp teacher.")
    flags.DEFINE_integer("epochs_per_input", None,
                         "U-Sleep: epochs per input window (default: the run's sequence "
                         "length).")
    flags.DEFINE_enum("quantize", "none", list(QUANTIZATIONS),
                      "LiteRT only: float16 weights, or int8 weights (dynamic range).")
    flags.DEFINE_float("check_hours", 0.25,
                       "Length of the simulated night the file is checked on.")
    flags.DEFINE_integer("threads", None,
                         "CPU threads of the check's runtime (the latency it reports).")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from eegkd_jax import export, model_card
    from eegkd_jax.data.recording import STAGES

    f = define_flags()
    common.warnings_only()
    export.QUIET_NATIVE = not common.verbose()  # the converters' own log lines with --verbose
    result = export.export_model(
        f.checkpoint, f.format, f.out, which=common.checkpoint_choice(f.which, "which"),
        network=f.network, epochs=f.epochs_per_input, quantize=f.quantize,
        check_hours=f.check_hours, threads=f.threads)
    card, check = result.card, result.check
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB) and its card {result.card_path}")
    print(f"input {card['input']['shape']} float32 ({' '.join(card['input']['derivations'])} at "
          f"{card['input']['sampling_rate_hz']:g} Hz), output {card['output']['shape']} "
          f"probabilities of {' '.join(STAGES)}")
    print(f"check on {check['input']}: largest difference to JAX "
          f"{check['max_abs_difference']:.2g}, stages agree on "
          f"{100 * check['stage_agreement']:.1f}% (kappa {check['kappa_agreement']:.3f}), "
          f"{check['latency_ms_per_epoch']:.2f} ms per epoch")
    if card["model_card"] is None:
        print(f"no model card in {card['checkpoint']['workdir']} (a run from before model cards "
              "were saved)")
    if card["checkpoint"]["data_source"] == "simulated":
        print(model_card.SIMULATED_WARNING, file=sys.stderr)


def run(args: Sequence[str], prog: str = "eegkd export") -> None:
    common.quiet_native_logs(args)
    common.run_absl(prog, args, define_flags, main, usage=USAGE, summary=SUMMARY)
