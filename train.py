"""Train any mode: flags -> config -> ``eegkd_jax.train.loop.train_and_evaluate``.

    python train.py --config=configs/online_kd.py [--workdir=runs/online_kd]
    python train.py --config=configs/supervised.py:scalp --config.optimizer.learning_rate=3e-4

Re-running the same command resumes from the latest intact checkpoint in the workdir; a rerun with
other model, data or mode settings is refused, naming the fields. A mistake (a misspelt config
field, a bad variant, a busy workdir, a full disk) is reported in one line; --verbose adds the
traceback.
"""

import sys

from eegkd_jax.cli import train as command

if __name__ == "__main__":
    command.run(sys.argv[1:], prog="train.py")  # the same command as `eegkd train`
