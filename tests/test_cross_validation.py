"""Cross-validation: patient-grouped stratified folds (fine-tuning, extract-frames' fold column and per-round
pretraining manifests) and the report over folds (mean ± fold spread, the bootstrap pooled over folds)."""

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fetalssl.cli.report import main as report_main
from fetalssl.data.frames import extract_frames, pretrain_manifest_name
from fetalssl.data.splits import LabelledImage, fold_splits, grouped_folds
from fetalssl.finetune.metrics import metrics_from_predictions
from fetalssl.report.bootstrap import pooled_bootstrap, read_test_predictions
from fetalssl.report.collect import RunRecord
from fetalssl.report.tables import aggregate
from test_bootstrap import CLASSES, noisy_probs, write_run
from test_downstream import datamodule, make_images
from test_frames import read_csv, tiny_source  # noqa: F401  (tiny_source is a fixture)


def test_grouped_folds_keep_patients_together_cover_every_class_and_follow_the_seed():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(20)]
    groups = [p for p in patients for _ in range(rng.integers(1, 4))]
    labels = [int(g[1:]) % 3 for g in groups]
    folds = grouped_folds(labels, groups, 4, seed=0)
    fold_of_patient = defaultdict(set)
    for g, f in zip(groups, folds, strict=True):
        fold_of_patient[g].add(int(f))
    assert all(len(f) == 1 for f in fold_of_patient.values())
    assert {(int(f), c) for f, c in zip(folds, labels, strict=True)} == {(f, c) for f in range(4) for c in range(3)}
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 4  # equal shares, up to a patient's items
    assert np.array_equal(folds, grouped_folds(labels, groups, 4, seed=0))
    assert not np.array_equal(folds, grouped_folds(labels, groups, 4, seed=1))
    with pytest.raises(ValueError, match="only 20 patients"):
        grouped_folds(labels, groups, 21, seed=0)


def test_each_round_tests_its_fold_validates_on_the_next_and_trains_on_the_rest():
    folds = np.array([0, 1, 2, 0, 1, 2, 2])
    assert fold_splits(folds, 2, 3).tolist() == ["val", "train", "test", "val", "train", "test", "test"]
    assert fold_splits(folds, 0, 3).tolist() == ["test", "val", "train", "test", "val", "train", "train"]
    with pytest.raises(ValueError, match=r"data.fold=3"):
        fold_splits(folds, 3, 3)


def test_datamodule_folds_partition_the_patients_over_the_rounds(tmp_path):
    source = make_images(tmp_path, n_patients=10, per_class=1)
    test_patients, val_patients = [], []
    for fold in range(5):
        dm = datamodule(source, folds=5, fold=fold)
        dm.setup("fit")
        by_split = {s: {r.patient_id for r in dm.rows(s)} for s in ("train", "val", "test")}
        assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
        assert len(by_split["train"] | by_split["val"] | by_split["test"]) == 10
        test_patients.append(by_split["test"])
        val_patients.append(by_split["val"])
    assert val_patients[:-1] == test_patients[1:]  # round k validates on the fold that round k + 1 tests
    assert sorted(p for s in test_patients for p in s) == sorted(f"p{i}" for i in range(10))  # disjoint cover
    with pytest.raises(ValueError, match="set data.fold"):
        datamodule(source, folds=5, fold=None)


def test_a_fold_column_is_used_as_given_and_checked(tmp_path):
    source = make_images(tmp_path, n_patients=6, per_class=1)
    rows = list(csv.reader(source.open()))
    with source.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0] + ["fold"]] + [r + [str(int(r[2][1:]) % 3)] for r in rows[1:]])
    dm = datamodule(source, folds=3, fold=1)
    dm.setup("fit")
    assert {r.patient_id for r in dm.rows("test")} == {"p1", "p4"}
    assert {r.patient_id for r in dm.rows("val")} == {"p2", "p5"}
    with pytest.raises(ValueError, match=r"outside 0..1"):
        datamodule(source, folds=2, fold=0).setup("fit")


def test_extract_frames_writes_folds_and_a_pretraining_manifest_per_round(tiny_source, tmp_path):  # noqa: F811
    out = tmp_path / "prepared"
    extract_frames(tiny_source, out, stride=3, max_frames_per_video=2, short_side=16, val_fraction=0.25,
                   test_fraction=0.25, seed=0, subsets={}, folds=3)
    videos, frames = read_csv(out / "videos.csv"), read_csv(out / "labels.csv")
    patient_folds = defaultdict(set)
    for r in videos:
        patient_folds[r["patient_id"]].add(r["fold"])
    assert all(len(f) == 1 for f in patient_folds.values())
    frame_fold = {r["patient_id"]: r["fold"] for r in frames}
    assert frame_fold == {p: next(iter(f)) for p, f in patient_folds.items()}
    for k in range(3):
        pretrain = read_csv(out / pretrain_manifest_name(k))
        held_out = {str(k), str((k + 1) % 3)}  # round k's test and val folds
        assert {r["path"] for r in pretrain} == {r["path"] for r in videos if r["fold"] not in held_out}
        assert pretrain and all("license" in r for r in pretrain)


