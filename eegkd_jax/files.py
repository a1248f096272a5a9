"""Files written whole or not at all, and JSON of what the library produces (configs, numpy).

Every result file (reports, model cards, study markers, hypnograms, figures) is written to
``<name>.tmp`` and renamed: a reader, or a run killed half-way, never sees half a file. On several
hosts only process 0 writes (``main_only``).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any


def is_main() -> bool:
    """Whether this is process 0, the one that writes shared files on a multi-host run."""
    import jax

    return jax.process_index() == 0


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[pathlib.Path], None], *,
                 main_only: bool = False) -> pathlib.Path:
    """Writes ``data`` (text, bytes, or a function that writes the file it is given) to ``path``
    through ``<path>.tmp`` and a rename; on failure the old file stays and the tmp goes. Returns
    ``path``."""
    path = pathlib.Path(path)
    if main_only and not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        elif isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, value: Any, *, main_only: bool = False,
               sort_keys: bool = False) -> pathlib.Path:
    """``value`` as indented JSON (NaN refused; numpy, paths and configs converted)."""
    text = json.dumps(value, indent=2, sort_keys=sort_keys, allow_nan=False, default=json_default)
    return write_atomic(path, text + "\n", main_only=main_only)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)``: numpy scalars and arrays, paths and ConfigDicts; anything else
    is an error."""
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return value.to_dict()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # numpy (and jax) scalars and arrays
        return value.tolist()
    raise TypeError(f"{value!r} of type {type(value).__name__} is not JSON serialisable")


def plain(value: Any, *, digits: int | None = None) -> Any:
    """A JSON-able copy: config groups and mappings as dicts, tuples as lists, numpy and jax
    scalars as numbers; floats rounded to ``digits`` where given."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v, digits=digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, digits=digits) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if digits is not None and isinstance(value, float):
        return round(value, digits)
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of nested dicts; an empty dict below the top is kept as a leaf."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}
