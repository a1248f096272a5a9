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

The same directory's ``exported/`` holds traced programs, the train step and the state's creation
(:func:`exported_jit`): a rerun that finds them skips Python's tracing, which was most of a warm
start.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import pickle
import sys

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

    With ``export_key`` the traced program is kept on disk (:func:`exported_jit`; the arguments'
    values are inputs of the program, only their shapes are part of its key).
    """

    def __init__(self, fn, *args, export_key: str | None = None, **jit_kwargs):
        import jax

        self._args = args
        jitted = jax.jit(fn, **jit_kwargs)
        if export_key is not None:
            shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
            jitted = exported_jit(jitted, *shapes, key=export_key,
                                  out_shardings=jit_kwargs.get("out_shardings"))
        self._traced = jitted.trace(*args)
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

    With ``export_key`` (see :func:`exported_jit`) the program is traced once per key and
    read back from the cache directory by later processes; ``donate_argnums`` must then repeat
    the jitted function's donation.
    """

    def __init__(self, jitted, *abstract_args, name: str = "step", export_key: str | None = None,
                 donate_argnums: int | tuple[int, ...] = ()):
        import concurrent.futures

        self._jitted = jitted
        self._name = name
        self._compiled = None
        self._fallback = False

        def build():
            program = jitted
            if export_key is not None:
                program = exported_jit(jitted, *abstract_args, key=export_key,
                                       donate_argnums=donate_argnums)
            return program.lower(*abstract_args).compile()

        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"compile-{name}")
        self._future = executor.submit(build)
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


# --------------------------------------------------------------------------------------------------
# Traced programs kept on disk.
#
# A warm start of the default online-KD run measured (2-core CPU) 1.8 s tracing the train step in
# Python, 0.4 s lowering it and 1.3 s reading its executable from the compilation cache. The
# persistent cache only saves the XLA compilation: its key is the lowered program, so the program
# must be traced and lowered again to find it. jax.export serializes the lowered program; a rerun
# reads it back (0.02 s) and lowers a small wrapper around it (0.3 s) instead.
#
# A stale program would silently train the wrong network, so its file name is a digest of
# everything that decides it: the caller's key (the config and the values derived from the data),
# the source of this package, the versions of the libraries that trace it, JAX's configuration,
# the devices, and the arguments' tree, shapes, dtypes and shardings.

EXPORT_FORMAT = 1
_EXPORT_MAGIC = b"eegkd-jax exported program\n"
_TRACING_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections", "chex")


def exported_directory() -> pathlib.Path | None:
    """``exported/`` inside the compilation cache directory; None while the cache is off."""
    import jax

    base = jax.config.jax_compilation_cache_dir
    return pathlib.Path(base) / "exported" if base else None


@functools.cache
def source_digest() -> str:
    """sha256 of every Python and C++ file of the eegkd_jax package (names and contents)."""
    root = pathlib.Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {"python": sys.version}
    for name in _TRACING_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _describe_arguments(abstract_args) -> dict:
    import jax

    leaves, treedef = jax.tree.flatten(abstract_args)
    return {"tree": str(treedef),
            "leaves": [[list(x.shape), str(x.dtype), repr(getattr(x, "sharding", None)),
                        bool(getattr(x, "weak_type", False))] for x in leaves]}


