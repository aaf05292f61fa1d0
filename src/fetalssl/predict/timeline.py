"""Per-frame probabilities -> smoothed timeline, labels (with optional abstention) and best frame per plane."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

OTHER = "other"  # label of frames whose top smoothed probability is under the abstention threshold


def smooth(probabilities: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` frames (odd; 1 = none). Near the ends, and in clips shorter than
    the window, it is cut to the frames that exist rather than padded, so no frame is pulled towards an
    invented value."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_window must be an odd number >= 1, got {window}")
    n = len(probabilities)
    if window == 1 or n == 0:
        return probabilities.copy()
    half = window // 2
    cumulative = np.concatenate([np.zeros((1, probabilities.shape[1])), np.cumsum(probabilities, axis=0)])
    start = np.clip(np.arange(n) - half, 0, n)
    stop = np.clip(np.arange(n) + half + 1, 0, n)
    return ((cumulative[stop] - cumulative[start]) / (stop - start)[:, None]).astype(probabilities.dtype)


def frame_labels(probabilities: np.ndarray, classes: Sequence[str], abstain_threshold: float | None) -> list[str]:
    """Arg-max class per frame; `other` where the top probability is below `abstain_threshold` (None: never)."""
    labels = [classes[i] for i in probabilities.argmax(axis=1)]
    if abstain_threshold is None:
        return labels
    return [OTHER if p < abstain_threshold else label for p, label in zip(probabilities.max(axis=1), labels,
                                                                          strict=True)]


@dataclass(frozen=True)
class BestFrame:
    plane: str
    frame: int
    score: float  # smoothed probability of `plane` at `frame`
    found: bool  # False when score is under the abstention threshold: the plane is probably not in the scan


def best_frames(probabilities: np.ndarray, classes: Sequence[str], found_threshold: float
                ) -> list[BestFrame]:
    """Per plane, the frame where its (smoothed) probability peaks (the first such frame on ties); the plane
    counts as found only if that peak reaches `found_threshold`."""
    best = probabilities.argmax(axis=0)
    return [BestFrame(plane, int(best[k]), float(probabilities[best[k], k]),
                      bool(probabilities[best[k], k] >= found_threshold))
            for k, plane in enumerate(classes)]


def timeline_figure(times: np.ndarray, time_label: str, probabilities: np.ndarray, classes: Sequence[str],
                    chosen: Sequence[BestFrame], abstain_threshold: float | None, title: str,
                    true_labels: Sequence[str] | None = None) -> Figure:
    """Probability of each plane vs time, chosen frames marked; true plane segments shaded when known. A single
    frame (a still, a 1-frame DICOM) has no timeline: its class probabilities are drawn as bars."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.add_subplot()
    colours = {c: f"C{i}" for i, c in enumerate(classes)}
    if len(probabilities) == 1:
        ax.bar(list(classes), probabilities[0], color=[colours[c] for c in classes])
        if abstain_threshold is not None:
            ax.axhline(abstain_threshold, color="grey", linestyle="--", linewidth=1)
        ax.set(ylabel="probability", ylim=(0, 1.05), title=f"{title}  (single frame)")
        return fig
    if true_labels is not None:
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0
        for t, label in zip(times, true_labels, strict=True):
            if label in colours:
                ax.axvspan(t - step / 2, t + step / 2, color=colours[label], alpha=0.12, linewidth=0)
    for k, plane in enumerate(classes):
        ax.plot(times, probabilities[:, k], color=colours[plane], label=plane, linewidth=1.5)
    for best in chosen:
        if best.found:
            ax.plot(times[best.frame], best.score, marker="v", markersize=9, color=colours[best.plane],
                    markeredgecolor="black")
            ax.annotate(best.plane, (times[best.frame], best.score), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    if abstain_threshold is not None:
        ax.axhline(abstain_threshold, color="grey", linestyle="--", linewidth=1, label="abstain below")
    if len(times) > 1:
        ax.set_xlim(times[0], times[-1])
    ax.set(xlabel=time_label, ylabel="smoothed probability", ylim=(0, 1.12),
           title=title + ("  (shaded: true plane)" if true_labels is not None else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return fig
