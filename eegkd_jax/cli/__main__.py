"""``python -m eegkd_jax.cli <command> ...`` = ``eegkd <command> ...``."""
import sys

from eegkd_jax.cli import main

sys.exit(main())
