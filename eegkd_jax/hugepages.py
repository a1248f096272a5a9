"""Transparent huge pages for XLA:CPU's per-step buffers (Linux with glibc >= 2.35).

XLA:CPU allocates each run of a program's temporaries as one block with malloc: 259 MB for the
full U-Sleep train step at batch 32. glibc serves a block that large with a fresh mmap every step,
and the kernel fills it with 4-KiB pages on first touch: about 63,000 page faults per step, and
about a quarter of the training process's CPU time spent in the kernel (2-core CPU, /usr/bin/time
over 30 steps: 3.6 s system against 11.6 s user). glibc's ``glibc.malloc.hugetlb=1`` tunable makes
malloc ask for transparent huge pages (``madvise``) on such blocks, so the kernel maps them in
2-MiB pages: the U-Sleep step's median time fell in each of 9 alternating pairs of runs, by about
13% overall (README, Performance).

glibc reads its tunables when a process starts, so the entry points call :func:`ensure` first: it
re-executes the same command once with the tunable added to ``GLIBC_TUNABLES``. It does nothing
where it cannot help: outside Linux, with another C library or glibc < 2.35, when the kernel's
transparent huge pages are "never" (nothing to ask for) or "always" (the kernel already uses them),
when the tunable is already set, or with ``EEGKD_HUGEPAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

ENV_VAR = "EEGKD_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_OFF = ("0", "off", "false", "no")


def transparent_hugepage_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's selected mode ("always", "madvise" or "never"), None where it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def tunables_with_hugepages(environ: Mapping[str, str], thp_mode: str | None,
                            libc: tuple[str, str]) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None when there is nothing to do.

    ``libc`` is ``platform.libc_ver()``; a user's own tunables are kept."""
    if environ.get(ENV_VAR, "").strip().lower() in _OFF:
        return None
    if thp_mode != "madvise":
        return None
    name, version = libc
    if name != "glibc" or _version(version) < (2, 35):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def ensure() -> None:
    """Re-executes this process's command with huge pages for malloc when that helps (see the
    module's docstring); returns at once when they are set already or cannot help.

    Call it first thing in a ``__main__`` block: whatever ran before it runs again."""
    if not sys.platform.startswith("linux"):
        return
    value = tunables_with_hugepages(os.environ, transparent_hugepage_mode(), platform.libc_ver())
    if value is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=value))
    except OSError:
        return  # e.g. an interpreter path that cannot be executed again: run without them
