"""The entry points' re-execution with glibc's huge-page tunable: when it applies, and that the
re-executed command is the same command with the tunable added."""

import os
import pathlib
import subprocess
import sys

import pytest

from eegkd_jax import hugepages

ROOT = pathlib.Path(__file__).resolve().parent.parent
GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, thp, libc, want", [
    ({}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's choice
    ({}, "always", GLIBC, None),    # the kernel gives huge pages anyway
    ({}, "never", GLIBC, None),     # nothing to ask for
    ({}, None, GLIBC, None),        # no such setting (not Linux, a container without /sys)
    ({}, "madvise", ("glibc", "2.34"), None),  # the tunable came with glibc 2.35
    ({}, "madvise", ("glibc", "2.35"), "glibc.malloc.hugetlb=1"),
    ({}, "madvise", ("", ""), None),  # musl and others
    ({"EEGKD_HUGEPAGES": "0"}, "madvise", GLIBC, None),
    ({"EEGKD_HUGEPAGES": "off"}, "madvise", GLIBC, None),
])
def test_when_the_tunable_is_added(environ, thp, libc, want):
    assert hugepages.tunables_with_hugepages(environ, thp, libc) == want


def test_the_kernel_mode_is_the_bracketed_one(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert hugepages.transparent_hugepage_mode(str(setting)) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert hugepages.transparent_hugepage_mode(str(setting)) == "always"
    assert hugepages.transparent_hugepage_mode(str(tmp_path / "missing")) is None


def test_ensure_reexecutes_the_same_command_once(tmp_path):
    if hugepages.tunables_with_hugepages({}, hugepages.transparent_hugepage_mode(),
                                         __import__("platform").libc_ver()) is None:
        pytest.skip("this machine's kernel or C library gives nothing to re-execute for")
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "print('started', flush=True)\n"
        "from eegkd_jax import hugepages\n"
        "hugepages.ensure()\n"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.ENV_VAR)}
    out = subprocess.run([sys.executable, "-u", str(script), "a b", "--flag=1"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["started", "started", "glibc.malloc.hugetlb=1 ['a b', '--flag=1']"]
    env[hugepages.ENV_VAR] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["started", "None []"]
