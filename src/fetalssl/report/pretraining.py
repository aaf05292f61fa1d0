"""The report of a two-level sweep (fine-tuning over a pretraining sweep): results by pretraining setting.

Runs fine-tuned from a pretraining sweep carry `pretrain.<key>` grid keys (finetune/pretrain_sweep.py). Where
they vary, the report plots the metric against the pretraining setting (the patient share when it varies), one
line per init, label fraction and mode, and compares every setting with the largest one at equal label fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fetalssl.report.collect import RunRecord
from fetalssl.report.tables import format_fraction, varying_extra_keys

PREFIX = "pretrain."
SHARE_KEY = "pretrain.patient_fraction"


def pretraining_keys(records: Sequence[RunRecord]) -> list[str]:
    """The `pretrain.*` grid keys that vary across the runs (empty: not a two-level sweep)."""
    return [k for k in varying_extra_keys(records) if k.startswith(PREFIX)]


def setting_key(records: Sequence[RunRecord]) -> str:
    """The key to order pretraining settings by: the patient share when it varies, else the first varying one."""
    keys = pretraining_keys(records)
    return SHARE_KEY if SHARE_KEY in keys else keys[0]


def _tied_keys(records: Sequence[RunRecord], keys: Sequence[str], order_by: str) -> list[str]:
    """The setting key and the pretraining keys that change with it one to one (e.g. frames per video under a
    data budget); other varying pretraining keys (a pretraining seed) stay part of the comparison group."""
    tied = []
    for key in keys:
        pairs = {(str(r.grid.get(order_by)), str(r.grid.get(key))) for r in records}
        if len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}):
            tied.append(key)
    return tied


def _base(grid: Mapping[str, Any], keys: Sequence[str]) -> tuple:
    """What stays when the pretraining setting (`keys`), seed, fold, fraction and mode are taken away."""
    return tuple(sorted((k, str(v)) for k, v in grid.items()
                        if k not in keys and k not in ("seed", "fold", "fraction", "finetune_mode")))


def _order(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, int | float) else (1, 0.0, str(value))


def comparison_pairs(records: Sequence[RunRecord], labeller: Callable[[Mapping[str, Any]], str]) -> list[tuple[str, str]]:
    """(reference label, other label) for every pretraining setting against the largest one (by `setting_key`)
    of the same init, method and other grid keys."""
    order_by = setting_key(records)
    tied = _tied_keys(records, pretraining_keys(records), order_by)
    settings: dict[tuple, dict[str, Any]] = {}
    for record in records:
        settings.setdefault(_base(record.grid, tied), {})[labeller(record.grid)] = record.grid.get(order_by)
    pairs = []
    for labels in settings.values():
        ordered = sorted(labels, key=lambda label: _order(labels[label]))
        pairs += [(ordered[-1], other) for other in ordered[:-1]]
    return pairs


def metric_vs_pretraining_figure(records: Sequence[RunRecord], metric: str) -> Figure:
    """One panel per finetune mode: the metric (mean ± sample std over seeds and folds) against the pretraining
    setting, one line per init and label fraction."""
    keys, x_key = pretraining_keys(records), setting_key(records)
    values: dict[tuple, dict[Any, list[float]]] = {}
    for record in records:
        if metric in record.metrics:
            line = (str(record.grid["finetune_mode"]), _base(record.grid, keys), float(record.grid["fraction"]))
            values.setdefault(line, {}).setdefault(record.grid.get(x_key), []).append(record.metrics[metric])
    if not values:
        raise ValueError(f"no values for metric {metric!r} to plot")
    modes = sorted({mode for mode, _, _ in values})
    xs = sorted({x for points in values.values() for x in points}, key=_order)
    numeric = all(isinstance(x, int | float) for x in xs)
    fig = Figure(figsize=(5 * len(modes) + 2, 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False, sharey=True)[0]
    for ax, mode in zip(axes, modes, strict=True):
        for (line_mode, base, fraction), points in sorted(values.items()):
            if line_mode != mode:
                continue
            ordered = sorted(points, key=_order)
            position = [float(x) if numeric else xs.index(x) for x in ordered]
            means = [100 * float(np.mean(points[x])) for x in ordered]
            spread = [100 * float(np.std(points[x], ddof=1)) if len(points[x]) > 1 else 0.0 for x in ordered]
            name = dict(base).get("init", "?") + (f":{dict(base)['method']}" if dict(base).get("method") not in
                                                  (None, "None", "") else "")
            ax.errorbar(position, means, yerr=spread, marker="o", capsize=3,
                        label=f"{name}, {format_fraction(fraction)} labels")
        if not numeric:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(x_key.removeprefix(PREFIX).replace("_", " "))
        ax.set_title(f"finetune_mode={mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(f"{metric} (%)")
    return fig


def plot_metric_vs_pretraining(records: Sequence[RunRecord], metric: str, path) -> None:
    figure = metric_vs_pretraining_figure(records, metric)
    figure.savefig(path, dpi=120)
