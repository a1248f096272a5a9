"""Evaluation reports: report.json, a readable report.md and PNG figures, plus hypnogram files.

``write_report`` takes the dict from ``eegkd_jax.metrics.evaluate_subjects`` and each subject's true
and predicted hypnograms, and writes into one folder::

    report.json                 the results dict, plus "metadata" and "figures"
    report.md                   overall, per-class, confusion-matrix and per-subject tables
    confusion_matrix.png        row-normalised confusion matrix (rows true, columns predicted)
    hypnograms/<subject>.png    true hypnogram above the predicted one, time in hours

``write_hypnogram_tsv`` / ``read_hypnogram_tsv`` and ``plot_hypnogram`` serve one predicted night
(the predict tool uses them too). Figures are drawn with matplotlib's Agg canvas on ``Figure``
objects directly rather than through pyplot: no global backend switch, no figure registry to leak,
safe to call from any thread.

Hypnograms follow the clinical convention: stages top to bottom W, REM, N1, N2, N3, so deeper sleep
is lower; unscored epochs (label -1) are gaps in the line, not a sixth level.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import eegkd_jax
from eegkd_jax import files, metrics
from eegkd_jax.data.recording import NUM_CLASSES, STAGES, UNSCORED, DataError

# Top-to-bottom order of a hypnogram's y axis.
HYPNOGRAM_ORDER: tuple[str, ...] = ("W", "REM", "N1", "N2", "N3")
# y level of each stage index (0=W .. 4=REM): W highest, N3 lowest.
_LEVEL = np.array(
    [len(HYPNOGRAM_ORDER) - 1 - HYPNOGRAM_ORDER.index(name) for name in STAGES], dtype=np.float64
)
STAGE_COLORS = {
    "W": "#e3a21a",
    "N1": "#8ecae6",
    "N2": "#3a86c8",
    "N3": "#1d3557",
    "REM": "#d62828",
}
UNSCORED_TSV = "n/a"  # BIDS spelling of a missing value
PROBABILITY_TOLERANCE = 1e-3  # rows of written probabilities must sum to 1 within this


@dataclasses.dataclass(frozen=True, eq=False)
class Hypnogram:
    """One night's stages, scored and predicted, epoch by epoch.

    Attributes:
      true: (epochs,) int stages, -1 where not scored.
      predicted: (epochs,) int predicted stages, -1 where the model gave none.
      epoch_seconds: length of one epoch.
    """

    true: np.ndarray
    predicted: np.ndarray
    epoch_seconds: float = 30.0

    def __post_init__(self):
        for what in ("true", "predicted"):
            arr = np.asarray(getattr(self, what))
            _check_stages("hypnogram", what, arr)
            object.__setattr__(self, what, arr.astype(np.int64))
        if self.true.shape != self.predicted.shape:
            raise DataError(
                "hypnogram",
                f"true stages have shape {self.true.shape} but predicted {self.predicted.shape}",
            )
        if not self.epoch_seconds > 0:
            raise DataError(
                "hypnogram", f"epoch_seconds must be positive, got {self.epoch_seconds}"
            )


def _check_stages(source: str, what: str, stages: np.ndarray) -> None:
    if stages.ndim != 1:
        raise DataError(source, f"{what} stages must be 1-D (epochs,), got shape {stages.shape}")
    if stages.size and (stages.dtype == np.bool_ or not np.issubdtype(stages.dtype, np.integer)):
        raise DataError(source, f"{what} stages must be integers, got dtype {stages.dtype}")
    bad = np.setdiff1d(np.unique(stages), np.arange(UNSCORED, NUM_CLASSES))
    if bad.size:
        raise DataError(source, f"{what} stage values {bad.tolist()} are outside -1..4")


# --------------------------------------------------------------------------------------------------
# Figures.


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure; savefig then renders with Agg
    return fig


def _save(fig: Figure, path: pathlib.Path) -> None:
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the True runs in a 1-D bool array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def stage_levels(stages: np.ndarray) -> np.ndarray:
    """Hypnogram y positions of (epochs,) stages: W 4, REM 3, N1 2, N2 1, N3 0, and NaN for -1."""
    stages = np.asarray(stages)
    return np.where(stages >= 0, _LEVEL[np.clip(stages, 0, None)], np.nan)


def _draw_stages(ax, stages: np.ndarray, hours: np.ndarray, label: str, color: str) -> None:
    """Step line of one hypnogram on ``ax``; ``hours`` holds the epochs' edges (epochs + 1,)."""
    levels = stage_levels(stages)
    # The extra final value makes the last epoch a full-width step; NaN levels leave gaps.
    ax.step(hours, np.append(levels, levels[-1:]), where="post", color=color, lw=1.1)
    rem = STAGES.index("REM")
    for start, stop in _runs(stages == rem):
        # Clinical hypnograms draw REM as a bold bar so REM periods stand out.
        ax.hlines(_LEVEL[rem], hours[start], hours[stop], color=STAGE_COLORS["REM"], lw=3.5)
    ax.set_yticks(np.arange(len(HYPNOGRAM_ORDER)), labels=HYPNOGRAM_ORDER[::-1])
    ax.set_ylim(-0.6, len(HYPNOGRAM_ORDER) - 0.4)
    ax.set_ylabel(label)
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.set_axisbelow(True)


