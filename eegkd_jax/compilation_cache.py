"""JAX's persistent compilation cache for the entry points, in a folder only its owner can write.

Compiling a full-size training step takes tens of seconds on a CPU; a later process that builds the
same program (same shapes, model, jax version and devices) reads the executable from this folder
instead. JAX keys entries on the lowered program, so a changed model simply misses.

Where it lives: ``EEGKD_COMPILATION_CACHE`` (a folder, or "off"), else
``$XDG_CACHE_HOME/eegkd_jax/xla`` (``~/.cache/eegkd_jax/xla``). A directory JAX was already given
(``JAX_COMPILATION_CACHE_DIR``) is left alone.
"""

from __future__ import annotations

import os
import pathlib
import stat

from absl import logging

ENV_VAR = "EEGKD_COMPILATION_CACHE"
_OFF = ("", "off", "0", "false", "none")


def default_directory() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "eegkd_jax" / "xla"


def _owner_only(path: pathlib.Path) -> str | None:
    """Why ``path`` is not a folder that only this user can write, or None if it is."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory (or a symbolic link)"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}, not by this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.filemode(info.st_mode)})"
    return None


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns the cache on (before the first compile) and returns its folder, or None when off.

    The folder is created with mode 0700; an existing one that someone else owns or can write is
    refused with a warning, since whoever can write there chooses the programs this user runs.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    setting = os.environ.get(ENV_VAR)
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    path = pathlib.Path(setting or directory or default_directory()).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = _owner_only(path)
    except OSError as err:
        problem = str(err)
    if problem:
        logging.warning("compilation cache off: %s is %s", path, problem)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Programs that compile in under a second are cheaper to rebuild than to read back.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
