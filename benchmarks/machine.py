"""What every benchmark record says about the machine it ran on. Standard library only, so both the
JAX benchmarks and the PyTorch reference (its own venv) can import it."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): timings on a shared machine mean
    little without it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")