def plot_hypnogram(
    path: str | os.PathLike,
    stages: Any,
    *,
    epoch_seconds: float = 30.0,
    true_stages: Any = None,
    probabilities: Any = None,
    title: str = "",
    start_seconds: float = 0.0,
    clock_start: datetime.datetime | None = None,
    note: str = "",
) -> pathlib.Path:
    """Draws one night's predicted hypnogram to a PNG.

    Args:
      path: the PNG to write (parent folders are created).
      stages: (epochs,) int predicted stages, -1 = none (drawn as a gap).
      epoch_seconds: epoch length; the x axis is hours since ``start_seconds``.
      true_stages: optional (epochs,) int scored stages (-1 = unscored), drawn above the prediction;
        epochs where the two disagree are shaded on the predicted panel.
      probabilities: optional (epochs, 5) stage probabilities, drawn below as a stacked
        "hypnodensity" band in the hypnogram's stage order.
      title: figure title.
      start_seconds: time of the first epoch's onset (added to the axis, e.g. for a cropped night).
      clock_start: the clock time of the recording's first sample; the axis then reads clock time
        (``time_axis``) instead of hours from 0.
      note: a caveat written under the figure (e.g. that the model only saw simulated nights).

    Returns:
      The path written.
    """
    path = pathlib.Path(path)
    predicted = np.asarray(stages)
    _check_stages(str(path), "predicted", predicted)
    predicted = predicted.astype(np.int64)
    n = predicted.shape[0]
    if n == 0:
        raise DataError(str(path), "cannot plot a hypnogram with no epochs")
    if not epoch_seconds > 0:
        raise DataError(str(path), f"epoch_seconds must be positive, got {epoch_seconds}")
    truth = None
    if true_stages is not None:
        truth = np.asarray(true_stages)
        _check_stages(str(path), "true", truth)
        truth = truth.astype(np.int64)
        if truth.shape != predicted.shape:
            raise DataError(
                str(path), f"{truth.shape[0]} true stages but {n} predicted stages"
            )
    probs = None if probabilities is None else _check_probabilities(str(path), probabilities, n)

    hours = (start_seconds + np.arange(n + 1) * epoch_seconds) / 3600.0
    panels = (truth is not None) + 1 + (probs is not None)
    fig = _new_figure(11.0, 0.6 + 1.7 * panels)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    row = 0
    if truth is not None:
        _draw_stages(axes[row], truth, hours, "Scored", "0.15")
        row += 1
    ax = axes[row]
    _draw_stages(ax, predicted, hours, "Predicted", "#264653")
    if truth is not None:
        wrong = (truth >= 0) & (predicted >= 0) & (truth != predicted)
        spans = [(hours[a], hours[b] - hours[a]) for a, b in _runs(wrong)]
        if spans:
            ax.broken_barh(spans, (-0.6, len(HYPNOGRAM_ORDER)), color="#f4a3a3", alpha=0.45, lw=0)
        scored = int(np.sum((truth >= 0) & (predicted >= 0)))
        agree = scored - int(wrong.sum())
        ax.text(
            1.0, 1.02, f"agreement {agree}/{scored} scored epochs"
            + (f" ({agree / scored:.1%}); shaded: disagreement" if scored else ""),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3",
        )
    row += 1
    if probs is not None:
        ax = axes[row]
        bottom = np.zeros(n + 1)
        for name in HYPNOGRAM_ORDER[::-1]:  # N3 at the bottom, W on top, as on the hypnogram
            p = np.append(probs[:, STAGES.index(name)], probs[-1, STAGES.index(name)])
            ax.fill_between(
                hours, bottom, bottom + p, step="post", color=STAGE_COLORS[name], lw=0, label=name
            )
            bottom = bottom + p
        ax.set_ylim(0, 1)
        ax.set_ylabel("Probability")
        handles, labels = ax.get_legend_handles_labels()
        # Legend top to bottom in the stack's order (W on top).
        ax.legend(
            handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
            frameon=False,
        )
    label, formatter = time_axis(clock_start, hours[-1] - hours[0])
    axes[-1].set_xlabel(label)
    if formatter is not None:
        axes[-1].xaxis.set_major_formatter(formatter)
    axes[-1].set_xlim(hours[0], hours[-1])
    if title:
        fig.suptitle(title)
    if note:
        fig.supxlabel(note, fontsize=8, color="#9b2226")  # the layout makes room for it
    _save(fig, path)
    return path


