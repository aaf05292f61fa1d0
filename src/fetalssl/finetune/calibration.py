"""Calibration of a classifier's probabilities: expected calibration error (torchmetrics), the reliability
diagram's bins, and temperature scaling (Guo et al. 2017) fitted on the validation split only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int) -> float:
    """Top-label ECE: the mean over equal-width confidence bins of |accuracy - confidence|, weighted by the bin's
    share of the images; over the bins of :func:`reliability_bins`, so the diagram adds up to it. (torchmetrics'
    multiclass_calibration_error gives the same except that it keeps a confidence of exactly 1 in a bin of its
    own; the tests compare the two.)"""
    bins = reliability_bins(probs, targets, n_bins)
    return sum(b["count"] / len(targets) * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int) -> list[dict[str, float]]:
    """Per equal-width bin [lower, upper) of top-label confidence, as torchmetrics bins them (a confidence of
    exactly 1 joins the last bin here): its edges, the number of images, their mean confidence and their accuracy
    (NaN for an empty bin)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    which = (torch.bucketize(confidence, edges, right=True) - 1).clamp(max=n_bins - 1)
    bins = []
    for i in range(n_bins):
        inside = which == i
        count = int(inside.sum())
        bins.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": count,
                     "confidence": float(confidence[inside].double().mean()) if count else float("nan"),
                     "accuracy": float(correct[inside].mean()) if count else float("nan")})
    return bins


def fit_temperature(probs: Tensor, targets: Tensor) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(log(probs) / T) on these
    (validation) images. log(probs) are the logits up to a per-image constant, which softmax ignores."""
    logits = probs.double().clamp_min(1e-12).log()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimiser.step(nll)
    return float(log_t.detach().exp())


def scaled(probs: Tensor, temperature: float) -> Tensor:
    return torch.softmax(probs.double().clamp_min(1e-12).log() / temperature, dim=1).to(probs.dtype)


def calibration_report(val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], n_bins: int,
                       temperature_scaling: bool) -> dict[str, Any]:
    """metrics.json's `calibration`: test ECE and reliability bins; with temperature scaling, the temperature
    fitted on val and the test ECE and bins after it (predictions themselves do not change)."""
    (val_probs, val_targets), (test_probs, test_targets) = val, test
    report: dict[str, Any] = {"n_bins": n_bins, "ece": expected_calibration_error(test_probs, test_targets, n_bins),
                              "bins": reliability_bins(test_probs, test_targets, n_bins)}
    if temperature_scaling:
        temperature = fit_temperature(val_probs, val_targets)
        after = scaled(test_probs, temperature)
        report["temperature"] = temperature
        report["ece_scaled"] = expected_calibration_error(after, test_targets, n_bins)
        report["bins_scaled"] = reliability_bins(after, test_targets, n_bins)
    return report


def plot_reliability(report: dict[str, Any], path: Path) -> None:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and the ECE."""
    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.subplots()
    width = 1 / report["n_bins"]
    series = [("bins", "as trained", "C0")] + ([("bins_scaled", f"T = {report['temperature']:.2f}", "C1")]
                                              if "bins_scaled" in report else [])
    for key, label, colour in series:
        bins = [b for b in report[key] if b["count"]]
        ece = report["ece" if key == "bins" else "ece_scaled"]
        ax.bar([b["lower"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.5,
               color=colour, edgecolor=colour, label=f"{label} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="test reliability")
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=120)
