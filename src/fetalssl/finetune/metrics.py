"""Plane-classification metrics and the files a fine-tuning run leaves behind.

One metric definition (`metric_collection`) serves both the values logged during training and the summary
recomputed from predictions.csv, so metrics.json always agrees with the saved predictions:
- macro_f1: unweighted mean of per-class F1 (sklearn f1_score(average="macro"));
- balanced_accuracy: mean per-class recall (sklearn balanced_accuracy_score; every split holds every class);
- accuracy: share of correct predictions;
- per_class_f1: F1 of each class, by name.
Video level (labels CSV with a `video` column, e.g. frames from fetalssl-extract-frames): a video's class
probabilities are the mean of its frames', its label the (single) label of its frames; same metrics.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # object API: renders with Agg, never touches a display or pyplot state
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from fetalssl.data.splits import LabelledImage
from fetalssl.evaluation import mean_per_video

SCALAR_METRICS = ("macro_f1", "balanced_accuracy", "accuracy")


def metric_collection(num_classes: int) -> MetricCollection:
    return MetricCollection({
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro"),
        "accuracy": MulticlassAccuracy(num_classes, average="micro"),
        "per_class_f1": MulticlassF1Score(num_classes, average=None),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes),
    })


def summarize(computed: dict[str, torch.Tensor], classes: Sequence[str]) -> dict:
    """metrics.json section from a computed `metric_collection` (confusion matrix left out)."""
    summary = {name: float(computed[name]) for name in SCALAR_METRICS}
    summary["per_class_f1"] = {c: float(v) for c, v in zip(classes, computed["per_class_f1"], strict=True)}
    return summary


# ---- predictions.csv ------------------------------------------------------------------------------------
def prediction_columns(classes: Sequence[str]) -> list[str]:
    return ["image_path", "patient_id", "video", "label", "pred", *(f"prob_{c}" for c in classes)]


def write_predictions(path: Path, rows: Sequence[LabelledImage], targets: torch.Tensor, probs: torch.Tensor,
                      classes: Sequence[str], video_of: dict[str, str] | None = None) -> None:
    """One row per image: its patient and video (empty without a labels-CSV video column), true and predicted
    class names and the softmax probability of every class. Patient and video make the file enough on its own
    for patient-level resampling (fetalssl.report.bootstrap)."""
    if not len(rows) == len(targets) == len(probs):
        raise ValueError(f"{path}: {len(rows)} images, {len(targets)} labels, {len(probs)} predictions")
    preds = probs.argmax(1)
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(prediction_columns(classes))
        for image, target, pred, row in zip(rows, targets.tolist(), preds.tolist(), probs.tolist(), strict=True):
            video = "" if video_of is None else video_of.get(image.image_path, "")
            writer.writerow([image.image_path, image.patient_id, video, classes[target], classes[pred],
                             *(f"{p:.6g}" for p in row)])


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, preds) as class indices from a predictions.csv."""
    index = {c: i for i, c in enumerate(classes)}
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    targets = torch.tensor([index[r["label"]] for r in rows], dtype=torch.long)
    preds = torch.tensor([index[r["pred"]] for r in rows], dtype=torch.long)
    return targets, preds


def compute_metrics(targets: torch.Tensor, preds: torch.Tensor, classes: Sequence[str]) -> dict:
    """The metric collection's values for one set of predictions (tensors, confusion matrix included)."""
    collection = metric_collection(len(classes))
    collection.update(preds, targets)
    return collection.compute()


def video_labels(labels_csv: Path) -> dict[str, str] | None:
    """image_path -> video from a labels CSV, or None when it has no `video` column."""
    with Path(labels_csv).open(newline="") as f:
        reader = csv.DictReader(f)
        if "video" not in (reader.fieldnames or []):
            return None
        return {row["image_path"]: row["video"] for row in reader}


def video_metrics_from_predictions(path: Path, video_of: dict[str, str], classes: Sequence[str]) -> dict:
    """metrics.json section at video level: mean frame probabilities per video, argmax, same metrics."""
    index = {c: i for i, c in enumerate(classes)}
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [r["image_path"] for r in rows if r["image_path"] not in video_of]
    if missing:
        raise ValueError(f"{path}: {missing[0]} has no video in the labels CSV")
    names, _, targets, probs = mean_per_video(
        [video_of[r["image_path"]] for r in rows], np.array([index[r["label"]] for r in rows]),
        np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]), str(path))
    summary = summarize(compute_metrics(torch.from_numpy(targets), torch.from_numpy(probs.argmax(1)), classes),
                        classes)
    summary["n_videos"] = len(names)
    return summary


def metrics_from_predictions(path: Path, classes: Sequence[str]) -> tuple[dict, np.ndarray]:
    """(metrics.json section, confusion matrix rows=true, cols=pred) recomputed from a predictions.csv."""
    computed = compute_metrics(*read_predictions(path, classes), classes)
    return summarize(computed, classes), computed["confusion_matrix"].numpy()


# ---- confusion matrix -----------------------------------------------------------------------------------
def write_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], csv_path: Path, png_path: Path) -> None:
    """Counts with true classes as rows and predicted classes as columns, as CSV and as an annotated image."""
    with Path(csv_path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *classes])
        for name, row in zip(classes, matrix.tolist(), strict=True):
            writer.writerow([name, *row])
    fig = Figure(figsize=(1.2 * len(classes) + 1.5, 1.2 * len(classes) + 1))
    ax = fig.subplots()
    # Colour by row share so rare classes are as readable as common ones; the numbers are counts.
    shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
