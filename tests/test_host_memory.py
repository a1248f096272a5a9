"""The entry points' re-execution with glibc's malloc tunables: when they apply, that a user's own
tunables are kept, and that the re-executed command is the same command with them added."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from eegkd_jax import host_memory

ROOT = pathlib.Path(__file__).resolve().parent.parent
GLIBC = ("glibc", "2.36")
HEAP = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2**40}"


@pytest.mark.parametrize("environ, thp, libc, want", [
    ({}, "madvise", GLIBC, f"glibc.malloc.hugetlb=1:{HEAP}"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:{HEAP}"),
    # a tunable the user set is theirs: ours only fills in the others
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC,
     f"glibc.malloc.hugetlb=0:{HEAP}"),
    ({"GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{HEAP}"}, "madvise", GLIBC, None),
    ({}, "always", GLIBC, HEAP),     # the kernel gives huge pages without being asked
    ({}, "never", GLIBC, HEAP),
    ({}, None, GLIBC, HEAP),         # no THP setting to read (a container without /sys)
    ({}, "madvise", ("glibc", "2.34"), HEAP),  # the huge-page tunable came with glibc 2.35
    ({}, "madvise", ("glibc", "2.35"), f"glibc.malloc.hugetlb=1:{HEAP}"),
    ({}, "madvise", ("glibc", "2.25"), None),  # no tunables at all
    ({}, "madvise", ("", ""), None),           # musl and others
    ({"EEGKD_TUNE_MALLOC": "0"}, "madvise", GLIBC, None),
    ({"EEGKD_TUNE_MALLOC": "off"}, "madvise", GLIBC, None),
])
def test_which_tunables_are_added(environ, thp, libc, want):
    assert host_memory.tunables_to_set(environ, thp, libc) == want


def test_heap_reuse_is_recognised_only_when_mmap_is_off():
    assert host_memory.heap_reuse_in_effect(f"glibc.malloc.hugetlb=1:{HEAP}")
    assert not host_memory.heap_reuse_in_effect("glibc.malloc.mmap_max=10")
    assert not host_memory.heap_reuse_in_effect("")


def test_the_kernel_mode_is_the_bracketed_one(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert host_memory.transparent_hugepage_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert host_memory.transparent_hugepage_mode(str(setting)) == "always"
    assert host_memory.transparent_hugepage_mode(str(tmp_path / "missing")) is None


def test_ensure_reexecutes_the_same_command_once_and_runs_cpu_programs_inline(tmp_path):
    if host_memory.tunables_to_set({}, host_memory.transparent_hugepage_mode(),
                                   platform.libc_ver()) is None:
        pytest.skip("this machine's C library has no tunables to re-execute for")
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "print('started', flush=True)\n"
        "from eegkd_jax import host_memory\n"
        "host_memory.ensure()\n"
        "import jax\n"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:],\n"
        "      jax.config.read('jax_cpu_enable_async_dispatch'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV_VAR)}
    out = subprocess.run([sys.executable, "-u", str(script), "a b", "--flag=1"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    want = host_memory.tunables_to_set({}, host_memory.transparent_hugepage_mode(),
                                       platform.libc_ver())
    assert out == ["started", "started", f"{want} ['a b', '--flag=1'] False"]
    env[host_memory.ENV_VAR] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["started", "None [] True"]