def time_axis(clock_start: datetime.datetime | None, span_hours: float):
    """(axis label, tick formatter or None) for an axis in hours from the recording's first
    sample: clock time (HH:MM, or HH:MM:SS under two hours) where the start time is known."""
    if clock_start is None:
        return "Time (hours)", None
    from matplotlib.ticker import FuncFormatter

    form = "%H:%M" if span_hours >= 2.0 else "%H:%M:%S"

    def tick(hours, _position=None):
        return (clock_start + datetime.timedelta(hours=float(hours))).strftime(form)

    return f"Clock time (recording started {clock_start:%Y-%m-%d %H:%M:%S})", FuncFormatter(tick)


def plot_confusion_matrix(
    path: str | os.PathLike, summary: Mapping[str, Any], *, title: str = ""
) -> pathlib.Path:
    """Draws the row-normalised confusion matrix of a ``metrics.summarize`` result to a PNG.

    Each cell shows the share of the row's (true stage's) epochs and the raw count; rows of stages
    that never occur stay empty instead of dividing by zero.
    """
    path = pathlib.Path(path)
    cm = summary["confusion_matrix"]
    counts = np.asarray(cm["counts"], dtype=np.int64)
    names = list(cm["labels"])
    k = counts.shape[0]
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.zeros(counts.shape, dtype=np.float64)
    np.divide(counts, row_totals, out=shares, where=row_totals > 0)

    fig = _new_figure(6.4, 5.4)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true stage")
    for i in range(k):
        for j in range(k):
            if row_totals[i, 0] == 0:
                continue
            ax.text(
                j, i, f"{shares[i, j]:.0%}\n{counts[i, j]}", ha="center", va="center",
                fontsize=9, color="white" if shares[i, j] > 0.55 else "black",
            )
    ax.set_xticks(range(k), labels=names)
    row_labels = [f"{name}\n(n={int(t)})" for name, t in zip(names, row_totals[:, 0])]
    ax.set_yticks(range(k), labels=row_labels)
    ax.set_xlabel("Predicted stage")
    ax.set_ylabel("True stage")
    ax.set_title(
        title
        or f"Confusion matrix (rows: true)\naccuracy {summary['accuracy']:.3f}, "
        f"kappa {summary['kappa']:.3f}, macro F1 {summary['macro_f1']:.3f}",
        fontsize=10,
    )
    _save(fig, path)
    return path


# --------------------------------------------------------------------------------------------------
# Hypnogram TSV (one row per epoch, BIDS events style).


def _check_probabilities(source: str, probabilities: Any, n: int) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (n, NUM_CLASSES):
        raise DataError(
            source, f"probabilities must be ({n}, {NUM_CLASSES}), got shape {probs.shape}"
        )
    if not np.all(np.isfinite(probs)):
        raise DataError(source, "probabilities contain NaN or infinite values")
    tol = PROBABILITY_TOLERANCE
    if probs.size and (probs.min() < -tol or probs.max() > 1 + tol):
        raise DataError(source, f"probabilities outside [0, 1]: {probs.min():g}..{probs.max():g}")
    sums = probs.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > PROBABILITY_TOLERANCE)
    if off.size:
        raise DataError(
            source, f"probabilities of epoch {off[0]} sum to {sums[off[0]]:.6f}, not 1 "
            f"({off.size} such epochs)"
        )
    return probs


