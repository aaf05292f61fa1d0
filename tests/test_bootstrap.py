"""Paired patient bootstrap (fetalssl.report.bootstrap) and `fetalssl-report --compare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fetalssl.cli.report import main
from fetalssl.data.splits import LabelledImage
from fetalssl.finetune.metrics import (
    metrics_from_predictions,
    video_metrics_from_predictions,
    write_predictions,
)
from fetalssl.report.bootstrap import (
    balanced_accuracy,
    macro_f1,
    paired_bootstrap,
    per_video,
    read_test_predictions,
)

CLASSES = ["regular", "pneumonia", "covid"]


def test_scores_match_sklearn_including_absent_classes():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        targets, preds = rng.integers(0, 2, 30), rng.integers(0, 3, 30)  # class 2 predicted, never true
        assert macro_f1(targets, preds, 3) == pytest.approx(f1_score(targets, preds, average="macro"))
        assert balanced_accuracy(targets, preds, 3) == pytest.approx(
            np.mean([np.mean(preds[targets == c] == c) for c in np.unique(targets)]))
        if set(preds) <= set(targets):
            assert balanced_accuracy(targets, preds, 3) == pytest.approx(balanced_accuracy_score(targets, preds))


def make_test_set(n_patients: int = 8, videos_per_patient: int = 2, frames_per_video: int = 5):
    rows, video_of = [], {}
    for p in range(n_patients):
        for v in range(videos_per_patient):
            label = CLASSES[(p + v) % len(CLASSES)]
            for f in range(frames_per_video):
                path = f"frames/{label}/p{p}_v{v}_f{f}.png"
                rows.append(LabelledImage(Path(path), path, label, f"p{p}", "test", "labels.csv"))
                video_of[path] = f"p{p}_v{v}"
    targets = torch.tensor([CLASSES.index(r.label) for r in rows])
    return rows, targets, video_of


def write_run(path: Path, rows, targets, probs, video_of) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_predictions(path / "predictions.csv", rows, targets, probs, CLASSES, video_of)
    return path / "predictions.csv"


def noisy_probs(targets: torch.Tensor, accuracy: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(len(targets), len(CLASSES), generator=g)
    right = torch.rand(len(targets), generator=g) < accuracy
    probs[right, targets[right]] += 1.0
    return probs / probs.sum(1, keepdim=True)


def test_observed_difference_is_the_difference_of_the_seed_means_in_metrics_json(tmp_path):
    rows, targets, video_of = make_test_set()
    paths = {(side, seed): write_run(tmp_path / f"{side}{seed}", rows, targets,
                                     noisy_probs(targets, 0.4 if side == "a" else 0.7, seed + 10 * (side == "b")),
                                     video_of)
             for side in "ab" for seed in range(3)}
    runs = {key: read_test_predictions(path) for key, path in paths.items()}
    for score in ("macro_f1", "balanced_accuracy"):
        frame = paired_bootstrap([runs["a", s] for s in range(3)], [runs["b", s] for s in range(3)], score, 200)
        saved = {key: metrics_from_predictions(path, CLASSES)[0][score] for key, path in paths.items()}
        expected = np.mean([saved["b", s] for s in range(3)]) - np.mean([saved["a", s] for s in range(3)])
        assert frame.observed == pytest.approx(expected, abs=1e-6)  # metrics.json: float32 torchmetrics
        assert frame.low <= frame.observed <= frame.high and frame.n_patients == 8

        video = paired_bootstrap([per_video(runs["a", s]) for s in range(3)],
                                 [per_video(runs["b", s]) for s in range(3)], score, 200)
        saved = {key: video_metrics_from_predictions(path, video_of, CLASSES)[score] for key, path in paths.items()}
        expected = np.mean([saved["b", s] for s in range(3)]) - np.mean([saved["a", s] for s in range(3)])
        assert video.observed == pytest.approx(expected, abs=1e-6)  # metrics.json: float32 torchmetrics


def test_identical_runs_differ_by_exactly_zero(tmp_path):
    rows, targets, video_of = make_test_set()
    run = read_test_predictions(write_run(tmp_path, rows, targets, noisy_probs(targets, 0.5, 0), video_of))
    difference = paired_bootstrap([run], [run], "macro_f1", 100)
    assert (difference.observed, difference.low, difference.high) == (0, 0, 0)
    assert not difference.excludes_zero


def test_resampling_is_by_patient_not_by_frame(tmp_path):
    """B beats A only on patient p0's 10 frames. Resampling frames would almost never lose all 10 of them;
    resampling patients leaves p0 out about a third of the time, so the interval reaches down to 0."""
    rows, targets, video_of = make_test_set(n_patients=8)
    probs_b = torch.nn.functional.one_hot(targets, len(CLASSES)).float()
    probs_a = probs_b.clone()
    on_p0 = torch.tensor([r.patient_id == "p0" for r in rows])
    probs_a[on_p0] = probs_a[on_p0].roll(1, dims=1)  # A is wrong on p0 only
    a = read_test_predictions(write_run(tmp_path / "a", rows, targets, probs_a, video_of))
    b = read_test_predictions(write_run(tmp_path / "b", rows, targets, probs_b, video_of))
    difference = paired_bootstrap([a], [b], "balanced_accuracy", 2000)
    assert difference.observed > 0.1 and difference.high > 0.1
    assert difference.low == 0 and not difference.excludes_zero


def test_clear_difference_excludes_zero_and_mismatched_runs_are_refused(tmp_path):
    rows, targets, video_of = make_test_set(n_patients=12)
    a = read_test_predictions(write_run(tmp_path / "a", rows, targets, noisy_probs(targets, 0.0, 1), video_of))
    b = read_test_predictions(write_run(tmp_path / "b", rows, targets, noisy_probs(targets, 1.0, 2), video_of))
    difference = paired_bootstrap([a], [b], "macro_f1", 500)
    assert difference.excludes_zero and difference.low > 0.3
    other = read_test_predictions(write_run(tmp_path / "c", rows[::-1], targets.flip(0),
                                            noisy_probs(targets, 1.0, 3), video_of))
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap([a], [other], "macro_f1", 10)


def test_old_predictions_without_patients_are_refused(tmp_path):
    (tmp_path / "predictions.csv").write_text("image_path,label,pred,prob_a\nx.png,a,a,1\n")
    with pytest.raises(ValueError, match="patient_id"):
        read_test_predictions(tmp_path / "predictions.csv")


def test_report_compare_writes_intervals(tmp_path, capsys):
    rows, targets, video_of = make_test_set()
    for init, mode, accuracy in (("hog", "linear", 0.3), ("random", "linear", 0.9), ("random", "full", 0.6)):
        for seed in range(2):
            run_dir = tmp_path / "sweep" / f"{init}_{mode}_{seed}"
            write_run(run_dir, rows, targets, noisy_probs(targets, accuracy, seed + 5 * (init == "random")), video_of)
            test, _ = metrics_from_predictions(run_dir / "predictions.csv", CLASSES)
            video = video_metrics_from_predictions(run_dir / "predictions.csv", video_of, CLASSES)
            (run_dir / "metrics.json").write_text(json.dumps({
                "status": "ok", "test": test, "test_video": video,
                "grid": {"init": init, "method": None, "fraction": 0.1, "finetune_mode": mode, "seed": seed}}))
    out = tmp_path / "report"
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--compare", "hog", "random",
                 "--compare", "hog@linear", "random@full", "--resamples", "300",
                 "--metric", "macro_f1", "test_video.macro_f1"]) == 0
    printed = capsys.readouterr().out
    assert "## random minus hog — finetune_mode=linear" in printed  # hog has no full runs: linear only
    assert "## random (finetune_mode=full) minus hog (finetune_mode=linear)" in printed
    with (out / "comparisons.csv").open() as f:
        compared = {(r["mode_b"], r["metric"]): r for r in csv.DictReader(f)}
    assert set(compared) == {(mode, metric) for mode in ("linear", "full")
                             for metric in ("test.macro_f1", "test_video.macro_f1")}
    assert float(compared["linear", "test.macro_f1"]["low"]) > 0  # 0.9 vs 0.3 accuracy: a clear difference
    assert compared["linear", "test.macro_f1"]["n_runs_a"] == "2"
    full = compared["full", "test.macro_f1"]
    assert float(full["difference"]) < float(compared["linear", "test.macro_f1"]["difference"])

    assert main([str(tmp_path / "sweep"), "--out", str(out), "--compare", "hog", "ssl:byol"]) == 2
    assert "ssl:byol" in capsys.readouterr().err
    assert main([str(tmp_path / "sweep"), "--out", str(out), "--compare", "hog@full", "random"]) == 2
    assert "no label fraction where both have runs" in capsys.readouterr().err


def test_patients_are_resampled_within_their_class(tmp_path):
    """The only covid patient is in every resample: A, wrong on that patient alone, always scores lower (an
    unstratified draw would leave the patient out about a third of the time, and the interval would touch 0)."""
    labels = {"p0": "covid", **{f"p{i}": CLASSES[i % 2] for i in range(1, 9)}}
    rows = [LabelledImage(Path(f"{p}_{f}.png"), f"{p}_{f}.png", label, p, "test", "labels.csv")
            for p, label in labels.items() for f in range(4)]
    targets = torch.tensor([CLASSES.index(r.label) for r in rows])
    probs_b = torch.nn.functional.one_hot(targets, len(CLASSES)).float()
    probs_a = probs_b.clone()
    on_p0 = torch.tensor([r.patient_id == "p0" for r in rows])
    probs_a[on_p0] = probs_a[on_p0].roll(1, dims=1)
    a = read_test_predictions(write_run(tmp_path / "a", rows, targets, probs_a, None))
    b = read_test_predictions(write_run(tmp_path / "b", rows, targets, probs_b, None))
    difference = paired_bootstrap([a], [b], "balanced_accuracy", 500)
    assert difference.low == pytest.approx(1 / 3) == pytest.approx(difference.high)