def export_digest(key: str, abstract_args) -> str:
    """The file name (hex sha256) of the program traced for ``key`` and ``abstract_args``."""
    import jax

    from eegkd_jax import kernels

    description = {
        "format": EXPORT_FORMAT,
        "key": key,
        "source": source_digest(),
        "libraries": _library_versions(),
        "jax_config": {name: repr(value) for name, value in sorted(jax.config.values.items())},
        "devices": [jax.default_backend(), jax.process_count(),
                    [d.device_kind for d in jax.devices()]],
        # Whether the program calls the CPU kernels (and, loading them, registers their targets
        # in this process before a program read from disk calls them).
        "cpu_kernels": kernels.available(),
        "arguments": _describe_arguments(abstract_args),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_export(path: pathlib.Path, in_treedef):
    """(exported, out_treedef) from ``path``, or None if it is absent or unusable (logged)."""
    import jax

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        logging.warning("cannot read the exported program %s (%s); tracing again", path, err)
        return None
    try:
        if not data.startswith(_EXPORT_MAGIC):
            raise ValueError("not an exported program of eegkd-jax")
        record = pickle.loads(data[len(_EXPORT_MAGIC):])
        if record["format"] != EXPORT_FORMAT:
            raise ValueError(f"format {record['format']}, expected {EXPORT_FORMAT}")
        if record["in_treedef"] != in_treedef:
            raise ValueError("it was traced for arguments of another structure")
        exported = jax.export.deserialize(bytearray(record["exported"]))
        if len(exported.out_avals) != record["out_treedef"].num_leaves:
            raise ValueError("its outputs do not match its recorded output structure")
        return exported, record["out_treedef"]
    except Exception as err:  # noqa: BLE001 - any damage means: trace again
        logging.warning("ignoring the exported program %s (%s); tracing again", path, err)
        return None


def _write_export(path: pathlib.Path, record: dict) -> None:
    """Atomically (a rename), so that concurrent runs or a crash never leave half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_EXPORT_MAGIC + pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
    except OSError as err:
        # A read-only cache costs the next run its tracing time, nothing else.
        logging.warning("cannot write the exported program %s (%s)", path, err)
        tmp.unlink(missing_ok=True)


def _export(jitted, abstract_args):
    """Traces ``jitted`` for ``abstract_args`` and exports it with flat arguments and results
    (jax.export serializes only its own pytree nodes; ours and optax's are kept pickled beside it).
    Returns (serialized export, in_treedef, out_treedef)."""
    import jax

    from eegkd_jax import kernels

    in_leaves, in_treedef = jax.tree.flatten(abstract_args)
    out_leaves, out_treedef = jax.tree.flatten(jitted.trace(*abstract_args).out_info)

    def flat(*leaves):
        return jax.tree.leaves(jitted(*jax.tree.unflatten(in_treedef, leaves)))

    flat_jit = jax.jit(flat, in_shardings=[getattr(x, "sharding", None) for x in in_leaves],
                       out_shardings=[x.sharding for x in out_leaves])
    # Our own FFI targets carry no compatibility guarantee across jaxlib versions; the digest
    # names the versions and the kernels' source, so a program is only read back by a match.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in kernels.TARGETS]
    return (jax.export.export(flat_jit, disabled_checks=checks)(*in_leaves).serialize(),
            in_treedef, out_treedef)


def exported_jit(jitted, *abstract_args, key: str, donate_argnums: int | tuple[int, ...] = (),
                 out_shardings=None):
    """``jitted`` (a ``jax.jit`` function) as a jitted call of its exported program for
    ``abstract_args`` (ShapeDtypeStructs with shardings): read from :func:`exported_directory`
    when a previous process traced it for the same ``key``, else traced, exported and written
    there. Without a cache directory it returns ``jitted`` itself. ``donate_argnums`` and
    ``out_shardings`` (what ``jitted`` was given) apply to the returned function.

    ``key`` must name everything the function's Python closes over (for a train step: the config
    and the values derived from the data); :func:`export_digest` adds the rest. The result runs
    the same XLA program as ``jitted``; both a fresh and a read program go through the same
    serialized form, so the compilation cache holds one executable for them.
    """
    import jax

    directory = exported_directory()
    if directory is None:
        return jitted
    in_treedef = jax.tree.structure(abstract_args)
    path = directory / f"{export_digest(key, abstract_args)}.jaxexport"
    loaded = _read_export(path, in_treedef)
    if loaded is None:
        blob, in_treedef, out_treedef = _export(jitted, abstract_args)
        _write_export(path, {"format": EXPORT_FORMAT, "in_treedef": in_treedef,
                             "out_treedef": out_treedef, "exported": blob})
        exported = jax.export.deserialize(blob)
    else:
        exported, out_treedef = loaded
        logging.info("read the traced program from %s", path)

    def call(*args):
        leaves, treedef = jax.tree.flatten(args)
        if treedef != in_treedef:
            raise TypeError(f"the exported program takes {in_treedef}, not {treedef}")
        return jax.tree.unflatten(out_treedef, exported.call(*leaves))

    if out_shardings is None:
        return jax.jit(call, donate_argnums=donate_argnums)
    return jax.jit(call, donate_argnums=donate_argnums, out_shardings=out_shardings)