def write_hypnogram_tsv(
    path: str | os.PathLike,
    onsets_s: Any,
    stages: Any,
    probabilities: Any = None,
    *,
    duration_s: float = 30.0,
) -> pathlib.Path:
    """Writes one night's staging as a tab-separated file, one row per epoch.

    Columns: ``onset`` and ``duration`` in seconds (as in BIDS events files), ``stage`` (W, N1, N2,
    N3, REM, or ``n/a`` for -1), then ``p_W p_N1 p_N2 p_N3 p_REM`` when probabilities are given.

    Args:
      path: the file to write.
      onsets_s: (epochs,) epoch onsets in seconds, finite and strictly increasing.
      stages: (epochs,) int stages, -1 = none.
      probabilities: optional (epochs, 5) stage probabilities; each row sums to 1.
      duration_s: epoch length in seconds.

    Returns:
      The path written.
    """
    path = pathlib.Path(path)
    source = str(path)
    onsets = np.asarray(onsets_s, dtype=np.float64)
    labels = np.asarray(stages)
    _check_stages(source, "", labels)
    if onsets.shape != labels.shape:
        raise DataError(source, f"{onsets.size} onsets for {labels.size} stages")
    if not np.all(np.isfinite(onsets)):
        raise DataError(source, "onsets contain NaN or infinite values")
    if np.any(np.diff(onsets) <= 0):
        raise DataError(source, "onsets must be strictly increasing")
    if not duration_s > 0:
        raise DataError(source, f"duration must be positive, got {duration_s}")
    probs = None
    if probabilities is not None:
        probs = _check_probabilities(source, probabilities, labels.size)

    header = ["onset", "duration", "stage"]
    if probs is not None:
        header += [f"p_{name}" for name in STAGES]
    lines = ["\t".join(header)]
    for i, (onset, stage) in enumerate(zip(onsets.tolist(), labels.tolist())):
        row = [f"{onset:.3f}", f"{duration_s:g}", STAGES[stage] if stage >= 0 else UNSCORED_TSV]
        if probs is not None:
            row += [f"{p:.4f}" for p in probs[i]]
        lines.append("\t".join(row))
    return files.write_atomic(path, "\n".join(lines) + "\n")


