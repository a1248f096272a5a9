"""JAX's persistent compilation cache, on by default for the entry points.

Compiling the full-size U-Sleep training step takes tens of seconds on a CPU, longer than many
short runs train; every later process that builds the same program (same shapes, same network,
same jax/XLA version, same devices) can read the compiled executable from disk instead. JAX keys
the cache on the lowered program and the compile options, so a stale entry cannot be used for a
changed model: a changed program simply misses.

Where the cache lives, first match wins:

1. a directory JAX was already given (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``): left alone;
2. ``EEGKD_COMPILATION_CACHE`` in the environment: a directory, or "" / "off" to turn it off;
3. the ``directory`` argument;
4. ``$XDG_CACHE_HOME/eegkd_jax/xla`` (``~/.cache/eegkd_jax/xla``).
"""

from __future__ import annotations

import os
import pathlib

from absl import logging

ENV_VAR = "EEGKD_COMPILATION_CACHE"
_OFF = ("", "off", "0", "false", "none")


def default_directory() -> pathlib.Path:
    """``$XDG_CACHE_HOME/eegkd_jax/xla``, or ``~/.cache/eegkd_jax/xla`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "eegkd_jax" / "xla"


def enable(directory: str | os.PathLike | None = None, *,
           min_compile_seconds: float = 1.0) -> pathlib.Path | None:
    """Turns on the persistent compilation cache; returns its directory (None when off).

    Call it before the first jit compiles (jax.config changes are read at compile time). Programs
    that compiled in under ``min_compile_seconds`` are not written: they are cheaper to rebuild
    than to read, and skipping them keeps the directory to the few large steps.
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return pathlib.Path(configured)
    setting = os.environ.get(ENV_VAR)
    if setting is not None:
        if setting.strip().lower() in _OFF:
            return None
        path = pathlib.Path(setting).expanduser()
    elif directory is not None:
        path = pathlib.Path(directory).expanduser()
    else:
        path = default_directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        # A read-only home must not stop a run: it only costs the compile time.
        logging.warning("compilation cache off: cannot create %s (%s)", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    # Entries of any size: the executables we care about are megabytes anyway.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("persistent compilation cache in %s", path)
    return path


# XLA options for programs that run once, such as creating the training state: random parameter
# draws and zeros, no hot loop, so optimising the machine code buys nothing at run time. The
# online-KD state (two depth-8 U-Sleeps, two Adam states) measured 23.1 s -> 5.9 s to compile on
# the 2-core CPU (load ~2); its run time stayed at 0.02-0.03 s. The random bits are integer threefry
# arithmetic and identical; a uniform draw scaled to [min, max) can differ in the last bit (the
# optimised build fuses the multiply-add), so a run must create its state the same way every time
# for bit-identical restarts, and does if it always goes through here.
RUN_ONCE_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


class RunOnce:
    """``fn(*args)`` traced once under ``jax.jit(fn, **jit_kwargs)``: :attr:`abstract` is the shape,
    dtype and sharding of its result (what ``jax.eval_shape`` would give, without tracing a second
    time), and calling the object compiles it with :data:`RUN_ONCE_COMPILER_OPTIONS` and runs it.

    For functions run once per process, such as creating the training state, whose result's shapes
    are needed first (to restore a checkpoint into, or to compile the train step from).
    """

    def __init__(self, fn, *args, **jit_kwargs):
        import jax

        self._args = args
        self._traced = jax.jit(fn, **jit_kwargs).trace(*args)
        self.abstract = self._traced.out_info

    def __call__(self):
        compiled = self._traced.lower().compile(compiler_options=RUN_ONCE_COMPILER_OPTIONS)
        return compiled(*self._args)


def run_once(fn, *args, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)(*args)``, compiled with :data:`RUN_ONCE_COMPILER_OPTIONS`.

    For functions called once per process (state initialisation); ``jit_kwargs`` such as
    ``out_shardings`` pass through to ``jax.jit``.
    """
    return RunOnce(fn, *args, **jit_kwargs)()


class AheadOfTime:
    """A jitted function compiled in a background thread for given abstract arguments.

    Start-up of a run is two compilations back to back: the state initialisation and the train
    step. The step's inputs are known as shapes before the state exists (:attr:`RunOnce.abstract`
    of the initialiser), so its compilation can start first and run beside the initialisation, the data
    pipeline's start and (on a resume) the checkpoint restore. XLA compiles outside the GIL, so on a
    multi-core host the two compilations overlap.

    Calling the object waits for the compilation and runs the compiled executable. The arguments
    must have the abstract shapes, dtypes and shardings it was compiled for; if they do not (a
    bug), it warns and falls back to the jitted function, which compiles again for what it got.
    """

    def __init__(self, jitted, *abstract_args, name: str = "step"):
        import concurrent.futures

        self._jitted = jitted
        self._name = name
        self._compiled = None
        self._fallback = False
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"compile-{name}")
        self._future = executor.submit(lambda: jitted.lower(*abstract_args).compile())
        executor.shutdown(wait=False)

    def compiled(self):
        """Waits for and returns the ``jax.stages.Compiled`` (re-raises a compilation error)."""
        if self._compiled is None:
            self._compiled = self._future.result()
        return self._compiled

    def __call__(self, *args):
        if self._fallback:
            return self._jitted(*args)
        compiled = self.compiled()
        try:
            return compiled(*args)
        except TypeError as err:
            # Raised while checking the arguments, before anything runs or is donated.
            import warnings

            warnings.warn(f"the ahead-of-time compiled {self._name} does not take these "
                          f"arguments ({err}); compiling it again for them", RuntimeWarning)
            self._fallback = True
            return self._jitted(*args)
