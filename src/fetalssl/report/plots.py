"""Figures for a sweep report: metric vs label fraction, and a grid of seed-summed confusion matrices.

Figures are built with matplotlib's object API (``Figure``, rendered by Agg on save) so the report never
touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from fetalssl.report.collect import RunRecord
from fetalssl.report.tables import Cell, format_fraction

logger = logging.getLogger(__name__)

CONFUSION_FILE = "confusion_matrix.csv"
# Above this many classes the per-cell percentages become unreadable; colour alone carries the panel.
MAX_ANNOTATED_CLASSES = 10


def plot_metric_vs_fraction(cells: Sequence[Cell], metric: str, path: Path) -> None:
    metric_vs_fraction_figure(cells, metric).savefig(path, dpi=120)


def metric_vs_fraction_figure(cells: Sequence[Cell], metric: str) -> Figure:
    """One panel per finetune mode; one line per init label, mean ± sample std over seeds; log x axis."""
    cells = [c for c in cells if c.metric == metric]
    if not cells:
        raise ValueError(f"no values for metric {metric!r} to plot")
    modes = sorted({c.mode for c in cells})
    fractions = sorted({c.fraction for c in cells})
    labels = sorted({c.label for c in cells})
    # One style per init across all panels (an init may be missing from a mode, e.g. hog from full): ten
    # colours, then the same colours with another marker and line style, so every init of a grid over all
    # methods (15 and more) stays distinct.
    style = {label: line_style(i) for i, label in enumerate(labels)}
    fig = Figure(figsize=(4.5 * len(modes) + 1.5, 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False, sharey=True)[0]
    handles = {}
    for ax, mode in zip(axes, modes, strict=True):
        mode_cells = [c for c in cells if c.mode == mode]
        for label in sorted({c.label for c in mode_cells}):
            line = sorted((c for c in mode_cells if c.label == label), key=lambda c: c.fraction)
            handles[label] = ax.errorbar([c.fraction for c in line], [c.mean * 100 for c in line],
                                         yerr=[0.0 if math.isnan(c.std) else c.std * 100 for c in line],
                                         capsize=3, label=label, **style[label])
        ax.set_xscale("log")
        ax.set_xticks(fractions, [format_fraction(f) for f in fractions])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("labelled fraction")
        ax.set_title(f"finetune_mode={mode}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"{metric} (%)")
    fig.legend([handles[label] for label in labels], labels, loc="outside right upper", fontsize="small")
    return fig


LINE_STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))


def line_style(index: int) -> dict[str, str]:
    """Colour, marker and line style of the ``index``-th line: distinct for the first 40."""
    marker, linestyle = LINE_STYLES[(index // 10) % len(LINE_STYLES)]
    return {"color": f"C{index % 10}", "marker": marker, "linestyle": linestyle}


def read_confusion_matrix(path: Path) -> tuple[list[str], np.ndarray]:
    """Read confusion_matrix.csv: header = class names, rows = true class, columns = predicted class.

    Accepts an optional leading column of row class names (as pandas' to_csv writes it).
    """
    with open(path, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header and at least one row")
    header, body = rows[0], rows[1:]
    n = len(body)
    width = len(body[0])
    if width not in (n, n + 1):
        raise ValueError(f"{path}: {n} rows but {width} columns, not a square matrix")
    has_row_names = width == n + 1
    row_names, matrix = [], []
    for line_no, row in enumerate(body, start=2):
        if len(row) != width:
            raise ValueError(f"{path}: row {line_no} has {len(row)} columns, expected {width}")
        if has_row_names:
            row_names.append(row[0])
            row = row[1:]
        try:
            matrix.append([float(v) for v in row])
        except ValueError as exc:
            raise ValueError(f"{path}: row {line_no}: {exc}") from exc
    classes = header[1:] if len(header) == n + 1 else header
    if len(classes) != n:
        raise ValueError(f"{path}: header names {len(header)} classes for a {n}x{n} matrix")
    if has_row_names and row_names != classes:
        raise ValueError(f"{path}: row classes {row_names} differ from column classes {classes}")
    return classes, np.asarray(matrix)


@dataclass(frozen=True)
class SummedConfusion:
    classes: tuple[str, ...]
    matrix: np.ndarray  # counts summed over runs; rows true, columns predicted
    n_runs: int


def _in_class_order(classes: list[str], matrix: np.ndarray, order: Sequence[str]) -> np.ndarray | None:
    """Reorder a matrix to ``order``; None when the class sets differ (cannot be summed)."""
    if sorted(classes) != sorted(order):
        return None
    index = [classes.index(name) for name in order]
    return matrix[np.ix_(index, index)]


def sum_confusions(
    records: Iterable[RunRecord],
    label: Callable[[Mapping[str, Any]], str],
    fractions: Iterable[float] | None = None,
) -> dict[tuple[str, float, str], SummedConfusion]:
    """Sum each run's confusion_matrix.csv over seeds per (label, fraction, mode), optionally some fractions only.

    Runs without a readable matrix, or with a different class set than the rest of their cell, are
    skipped with a warning.
    """
    keep = None if fractions is None else {float(f) for f in fractions}
    sums: dict[tuple[str, float, str], SummedConfusion] = {}
    for record in records:
        fraction = float(record.grid["fraction"])
        if keep is not None and not any(math.isclose(fraction, f) for f in keep):
            continue
        path = record.out_dir / CONFUSION_FILE
        if not path.is_file():
            logger.warning("%s: no %s, left out of the confusion grid", record.out_dir, CONFUSION_FILE)
            continue
        try:
            classes, matrix = read_confusion_matrix(path)
        except (OSError, ValueError) as exc:
            logger.warning("skipped confusion matrix: %s", exc)
            continue
        key = (label(record.grid), fraction, str(record.grid["finetune_mode"]))
        if key not in sums:
            sums[key] = SummedConfusion(tuple(classes), matrix, 1)
            continue
        total = sums[key]
        ordered = _in_class_order(classes, matrix, total.classes)
        if ordered is None:
            logger.warning("%s: classes %s differ from %s in the same cell, skipped", path, classes, total.classes)
            continue
        sums[key] = SummedConfusion(total.classes, total.matrix + ordered, total.n_runs + 1)
    return sums


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix, dtype=float), where=totals > 0)


def plot_confusion_grid(confusions: Mapping[tuple[str, float, str], SummedConfusion], path: Path) -> None:
    """Rows = init label, columns = (mode, fraction); each panel row-normalised (per-class recall)."""
    if not confusions:
        raise ValueError("no confusion matrices to plot")
    labels = sorted({label for label, _, _ in confusions})
    columns = sorted({(mode, fraction) for _, fraction, mode in confusions})
    size = 2.6
    fig = Figure(figsize=(size * len(columns) + 1.0, size * len(labels) + 0.5), layout="constrained")
    axes = fig.subplots(len(labels), len(columns), squeeze=False)
    image = None
    for i, label in enumerate(labels):
        for j, (mode, fraction) in enumerate(columns):
            ax = axes[i][j]
            summed = confusions.get((label, fraction, mode))
            if summed is None:
                ax.set_axis_off()
                continue
            recall = _row_normalised(summed.matrix)
            image = ax.imshow(recall, vmin=0, vmax=1, cmap="Blues")
            n_classes = len(summed.classes)
            if n_classes <= MAX_ANNOTATED_CLASSES:
                for r in range(n_classes):
                    for c in range(n_classes):
                        ax.text(c, r, f"{recall[r, c] * 100:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if recall[r, c] > 0.5 else "black")
            ticks = range(n_classes)
            ax.set_xticks(ticks, summed.classes, rotation=90, fontsize=6)
            ax.set_yticks(ticks, summed.classes, fontsize=6)
            ax.set_title(f"{mode} · {format_fraction(fraction)} ({summed.n_runs} runs)", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{label}\ntrue", fontsize=7)
            if i == len(labels) - 1:
                ax.set_xlabel("predicted", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of true class")
    fig.savefig(path, dpi=120)