def read_hypnogram_tsv(
    path: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reads a file written by ``write_hypnogram_tsv``.

    Returns:
      (onsets (epochs,) float64 seconds, stages (epochs,) int64 with -1 for ``n/a``,
      probabilities (epochs, 5) float64 or None when the file has no probability columns).
    """
    path = pathlib.Path(path)
    source = str(path)
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise DataError(source, "empty hypnogram file (no header)")
    header, body = rows[0], rows[1:]
    prob_columns = [f"p_{name}" for name in STAGES]
    base = ["onset", "duration", "stage"]
    if header not in (base, base + prob_columns):
        raise DataError(source, f"unexpected columns {header}")
    lookup = {name: i for i, name in enumerate(STAGES)} | {UNSCORED_TSV: UNSCORED}
    onsets, stages, probs = [], [], []
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(source, f"line {number} has {len(row)} fields, expected {len(header)}")
        if row[2] not in lookup:
            raise DataError(source, f"line {number}: unknown stage {row[2]!r}")
        try:
            onsets.append(float(row[0]))
            probs.append([float(v) for v in row[3:]])
        except ValueError as err:
            raise DataError(source, f"line {number}: {err}") from None
        stages.append(lookup[row[2]])
    probabilities = np.array(probs, dtype=np.float64).reshape(len(body), -1)
    return (
        np.array(onsets, dtype=np.float64),
        np.array(stages, dtype=np.int64),
        probabilities if len(header) > 3 else None,
    )


# --------------------------------------------------------------------------------------------------
# The report.


def _figure_name(subject: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", subject) + ".png"


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _markdown(report: Mapping[str, Any]) -> str:
    overall = report["overall"]
    meta = report["metadata"]
    out = ["# Sleep-staging evaluation", ""]
    described = {k: v for k, v in meta.items() if k not in ("definitions",)}
    for key, value in described.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=files.json_default)
        out.append(f"- **{key}**: {value}")
    out += [
        "",
        "## Overall (all scored epochs of all subjects pooled)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| scored epochs | {overall['num_epochs']} |",
    ]
    for key, label in (
        ("accuracy", "accuracy"),
        ("kappa", "Cohen's kappa"),
        ("macro_f1", "macro F1"),
        ("g_mean", "G-mean"),
        ("macro_sensitivity", "macro sensitivity"),
        ("macro_specificity", "macro specificity"),
        ("macro_precision", "macro precision"),
    ):
        out.append(f"| {label} | {_fmt(overall[key])} |")
    floor = report.get("floor")
    if floor:
        out += ["", "## Classical floor", "",
                f"Band powers + logistic regression ({floor['method']}), trained on "
                f"{', '.join(floor['train_subjects'])}, scored on the same epochs:", "",
                "| | kappa | accuracy | macro F1 |", "|---|---|---|---|",
                f"| this model | {_fmt(overall['kappa'])} | {_fmt(overall['accuracy'])} | "
                f"{_fmt(overall['macro_f1'])} |"]
        for name, scores in floor["scores"].items():
            out.append(f"| floor, {name} | {_fmt(scores['kappa'])} | "
                       f"{_fmt(scores['accuracy'])} | {_fmt(scores['macro_f1'])} |")
    across = report.get("across_subjects", {})
    if across:
        out += ["", "Across subjects (unweighted mean ± standard deviation over subjects):", ""]
        out += ["| metric | mean | std | subjects |", "|---|---|---|---|"]
        for key, stats in across.items():
            out.append(
                f"| {key} | {_fmt(stats['mean'])} | {_fmt(stats['std'])} | {stats['count']} |"
            )

    out += [
        "",
        "## Per class (pooled)",
        "",
        "| stage | support | predicted | precision | sensitivity | specificity | F1 | G-mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in overall["per_class"].items():
        out.append(
            f"| {name} | {c['support']} | {c['predicted']} | {_fmt(c['precision'])} | "
            f"{_fmt(c['sensitivity'])} | {_fmt(c['specificity'])} | {_fmt(c['f1'])} | "
            f"{_fmt(c['g_mean'])} |"
        )

    cm = overall["confusion_matrix"]
    names = cm["labels"]
    out += [
        "",
        f"## Confusion matrix ({cm['note']}; count and share of the true stage)",
        "",
        "| true \\ predicted | " + " | ".join(names) + " | total |",
        "|---" * (len(names) + 2) + "|",
    ]
    for name, row in zip(names, cm["counts"]):
        total = sum(row)
        cells = [f"{v} ({v / total:.0%})" if total else "0" for v in row]
        out.append(f"| **{name}** | " + " | ".join(cells) + f" | {total} |")
    figures = report.get("figures", {})
    if "confusion_matrix" in figures:
        out += ["", f"![row-normalised confusion matrix]({figures['confusion_matrix']})"]

    per_subject = report["per_subject"]
    if per_subject:
        stage_names = list(overall["per_class"])
        out += [
            "",
            "## Per subject",
            "",
            "| subject | scored epochs | accuracy | kappa | macro F1 | G-mean | "
            + " | ".join(f"F1 {s}" for s in stage_names)
            + " |",
            "|---" * (6 + len(stage_names)) + "|",
        ]
        any_absent = False
        for subject, s in per_subject.items():
            f1_cells = []
            for n in stage_names:
                present = s["support"][n] or s["per_class"][n]["predicted"]
                any_absent |= not present
                f1_cells.append(_fmt(s["per_class"][n]["f1"]) if present else "–")
            out.append(
                f"| {subject} | {s['num_epochs']} | {_fmt(s['accuracy'])} | {_fmt(s['kappa'])} | "
                f"{_fmt(s['macro_f1'])} | {_fmt(s['g_mean'])} | " + " | ".join(f1_cells) + " |"
            )
        if any_absent:
            out += [
                "",
                "A dash marks a stage that neither the scorer nor the model assigned that night "
                "(it counts as F1 0 in that night's macro F1).",
            ]
    hypnogram_figures = figures.get("hypnograms", {})
    if hypnogram_figures:
        out += ["", "## Hypnograms (scored above, predicted below)", ""]
        for subject, rel in hypnogram_figures.items():
            out += [f"### {subject}", "", f"![hypnogram of {subject}]({rel})", ""]
    out += ["", "## Definitions", ""]
    out += [f"- **{k}**: {v}" for k, v in meta.get("definitions", {}).items()]
    return "\n".join(out).rstrip() + "\n"


DEFINITIONS = {
    "pooling": "every metric comes from one confusion matrix over all scored epochs "
    "(overall: all subjects pooled); never from averaging batches",
    "unscored": "epochs labelled -1 are excluded from every count",
    "zero_division": "a ratio with a zero denominator is 0 (scikit-learn zero_division=0)",
    "macro": "unweighted mean over all 5 stages, including stages absent from the night",
    "g_mean": "sqrt(macro sensitivity x macro specificity); "
    "per class sqrt(sensitivity x specificity)",
    "kappa": "Cohen's kappa; 1.0 when truth and prediction are both one and the same stage",
    "confusion_matrix": "rows: true stage, columns: predicted stage",
}


def write_report(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    hypnograms: Mapping[str, Hypnogram | tuple[Any, Any]] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, pathlib.Path]:
    """Writes report.json, report.md and the figures for one evaluation.

    Args:
      results: the dict from ``metrics.evaluate_subjects`` ("overall", "per_subject" and
        optionally "across_subjects").
      out_dir: folder to write into (created if needed; existing report files are replaced).
      hypnograms: subject -> ``Hypnogram`` (or a (true, predicted) pair of (epochs,) int arrays with
        30-s epochs); one figure per entry. Subjects without an entry get no hypnogram figure.
      metadata: JSON-able facts about the run (checkpoint, step, config, split, ...); stored under
        "metadata" with the creation time, package version and metric definitions.

    Returns:
      {"json": path, "markdown": path, "confusion_matrix": path, "hypnogram/<subject>": path, ...}.
    """
    for key in ("overall", "per_subject"):
        if key not in results:
            raise ValueError(f"results lack {key!r}; pass the dict from metrics.evaluate_subjects")
    out_dir = pathlib.Path(out_dir)
    written: dict[str, pathlib.Path] = {}

    # Check every input before writing anything, so a bad call leaves no half-made report.
    nights: dict[str, tuple[Hypnogram, str]] = {}
    seen_files: dict[str, str] = {}
    for subject in sorted(hypnograms or {}, key=str):
        night = hypnograms[subject]
        if not isinstance(night, Hypnogram):
            true, predicted = night
            try:
                night = Hypnogram(np.asarray(true), np.asarray(predicted))
            except DataError as err:
                raise DataError(f"hypnogram of {subject}", err.problem) from None
        name = _figure_name(str(subject))
        if name in seen_files:
            raise ValueError(f"subjects {seen_files[name]!r} and {subject!r} share figure {name}")
        seen_files[name] = str(subject)
        nights[str(subject)] = (night, f"hypnograms/{name}")
    user_metadata = json.loads(json.dumps(dict(metadata or {}), default=files.json_default))

    out_dir.mkdir(parents=True, exist_ok=True)
    written["confusion_matrix"] = plot_confusion_matrix(
        out_dir / "confusion_matrix.png", results["overall"]
    )
    figures: dict[str, Any] = {"confusion_matrix": "confusion_matrix.png", "hypnograms": {}}
    for subject, (night, rel) in nights.items():
        summary = results["per_subject"].get(subject)
        title = subject + (f"  ({metrics.summary_line(summary)})" if summary else "")
        written[f"hypnogram/{subject}"] = plot_hypnogram(
            out_dir / rel,
            night.predicted,
            true_stages=night.true,
            epoch_seconds=night.epoch_seconds,
            title=title,
        )
        figures["hypnograms"][subject] = rel

    report = dict(results)
    report["metadata"] = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eegkd_jax_version": eegkd_jax.__version__,
        "stages": list(STAGES),
        **user_metadata,
        "definitions": DEFINITIONS,
    }
    report["figures"] = figures
    written["json"] = files.write_json(out_dir / "report.json", report)
    written["markdown"] = files.write_atomic(
        out_dir / "report.md", _markdown(json.loads(written["json"].read_text())))
    return written

