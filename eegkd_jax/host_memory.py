"""How the host's C library hands XLA:CPU its per-step buffers (Linux with glibc).

XLA:CPU allocates each run of a program's temporaries as one block with malloc: 259 MB for the
full U-Sleep train step at batch 32. By default glibc maps a block that large afresh on every
step and frees it with munmap, and the kernel fills each new mapping on first touch: about 63,000
4-KiB page faults per step, and about a quarter of the training process's CPU time in the kernel
(2-core CPU, /usr/bin/time over 30 steps: 3.6 s system against 11.6 s user). Two changes remove
most of that:

- ``glibc.malloc.hugetlb=1`` (glibc >= 2.35, transparent huge pages in "madvise" mode): malloc
  asks for huge pages, so what is still mapped is faulted in 2-MiB pages. The U-Sleep step's
  median time fell in each of 9 alternating pairs of runs, by about 13%.
- ``glibc.malloc.mmap_max=0`` and a trim threshold of 1 TiB, with JAX's CPU programs run inline on
  the calling thread (``jax_cpu_enable_async_dispatch=False``): the block then comes from the
  main thread's heap and is reused by the next step instead of being mapped and zeroed again
  (a worker thread's arena cannot hold it, which is why the inline run matters). On top of huge
  pages the median step fell again in 3 of 3 pairs (0.223/0.265/0.237 -> 0.221/0.199/0.196 s) and
  the system time halved. The cost: freed memory stays with the process for its lifetime, so its
  resident size stays at its peak.

glibc reads its tunables when a process starts, so the entry points call :func:`ensure` first: it
re-executes the same command once with the tunables added to ``GLIBC_TUNABLES`` (a user's own are
kept, and none of ours replaces one the user set), then switches JAX's CPU dispatch to inline if
the heap settings are in effect. It does nothing outside Linux or glibc, or with
``EEGKD_TUNE_MALLOC=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

from eegkd_jax import switched_off

ENV_VAR = "EEGKD_TUNE_MALLOC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGES = ("glibc.malloc.hugetlb", "1")
HEAP_REUSE = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", str(2**40)))


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


def _names(tunables: str) -> set[str]:
    return {item.split("=", 1)[0] for item in tunables.split(":") if item}


def tunables_to_set(environ: Mapping[str, str], thp_mode: str | None,
                    libc: tuple[str, str]) -> str | None:
    """The ``GLIBC_TUNABLES`` value to re-execute with, or None when there is nothing to add.

    ``libc`` is ``platform.libc_ver()``. The heap settings need glibc >= 2.26 (tunables), huge pages
    glibc >= 2.35 and the kernel's "madvise" mode ("always" gives them without asking)."""
    if switched_off(ENV_VAR, environ):
        return None
    name, version = libc
    if name != "glibc" or _version(version) < (2, 26):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    wanted = list(HEAP_REUSE)
    if thp_mode == "madvise" and _version(version) >= (2, 35):
        wanted.insert(0, HUGE_PAGES)
    have = _names(current)
    added = [f"{key}={value}" for key, value in wanted if key not in have]
    if not added:
        return None
    return ":".join(([current] if current else []) + added)


def heap_reuse_in_effect(tunables: str) -> bool:
    """True when ``tunables`` (a GLIBC_TUNABLES value) turn malloc's mmap off, as ours do."""
    return f"{HEAP_REUSE[0][0]}=0" in tunables.split(":")


def ensure() -> None:
    """Re-executes this process's command with the malloc tunables when they are missing (see the
    module's docstring), then runs JAX's CPU programs inline if the heap settings are in effect.

    Call it first thing in a ``__main__`` block: whatever ran before it runs again. The dispatch
    setting must precede JAX's backend start (it is read when the CPU client is created)."""
    if not sys.platform.startswith("linux"):
        return
    value = tunables_to_set(os.environ, transparent_hugepage_mode(), platform.libc_ver())
    if value is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=value))
        except OSError:
            return  # e.g. an interpreter path that cannot be executed again: run as it is
    if heap_reuse_in_effect(os.environ.get("GLIBC_TUNABLES", "")) and not switched_off(ENV_VAR):
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
