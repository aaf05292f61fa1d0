"""Aggregate runs over seeds and render results.csv / runs.csv / results.md."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fetalssl.report.collect import OBSERVED_GRID, RunRecord, SweepResults

# Grid keys with a fixed role in the tables; any other grid key that varies is appended to the row label.
ROLE_KEYS = ("init", "method", "fraction", "finetune_mode", "seed", "fold")
# "method" values meaning "no pretraining method" (random / imagenet baselines).
NO_METHOD = (None, "", "none", "null")
RESULTS_CSV_COLUMNS = ("init", "fraction", "mode", "metric", "mean", "std", "n", "n_folds")


@dataclass(frozen=True)
class Cell:
    """All seeds (and cross-validation folds) of one (init label, fraction, finetune mode) for one metric."""

    label: str
    fraction: float
    mode: str
    metric: str
    values: tuple[float, ...]
    folds: tuple[int | None, ...] = ()  # fold of each value (None: no cross-validation); empty: all None

    @property
    def n(self) -> int:
        return len(self.values)

    def fold_means(self) -> list[float]:
        """Mean over seeds within each fold, in fold order (one entry without cross-validation)."""
        folds = self.folds or (None,) * self.n
        by_fold: dict = {}
        for fold, value in zip(folds, self.values, strict=True):
            by_fold.setdefault(fold, []).append(value)
        return [float(np.mean(by_fold[f])) for f in sorted(by_fold, key=lambda f: -1 if f is None else f)]

    @property
    def n_folds(self) -> int:
        return len(self.fold_means())

    @property
    def mean(self) -> float:
        """Mean over folds of the per-fold seed means (the plain mean over seeds without folds)."""
        return float(np.mean(self.fold_means()))

    @property
    def std(self) -> float:
        """Sample std (ddof=1) over folds of the per-fold means when there are several folds (the fold spread),
        else over seeds; NaN for a single value, where it is undefined."""
        spread = self.fold_means() if self.n_folds > 1 else self.values
        return float(np.std(spread, ddof=1)) if len(spread) > 1 else math.nan


def varying_extra_keys(records: Iterable[RunRecord]) -> list[str]:
    """Grid keys outside ROLE_KEYS (backbone, ...) that take more than one value across the records."""
    records = list(records)
    keys = sorted({key for r in records for key in r.grid} - set(ROLE_KEYS))
    return [key for key in keys if len({str(r.grid.get(key)) for r in records}) > 1]


def make_labeller(records: Iterable[RunRecord]) -> Callable[[Mapping[str, Any]], str]:
    """Row label for a grid: "ssl:barlowtwins", "random", plus " (backbone=resnet50)" when backbones vary among
    the runs of that init. A key that differs only between inits (FetalCLIP's own backbone and normalisation
    beside the ResNets') separates no rows of one init, so it stays out of the label."""
    records = list(records)

    def base(grid: Mapping[str, Any]) -> str:
        text = str(grid["init"])
        if grid.get("method") not in NO_METHOD:
            text += f":{grid['method']}"
        return text

    by_base: dict[str, list[RunRecord]] = {}
    for record in records:
        by_base.setdefault(base(record.grid), []).append(record)
    extra_keys = sorted({key for group in by_base.values() for key in varying_extra_keys(group)})

    def label(grid: Mapping[str, Any]) -> str:
        text = base(grid)
        if extra_keys:
            text += " (" + ", ".join(f"{key}={grid.get(key)}" for key in extra_keys) + ")"
        return text

    return label


def aggregate(records: Sequence[RunRecord], metrics: Iterable[str] | None = None) -> list[Cell]:
    """Group successful runs by (label, fraction, mode) and collect each metric over seeds.

    ``metrics=None`` aggregates every metric found. Cells are sorted by mode, label, fraction, metric.
    """
    label = make_labeller(records)
    wanted = None if metrics is None else set(metrics)
    grouped: dict[tuple[str, float, str, str], list[tuple[float, int | None]]] = {}
    for record in records:
        key = (label(record.grid), float(record.grid["fraction"]), str(record.grid["finetune_mode"]))
        for metric, value in record.metrics.items():
            if wanted is None or metric in wanted:
                grouped.setdefault((*key, metric), []).append((value, record.grid.get("fold")))
    cells = [Cell(label=lab, fraction=frac, mode=mode, metric=metric, values=tuple(v for v, _ in pairs),
                  folds=tuple(f for _, f in pairs) if any(f is not None for _, f in pairs) else ())
             for (lab, frac, mode, metric), pairs in grouped.items()]
    return sorted(cells, key=lambda c: (c.mode, c.label, c.fraction, c.metric))


def write_results_csv(cells: Iterable[Cell], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(RESULTS_CSV_COLUMNS)
        for cell in cells:
            std = "" if math.isnan(cell.std) else repr(cell.std)
            writer.writerow([cell.label, repr(cell.fraction), cell.mode, cell.metric, repr(cell.mean), std, cell.n,
                             cell.n_folds])


def write_runs_csv(records: Sequence[RunRecord], root: Path, path: Path) -> None:
    """One row per successful run (grid + every metric) for statistics beyond mean ± std."""
    grid_keys = sorted({key for r in records for key in r.grid})
    metric_keys = sorted({key for r in records for key in r.metrics})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", *grid_keys, *metric_keys])
        for r in records:
            writer.writerow([_relative(r.path, root), *(r.grid.get(k, "") for k in grid_keys),
                             *(repr(r.metrics[k]) if k in r.metrics else "" for k in metric_keys)])


def format_fraction(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _format_cell(cell: Cell, bold: bool) -> str:
    text = f"{cell.mean * 100:.1f}" if cell.n == 1 else f"{cell.mean * 100:.1f} ± {cell.std * 100:.1f}"
    count = f"n={cell.n}" if cell.n_folds == 1 else f"{cell.n_folds} folds, n={cell.n}"
    return f"{f'**{text}**' if bold else text} ({count})"


LOWER_IS_BETTER = ("calibration.ece",)  # metric prefixes whose best mean is the lowest (calibration error)


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


def markdown_table(cells: Sequence[Cell]) -> str:
    """Rows = init label, columns = label fraction; best mean per column in bold (the highest, or the lowest for
    calibration error)."""
    labels = sorted({c.label for c in cells})
    fractions = sorted({c.fraction for c in cells})
    by_position = {(c.label, c.fraction): c for c in cells}
    best = {}
    for fraction in fractions:
        column = [c for c in cells if c.fraction == fraction]
        pick = min if column and lower_is_better(column[0].metric) else max
        best[fraction] = pick(c.mean for c in column) if len(column) > 1 else None
    lines = ["| init | " + " | ".join(format_fraction(f) for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for label in labels:
        row = []
        for fraction in fractions:
            cell = by_position.get((label, fraction))
            row.append("–" if cell is None else _format_cell(cell, bold=cell.mean == best[fraction]))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_results(cells: Sequence[Cell], metrics: Sequence[str]) -> str:
    """One table per metric and finetune mode, values in percent points, mean ± sample std over seeds."""
    parts = []
    for metric in metrics:
        metric_cells = [c for c in cells if c.metric == metric]
        for mode in sorted({c.mode for c in metric_cells}):
            mode_cells = [c for c in metric_cells if c.mode == mode]
            spread = ("over cross-validation folds: mean and sample std of the per-fold seed means (n runs)"
                      if any(c.n_folds > 1 for c in mode_cells) else "over seeds (n seeds)")
            parts.append(f"## {metric} — finetune_mode={mode}\n\n"
                         f"Percent points, mean ± sample std {spread}; best mean per column in bold"
                         f"{' (lowest: an error)' if lower_is_better(metric) else ''}.\n\n"
                         + markdown_table(mode_cells))
    return "\n\n".join(parts)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _describe_grid(grid: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in grid.items() if v is not None) or "grid unknown"


def _one_line(text: str, limit: int = 300) -> str:
    """Last non-empty line of an error (the exception message of a traceback), shortened."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _describe_source(source: str, root: Path) -> str:
    return f"`{_relative(Path(source), root)}`" if source != OBSERVED_GRID else "the observed grid values"


def markdown_problems(results: SweepResults) -> str:
    """The "Missing / failed runs" section: every run that did not contribute a number, and why."""
    root = results.root
    sections = [
        ("Failed runs (status \"failed\")",
         [f"`{_relative(r.path.parent, root)}` {_describe_grid(r.grid)}: {_one_line(r.error or 'no error given')}"
          for r in results.failed]),
        ("Incomplete runs (run dir without metrics.json: crashed, interrupted or still running)",
         [f"`{_relative(r.run_dir, root)}` " + (" ".join(r.overrides) or "overrides unknown")
          for r in results.incomplete]),
        ("Malformed metrics.json (skipped)",
         [f"`{_relative(m.path, root)}`: {_one_line(m.reason)}" for m in results.malformed]),
        ("Duplicate grid points (older metrics.json ignored)",
         [f"`{_relative(r.path, root)}` {_describe_grid(r.grid)}" for r in results.duplicates]),
        ("Missing grid points (expected, but no metrics.json)",
         [f"{_describe_grid(p.values)} (expected by {_describe_source(p.source, root)})"
          for p in results.missing_grid_points]),
    ]
    lines = ["## Missing / failed runs"]
    for title, items in sections:
        lines += ["", f"### {title}: {len(items)}"]
        if items:
            lines += [""] + [f"- {item}" for item in items]
    return "\n".join(lines)


def render_markdown(cells: Sequence[Cell], results: SweepResults, metrics: Sequence[str]) -> str:
    header = (f"# Fine-tuning results: {results.root}\n\n"
              f"{len(results.ok)} successful runs, {len(results.failed)} failed, "
              f"{len(results.incomplete)} incomplete, {len(results.malformed)} malformed, "
              f"{len(results.missing_grid_points)} missing grid points.")
    body = markdown_results(cells, metrics) or "No successful runs."
    return f"{header}\n\n{body}\n\n{markdown_problems(results)}\n"
