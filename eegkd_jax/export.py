"""Export a trained network as one file for on-device scoring: LiteRT (.tflite) or ONNX (.onnx).

    eegkd export --checkpoint=runs/online_kd --format=litert            # the ear student
    eegkd export --checkpoint=runs/online_kd --format=onnx --network=teacher
    eegkd export --checkpoint=runs/online_kd --format=litert --quantize=int8

The file takes one input window, (1, L * S, C) float32 derivations (L epochs of S samples, C
derivations, prepared as the run prepared its training data: see the card), and gives (1, L, 5)
stage probabilities (W, N1, N2, N3, REM). The run's model card, with the input's derivations,
rate, band-pass and scaling, travels inside the file (ONNX metadata_props, LiteRT metadata, both
under ``eegkd_model_card``; ``read_card`` reads it back) and beside it as ``<file>.json``.

The converter path: JAX lowers the network to StableHLO inside a TensorFlow function
(``jax.experimental.jax2tf``, its native serialisation, the route the LiteRT documentation gives for
JAX); TensorFlow's own TFLiteConverter makes the LiteRT file from it, with only builtin operators,
so the LiteRT runtime alone runs it; tf2onnx reads that LiteRT file and writes ONNX. jax2onnx was
not taken: its releases pin orbax-checkpoint below the version this project needs and bring a
dozen other packages (equinox, dm-pix, huggingface-hub, netron, orbax-export). orbax-export adds a
serving wrapper around the same jax2tf call, which a single function does not need. tf2onnx cannot
read the StableHLO inside a TensorFlow graph, hence the LiteRT file in between.

Every export is checked before it is kept: the file runs (onnxruntime, the LiteRT interpreter) on
a short simulated night prepared with the run's data config, and a float32 export whose
probabilities differ from JAX's by more than ``TOLERANCE`` is refused. The check's numbers (largest
difference, kappa agreement of the stages with JAX's, per-epoch latency) go into the card.
``--quantize float16`` stores the weights in float16; ``--quantize int8`` quantises the weights to
8 bits (dynamic range: activations stay float). Both are LiteRT only, and their agreement with the
float32 network is measured, not assumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from eegkd_jax import files
from eegkd_jax.data.recording import STAGES

FORMATS = {"litert": ".tflite", "onnx": ".onnx"}
QUANTIZATIONS = ("none", "float16", "int8")
CARD_KEY = "eegkd_model_card"
TOLERANCE = 1e-4  # largest probability difference to JAX a float32 export may show
ONNX_OPSET = 17
INPUT_NAME = "signal"
EXTRA_HINT = "pip install 'eegkd-jax[export]' (tf2onnx, onnx, onnxruntime, ai-edge-litert)"


class ExportError(ValueError):
    """The export cannot be made or fails its check; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote.

    Attributes:
      path: the model file. card_path: its card beside it (``<file>.json``).
      size_bytes: the model file's size.
      card: the card (also inside the file).
      check: the check's numbers (``check_export``).
    """

    path: pathlib.Path
    card_path: pathlib.Path
    size_bytes: int
    card: dict
    check: dict


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: {EXTRA_HINT}") from None


# --------------------------------------------------------------------------------------------------
# JAX -> LiteRT -> ONNX


def epochs_per_input(model, epochs: int | None = None) -> int:
    """L: the transformer scores one epoch; U-Sleep takes ``epochs`` or the run's training
    sequence length."""
    from eegkd_jax import predict

    if model.model_config.name in predict.SINGLE_EPOCH_MODELS:
        if epochs not in (None, 1):
            raise ExportError(f"{model.model_config.name} scores one epoch at a time; "
                              f"--epochs_per_input must be 1, got {epochs}")
        return 1
    wanted = int(epochs or model.config.data.sequence_length)
    if wanted < 1:
        raise ExportError(f"--epochs_per_input must be at least 1, got {wanted}")
    return wanted


def probability_fn(model) -> Callable:
    """x (B, L * S, C) float32 -> stage probabilities (B, L, 5), the network in inference mode."""
    import jax

    def probabilities(x):
        logits, _ = model.module.apply(model.variables, x, train=False)
        return jax.nn.softmax(logits, axis=-1)

    return probabilities


def to_litert(model, epochs: int, quantize: str = "none") -> bytes:
    """The network as a LiteRT flatbuffer with a fixed (1, epochs * S, C) input.

    Raises:
      ExportError: a quantisation it does not know, or a network TFLite's builtin operators
        cannot express.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    if quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    shape = (1, epochs * model.epoch_samples, len(model.derivations))
    # Lowered for the CPU whatever this machine has: the file is for a phone or a wearable.
    converted = jax2tf.convert(probability_fn(model), with_gradient=False,
                               native_serialization_platforms=("cpu",))
    function = tf.function(converted, autograph=False,
                           input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        with _native_quiet():
            return bytes(converter.convert())
    except Exception as e:  # noqa: BLE001 - the converter raises its own ConverterError and others
        raise ExportError(f"TFLiteConverter could not convert {model.describe()}: "
                          f"{type(e).__name__}: {e}") from None


# Off with --verbose: the runtimes' C++ notices are hidden while they load (see _native_quiet).
QUIET_NATIVE = True


@contextlib.contextmanager
def _native_quiet() -> Iterator[None]:
    """The LiteRT runtime and TensorFlow's converter print notices from C++ straight to the
    process's stderr ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU", "Ignored
    output_format"), past Python's logging: while they load, file descriptor 2 points at
    /dev/null. Their Python exceptions still propagate; --verbose shows everything."""
    if not QUIET_NATIVE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _fully_connected_keeps_its_bias() -> Iterator[None]:
    """tf2onnx 1.17 drops the bias of a LiteRT FULLY_CONNECTED whose input has more than two
    dimensions (it flattens the input and forgets the third operand; the transformer's feed-forward
    blocks are such layers). While this is open, its handler is wrapped to add the bias back
    where nothing consumes it."""
    _require("tf2onnx.tfonnx")  # registers the LiteRT handlers
    handler = _require("tf2onnx.handler")

    table = handler.tf_op.get_opsets()["com.google.tensorflow"][0]
    original, kwargs = table["TFL_FULLY_CONNECTED"]

    def to_tf(ctx, node, **options):
        bias = node.input[2] if len(node.input) == 3 else None
        original(ctx, node, **options)
        if bias is not None and not ctx.find_output_consumers(bias):
            add = ctx.insert_new_node_on_output("Add", node.output[0],
                                                inputs=[node.output[0], bias])
            add.skip_conversion = True

    table["TFL_FULLY_CONNECTED"] = (to_tf, kwargs)
    try:
        yield
    finally:
        table["TFL_FULLY_CONNECTED"] = (original, kwargs)


def litert_to_onnx(tflite: bytes) -> bytes:
    """ONNX (opset ``ONNX_OPSET``) of a LiteRT flatbuffer, through tf2onnx's LiteRT reader."""
    tf2onnx = _require("tf2onnx")
    _require("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "model.tflite"
        path.write_bytes(tflite)
        # tf2onnx reads the file with TensorFlow's own (deprecated) tf.lite.Interpreter, and its
        # graph rewriter logs an error for a fusion it skips; the export is checked against JAX
        # right after, which is what decides.
        quiet = logging.getLogger("tf2onnx")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings(), _fully_connected_keeps_its_bias(), _native_quiet():
                warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated")
                model_proto, _ = tf2onnx.convert.from_tflite(str(path), opset=ONNX_OPSET)
        finally:
            quiet.setLevel(level)
    return model_proto.SerializeToString()


def _with_card_litert(tflite: bytes, card: dict) -> bytes:
    """The flatbuffer with the card as a metadata entry named ``CARD_KEY``."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(card).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = CARD_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _with_card_onnx(onnx_bytes: bytes, card: dict) -> bytes:
    onnx = _require("onnx")
    model = onnx.load_from_string(onnx_bytes)
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    model.producer_name = "eegkd-jax"
    return model.SerializeToString()


def read_card(path: str | pathlib.Path) -> dict:
    """The card inside an exported file.

    Raises:
      ExportError naming the file if it holds none.
    """
    path = pathlib.Path(path)
    if path.suffix == ".onnx":
        onnx = _require("onnx")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                 .metadata_props}
        text = props.get(CARD_KEY)
    else:
        from tensorflow.lite.tools import flatbuffer_utils

        model = flatbuffer_utils.read_model(str(path))
        found = [m for m in (model.metadata or []) if m.name.decode() == CARD_KEY]
        text = bytes(model.buffers[found[0].buffer].data).decode() if found else None
    if text is None:
        raise ExportError(f"{path}: holds no {CARD_KEY}")
    return json.loads(text)


# --------------------------------------------------------------------------------------------------
# Running and checking an exported file


class Runner:
    """Runs an exported file one window at a time: ``runner(x)`` with x (1, L * S, C) float32
    gives (1, L, 5) probabilities. onnxruntime for .onnx, the LiteRT interpreter for .tflite.

    Args:
      path: the file. threads: CPU threads (None: the runtime's default).
    """

    def __init__(self, path: str | pathlib.Path, threads: int | None = None):
        self.path = pathlib.Path(path)
        if self.path.suffix == ".onnx":
            ort = _require("onnxruntime")
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(str(self.path), options,
                                                 providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            self.input_shape = tuple(self._session.get_inputs()[0].shape)
        else:
            interpreter = _require("ai_edge_litert.interpreter")
            with _native_quiet():
                self._interpreter = interpreter.Interpreter(model_path=str(self.path),
                                                            num_threads=threads)
                self._interpreter.allocate_tensors()
            self._in = self._interpreter.get_input_details()[0]
            self._out = self._interpreter.get_output_details()[0]
            self.input_shape = tuple(int(d) for d in self._in["shape"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self.path.suffix == ".onnx":
            return self._session.run(None, {self._input: x})[0]
        self._interpreter.set_tensor(self._in["index"], x)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._out["index"]))


def simulated_windows(model, epochs: int, *, hours: float = 0.25, subject: str = "sim-check"
                      ) -> np.ndarray:
    """(n, epochs * S, C) float32 input windows from a simulated night, derived, filtered,
    resampled and scaled with the run's data config (what the network saw in training)."""
    from eegkd_jax.data import preprocess, simulate

    data_cfg = model.config.data.copy_and_resolve_references()
    other = "ear" if model.input_key == "scalp" else "scalp"
    data_cfg[f"{other}_derivations"] = ()
    seed = int(data_cfg.simulated.seed) if "simulated" in data_cfg else 0
    recording = simulate.simulate_recording(subject, seed=seed, hours=hours)
    night = preprocess.prepare_night(recording, data_cfg)
    signal = night.ear if model.input_key == "ear" else night.scalp
    window = epochs * model.epoch_samples
    count = signal.shape[0] // window
    if count == 0:
        raise ExportError(f"a {hours:g}-h simulated night is shorter than one {epochs}-epoch "
                          "window")
    return signal[: count * window].reshape(count, window, signal.shape[1])


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    from eegkd_jax import metrics as metrics_lib

    overall = metrics_lib.evaluate_subjects(a, b, np.zeros(a.size, np.int64))["overall"]
    return float(overall["kappa"])


def check_export(path: str | pathlib.Path, model, windows: np.ndarray, *,
                 threads: int | None = None) -> dict:
    """Runs the exported file on ``windows`` (n, L * S, C), one window at a time, against JAX.

    Returns:
      {"windows", "epochs", "max_abs_difference", "stage_agreement", "kappa_agreement",
      "latency_ms_per_epoch"}: the largest probability difference to JAX, the share of epochs
      given the same stage and Cohen's kappa between the two stagings, and the median time of
      one window divided by its epochs.
    """
    import jax

    reference = np.asarray(jax.jit(probability_fn(model))(windows))  # (n, L, 5)
    runner = Runner(path, threads=threads)
    outputs, seconds = [], []
    for window in windows:
        start = time.perf_counter()
        outputs.append(runner(window[None]))
        seconds.append(time.perf_counter() - start)
    got = np.concatenate(outputs, axis=0)
    epochs = reference.shape[0] * reference.shape[1]
    want_stages = reference.argmax(-1).reshape(-1)
    got_stages = got.argmax(-1).reshape(-1)
    same = float(np.mean(want_stages == got_stages))
    return {
        "windows": int(windows.shape[0]),
        "epochs": int(epochs),
        "max_abs_difference": float(np.max(np.abs(got - reference))),
        "stage_agreement": round(same, 6),
        # Kappa of one staging against itself is 1 even where one stage fills the night.
        "kappa_agreement": 1.0 if same == 1.0 else round(_kappa(want_stages, got_stages), 6),
        "latency_ms_per_epoch": round(1e3 * float(np.median(seconds)) / reference.shape[1], 4),
    }


# --------------------------------------------------------------------------------------------------
# The whole export


def default_path(model, fmt: str, quantize: str) -> pathlib.Path:
    """``<workdir>/export/<network>-<input>-step<step>[-<quantize>].<ext>``, e.g.
    ``model-ear-step40.tflite``."""
    suffix = "" if quantize == "none" else f"-{quantize}"
    name = f"{model.network}-{model.input_key}-step{model.step}{suffix}{FORMATS[fmt]}"
    return model.workdir / "export" / name


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for package in ("jax", "tensorflow-cpu", "tensorflow", "tf2onnx", "onnx"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def _card(model, run_card: dict | None, fmt: str, quantize: str, epochs: int) -> dict:
    from eegkd_jax import __version__

    data = model.config.data
    band = data.preprocess.bandpass_hz
    samples = epochs * model.epoch_samples
    preparation = [
        f"derive {' '.join(model.derivations)} from the electrodes (eegkd_jax.data.montage)",
        ("band-pass " + f"{band[0]:g}-{band[1]:g} Hz" if band else "no band-pass")
        + " (4th-order Butterworth, forward and backward) at the recording's rate",
        f"resample to {model.sampling_rate:g} Hz (polyphase)",
        f"scale each derivation over the whole night: {data.preprocess.scaling} "
        f"(median / inter-quartile range), clip at +-{data.preprocess.clip_iqr} IQR",
    ]
    return {
        "model_card": run_card,
        "exported": {
            "format": fmt, "quantize": quantize, "eegkd_jax_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "converter": "jax2tf (StableHLO, CPU) -> TFLiteConverter (builtin ops)"
                         + (" -> tf2onnx (LiteRT reader)" if fmt == "onnx" else ""),
            "versions": _versions(),
        },
        "checkpoint": {"workdir": str(model.workdir), "step": model.step, "which": model.which,
                       "network": model.network, "mode": str(model.config.mode),
                       "model": str(model.model_config.name),
                       "data_source": str(model.config.data.source)},
        "input": {"name": INPUT_NAME, "shape": [1, samples, len(model.derivations)],
                  "dtype": "float32", "layout": "(batch, time, derivation)",
                  "derivations": list(model.derivations), "reads": model.input_key,
                  "sampling_rate_hz": model.sampling_rate,
                  "epoch_seconds": model.epoch_seconds, "epochs_per_input": epochs,
                  "preparation": preparation},
        "output": {"index": 0, "shape": [1, epochs, len(STAGES)], "dtype": "float32",
                   "meaning": "stage probabilities per epoch (softmax)", "stages": list(STAGES)},
    }


def export_model(
    checkpoint: str | pathlib.Path,
    fmt: str,
    out: str | pathlib.Path | None = None,
    *,
    which: str | int = "best",
    network: str = "model",
    epochs: int | None = None,
    quantize: str = "none",
    check_hours: float = 0.25,
    threads: int | None = None,
) -> Exported:
    """Writes one trained network of a run as a LiteRT or ONNX file, with its card, checked.

    Args:
      checkpoint: the run's workdir or its checkpoints directory.
      fmt: "litert" or "onnx".
      out: the file to write; default ``default_path``.
      which: "best", "latest" or a step. network: "model" or "teacher" (``predict``'s meaning).
      epochs: L, epochs per input window (``epochs_per_input``).
      quantize: "none", or "float16" / "int8" (LiteRT only).
      check_hours: length of the simulated night the file is checked on.
      threads: CPU threads for the check's runtime.

    Raises:
      ExportError: an unknown format or quantisation, a missing converter package, or a float32
        file whose probabilities differ from JAX's by more than TOLERANCE (nothing is kept).
      FileNotFoundError, ValueError: no such run or network (``predict.load_trained_model``).
    """
    from eegkd_jax import model_card, predict

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if quantize != "none" and fmt != "litert":
        raise ExportError(f"--quantize {quantize} is for --format litert; ONNX exports are float32")
    if fmt == "onnx":
        for module in ("tf2onnx", "onnx", "onnxruntime"):
            _require(module)
    else:
        _require("ai_edge_litert.interpreter")
    model = predict.load_trained_model(checkpoint, which, network=network)
    epochs = epochs_per_input(model, epochs)
    path = pathlib.Path(out) if out else default_path(model, fmt, quantize)
    if path.suffix != FORMATS[fmt]:
        raise ExportError(f"{path}: a {fmt} file must end in {FORMATS[fmt]}")
    card = _card(model, model_card.load(model.workdir), fmt, quantize, epochs)

    tflite = to_litert(model, epochs, quantize)
    model_bytes = litert_to_onnx(tflite) if fmt == "onnx" else tflite
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    try:
        tmp.write_bytes(model_bytes)
        windows = simulated_windows(model, epochs, hours=check_hours)
        check = check_export(tmp, model, windows, threads=threads)
        check["input"] = (f"{windows.shape[0]} windows of a {check_hours:g}-h simulated night, "
                          "prepared with the run's data config")
        if quantize == "none" and not check["max_abs_difference"] <= TOLERANCE:
            raise ExportError(
                f"{path}: the exported network's probabilities differ from JAX's by "
                f"{check['max_abs_difference']:.3g} (more than {TOLERANCE:g}) on a simulated "
                "night; not written")
        card["check"] = check
        add_card = _with_card_onnx if fmt == "onnx" else _with_card_litert
        tmp.write_bytes(add_card(model_bytes, card))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    card_path = files.write_json(path.with_name(path.name + ".json"), card)
    return Exported(path, card_path, path.stat().st_size, card, check)
