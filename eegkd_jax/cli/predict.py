"""``eegkd predict``: stage a new recording with a trained run (``predict.predict_recording``);
writes the hypnogram (TSV), a figure and a JSON of the probabilities, prints the model card."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

from eegkd_jax.cli import common

USAGE = "--checkpoint=RUN [flags] RECORDING"
SUMMARY = "predict: stage a new recording (EDF/EDF+, EESM17 .set) with a trained run"


@functools.cache
def define_flags():
    """Defines the flags (once, not at import) and returns absl's FLAGS."""
    from absl import flags

    from eegkd_jax.predict import NETWORKS

    flags.DEFINE_string("checkpoint", None,
                        "Training run: its workdir or checkpoints directory.", required=True)
    flags.DEFINE_string("which", "best", 'Which checkpoint: "best", "latest" or a step.')
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/predictions/<name>).")
    flags.DEFINE_enum("network", "model", list(NETWORKS),
                      "model: the run's trained network; teacher: the scalp teacher of a KD "
                      "run.")
    flags.DEFINE_string("hypnogram", "auto",
                        'EDF only: "auto" (the paired *-Hypnogram.edf if any), "none", or a '
                        "path.")
    flags.DEFINE_integer("batch_size", None, "Sequences per batch when a night is split.")
    flags.DEFINE_integer("max_sequence_epochs", 0,
                         "U-Sleep: 0 stages the whole night at once; n > 0 in n-epoch pieces.")
    flags.DEFINE_string("channel_map", None,
                        "Which recording channels stand for which model input: "
                        "'A1-A2=M1-M2,C3-O1=EEG C3-A2' (a channel label, 'A - B' of two "
                        "labels, or electrodes X-Y), or a file with one DERIVATION=CHANNELS "
                        "per line.")
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    """``argv[1]`` is the recording."""
    from eegkd_jax import compilation_cache, metrics, model_card, predict

    flag_values = define_flags()
    which = common.checkpoint_choice(flag_values.which, "which")
    hypnogram = flag_values.hypnogram
    hypnogram = {"auto": "auto", "none": None}.get(hypnogram.lower(), hypnogram)
    common.warnings_only()
    compilation_cache.enable()
    result = predict.predict_recording(
        flag_values.checkpoint, argv[1], flag_values.out, which=which,
        network=flag_values.network, hypnogram=hypnogram, batch_size=flag_values.batch_size,
        max_sequence_epochs=flag_values.max_sequence_epochs, channel_map=flag_values.channel_map)
    line = f"{result['name']}: {result['epochs']} epochs staged (step {result['step']})"
    if result["metrics"] is not None:
        line += f"; against the scoring: {metrics.summary_line(result['metrics'])}"
    print(line)
    print(f"hypnogram: {result['tsv']}\nfigure: {result['png']}")
    print("\n".join(predict.card_lines(result)))
    warning = predict.repeat_warning(result["repeated_inputs"])
    if warning:
        print(warning, file=sys.stderr)
    if result["trained_on_real_recordings"] is False:
        print(model_card.SIMULATED_WARNING, file=sys.stderr)


def run(args: Sequence[str], prog: str = "eegkd predict") -> None:
    common.quiet_native_logs(args)
    common.run_absl(prog, args, define_flags, main, usage=USAGE, summary=SUMMARY,
                    positional="recording (EDF, .set or BIDS subject directory)")