def _runs_for_fold(tmp_path: Path, fold: int, accuracy_a: float, accuracy_b: float):
    rows = [LabelledImage(Path(f"f{fold}_p{p}_{i}.png"), f"f{fold}_p{p}_{i}.png", CLASSES[p % 3], f"f{fold}p{p}",
                          "test", "labels.csv") for p in range(9) for i in range(3)]
    targets = torch.tensor([CLASSES.index(r.label) for r in rows])
    runs = {}
    for side, accuracy in (("a", accuracy_a), ("b", accuracy_b)):
        run_dir = tmp_path / f"fold{fold}" / side
        path = write_run(run_dir, rows, targets, noisy_probs(targets, accuracy, fold), None)
        runs[side] = read_test_predictions(path)
    return runs


def test_pooled_bootstrap_averages_the_folds_and_flags_folds_that_disagree(tmp_path):
    agree = [_runs_for_fold(tmp_path / "agree", k, 0.3, 0.9) for k in range(3)]
    pooled = pooled_bootstrap([([r["a"]], [r["b"]]) for r in agree], "macro_f1", 300)
    singles = [pooled_bootstrap([([r["a"]], [r["b"]])], "macro_f1", 10).observed for r in agree]
    assert pooled.observed == pytest.approx(np.mean(singles))
    assert pooled.fold_differences == pytest.approx(singles)
    assert pooled.fold_spread == pytest.approx(np.std(singles, ddof=1))
    assert pooled.n_patients == 27 and pooled.excludes_zero and not pooled.within_fold_spread
    disagree = [_runs_for_fold(tmp_path / "disagree", k, a, b) for k, (a, b) in enumerate([(0.2, 0.9), (0.9, 0.2)])]
    mixed = pooled_bootstrap([([r["a"]], [r["b"]]) for r in disagree], "macro_f1", 300)
    assert mixed.within_fold_spread and not mixed.excludes_zero


def test_report_aggregates_over_folds_and_compares_pooled(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    accuracy = {("hog", 0): 0.3, ("hog", 1): 0.5, ("ssl", 0): 0.9, ("ssl", 1): 0.8}
    scores = defaultdict(list)
    for fold in range(2):
        runs = _runs_for_fold(tmp_path / "src", fold, accuracy["hog", fold], accuracy["ssl", fold])
        for init, side in (("hog", "a"), ("ssl", "b")):
            for seed in range(3 if fold == 0 else 1):  # unequal seeds: folds weigh equally, not runs
                run_dir = sweep / f"{init}_f{fold}_s{seed}"
                rows = [LabelledImage(Path(k), k, CLASSES[int(t)], str(p), "test", "labels.csv")
                        for k, t, p in zip(runs[side].keys, runs[side].targets, runs[side].patients, strict=True)]
                probs = torch.tensor(runs[side].probs).roll(seed, dims=0) if seed else torch.tensor(runs[side].probs)
                write_run(run_dir, rows, torch.tensor(runs[side].targets), probs, None)
                test, _ = metrics_from_predictions(run_dir / "predictions.csv", CLASSES)
                scores[init, fold].append(test["macro_f1"])
                (run_dir / "metrics.json").write_text(json.dumps({
                    "status": "ok", "test": test, "grid": {"init": init, "method": None, "fraction": 0.1,
                                                           "finetune_mode": "linear", "seed": seed, "fold": fold}}))
    records = []
    for path in sorted(sweep.glob("*/metrics.json")):
        written = json.loads(path.read_text())
        records.append(RunRecord(path, "ok", written["grid"], {"test.macro_f1": written["test"]["macro_f1"]}))
    [hog, ssl] = aggregate(records, ["test.macro_f1"])
    fold_means = [np.mean(scores["hog", f]) for f in range(2)]
    assert hog.label == "hog" and hog.n == 4 and hog.n_folds == 2  # folds are averaged, not separate rows
    assert hog.mean == pytest.approx(np.mean(fold_means)) and hog.std == pytest.approx(np.std(fold_means, ddof=1))
    assert hog.mean != pytest.approx(np.mean([v for f in range(2) for v in scores["hog", f]]))
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--compare", "hog", "ssl", "--resamples", "200",
                        "--metric", "macro_f1"]) == 0
    printed = capsys.readouterr().out
    assert "2 folds, n=4" in printed and "over cross-validation folds" in printed
    assert "averaged over 2 cross-validation folds" in printed
    [row] = list(csv.DictReader((out / "comparisons.csv").open()))
    assert row["n_folds"] == "2" and row["n_runs_a"] == "4" and float(row["fold_spread"]) >= 0
    expected = np.mean([np.mean(scores["ssl", f]) - np.mean(scores["hog", f]) for f in range(2)])
    assert float(row["difference"]) == pytest.approx(expected)
