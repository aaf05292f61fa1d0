"""Video-level metrics: a video's prediction is the argmax of its frames' mean probabilities."""

import csv

import pytest
import torch

from fetalssl.data.splits import LabelledImage
from fetalssl.finetune.metrics import video_labels, video_metrics_from_predictions, write_predictions

CLASSES = ["a", "b"]


def test_video_prediction_is_the_mean_of_its_frames(tmp_path):
    # video v1 (label a): frames lean b, a, a strongly -> mean says a; video v2 (label b): mean says a (wrong).
    paths = ["v1_0.png", "v1_1.png", "v1_2.png", "v2_0.png", "v2_1.png"]
    targets = torch.tensor([0, 0, 0, 1, 1])
    probs = torch.tensor([[0.4, 0.6], [0.9, 0.1], [0.9, 0.1], [0.45, 0.55], [0.8, 0.2]])
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "label", "patient_id", "video"])
        writer.writerows([p, CLASSES[int(t)], "p", p.split("_")[0]] for p, t in zip(paths, targets, strict=True))
    video_of = video_labels(tmp_path / "labels.csv")
    rows = [LabelledImage(tmp_path / p, p, CLASSES[int(t)], f"patient_{p[:2]}", None, "labels.csv")
            for p, t in zip(paths, targets, strict=True)]
    write_predictions(tmp_path / "predictions.csv", rows, targets, probs, CLASSES, video_of)
    written = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [(r["patient_id"], r["video"]) for r in written] == [(f"patient_{p[:2]}", p[:2]) for p in paths]
    metrics = video_metrics_from_predictions(tmp_path / "predictions.csv", video_of, CLASSES)
    assert metrics["n_videos"] == 2
    assert metrics["accuracy"] == pytest.approx(0.5)  # v1 right, v2 wrong
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["per_class_f1"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(0.0)}


def test_labels_without_a_video_column_give_no_video_metrics(tmp_path):
    (tmp_path / "labels.csv").write_text("image_path,label,patient_id\nx.png,a,p\n")
    assert video_labels(tmp_path / "labels.csv") is None
