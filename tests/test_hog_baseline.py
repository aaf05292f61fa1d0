"""init=hog: the classical baseline runs through the same data, files and metrics as a network run."""

import csv
import json

from conftest import init_config
from fetalssl.finetune.run import run_finetune
from test_finetune import finetune_cfg, make_images


def test_hog_baseline_learns_a_hog_visible_pattern_and_writes_video_metrics(tmp_path):
    labels = make_images(tmp_path / "data", n_patients=6, per_class=2)
    rows = list(csv.DictReader(labels.open()))
    with labels.open("w", newline="") as f:  # two stills per (patient, class) = one "video"
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "video"])
        writer.writeheader()
        writer.writerows({**r, "video": f"{r['patient_id']}_{r['label']}"} for r in rows)
    cfg = finetune_cfg(labels)
    cfg.init = init_config("hog")
    result = run_finetune(cfg, tmp_path / "run")

    assert result["status"] == "ok" and result["features"] == "hog"
    assert result["grid"]["init"] == "hog" and result["grid"]["finetune_mode"] == "linear"
    # class = position of a bright vertical band: HOG + logistic regression separates it perfectly
    assert result["test"]["macro_f1"] == 1.0
    video_of = {r["image_path"]: f"{r['patient_id']}_{r['label']}" for r in rows}
    test_videos = {video_of[r["image_path"]] for r in csv.DictReader((tmp_path / "run" / "predictions.csv").open())}
    assert result["test_video"]["macro_f1"] == 1.0 and result["test_video"]["n_videos"] == len(test_videos) >= 5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"] == result["test"]
    for name in ("predictions.csv", "val_predictions.csv", "confusion_matrix.csv", "train_subset.csv"):
        assert (tmp_path / "run" / name).is_file()
