"""Input-pipeline benchmark: cohort build time and peak memory, then training windows per second.

Prints one JSON object:

  build_seconds          time to simulate, preprocess and write the cohort's TFDS shards
  build_peak_rss_mb      peak resident memory of this process while building (sampled every 50 ms
                         by psutil, and the kernel's ru_maxrss, whichever is larger)
  rss_before_build_mb    resident memory after imports, before building
  windows_per_second     windows delivered to the host by ``train_batches`` (batch 32, L = 1 by
                         default) after a warm-up
  load_average           the machine's 1-minute load average at the start and end (the numbers
                         mean little without it on a shared machine)

Usage:
  python benchmarks/pipeline.py                       # 9 simulated nights of 7.5 h
  python benchmarks/pipeline.py --subjects 3 --hours 1 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eegkd_jax.configs.common import data_config  # noqa: E402
from eegkd_jax.data import pipeline  # noqa: E402


class PeakRss:
    """Samples this process's resident memory in a background thread."""

    def __init__(self, every: float = 0.05):
        self._proc = psutil.Process()
        self._every = every
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=9)
    parser.add_argument("--hours", type=float, default=7.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sequence-length", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20, help="batches before timing")
    parser.add_argument("--steps", type=int, default=200, help="batches timed")
    parser.add_argument("--cache-dir", default="", help="default: a fresh temporary directory")
    args = parser.parse_args(argv)

    cfg = data_config()
    cfg.simulated.subjects = args.subjects
    cfg.simulated.hours = args.hours
    cfg.sequence_length = args.sequence_length
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="eegkd-bench-") as tmp:
        cfg.cache_dir = args.cache_dir or tmp
        rss_before = psutil.Process().memory_info().rss
        start = time.perf_counter()
        with PeakRss() as peak:
            cohort = pipeline.prepare_cohort(cfg)
        build_seconds = time.perf_counter() - start
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        build_peak = max(peak.peak, max_rss)

        splits = pipeline.subject_splits(cohort.subjects, cfg)
        batches = pipeline.train_batches(
            cohort, splits.train, cfg, global_batch_size=args.batch_size, seed=0
        )
        for _ in range(args.warmup):
            next(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            batch = next(batches)
        elapsed = time.perf_counter() - start
        windows_per_second = args.steps * batch["labels"].shape[0] / elapsed

        result = {
            "subjects": args.subjects,
            "hours_per_night": args.hours,
            "epochs_total": int(sum(cohort.num_epochs.values())),
            "built_now": cohort.built_now,
            "build_seconds": round(build_seconds, 2),
            "build_peak_rss_mb": round(build_peak / 2**20, 1),
            "rss_before_build_mb": round(rss_before / 2**20, 1),
            "batch_size": args.batch_size,
            "sequence_length": args.sequence_length,
            "windows_per_second": round(windows_per_second, 1),
            "batches_per_second": round(args.steps / elapsed, 2),
            "cpu_count": os.cpu_count(),
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
