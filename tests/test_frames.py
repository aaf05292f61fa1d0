"""fetalssl-extract-frames: patient-grouped split, pretraining manifest, strided frames, carried columns."""

import csv
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from fetalssl.data.frames import extract_frames, read_video_manifest, split_videos, thin_evenly
from fetalssl.data.index import read_manifest
from test_video import frame_value, pocus_rows, write_video

LABELS = ("a", "b", "c")
N_FRAMES = 20


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    """12 videos of 9 patients (patients p0-p2 have two videos each), three labels, a licence per video."""
    root = tmp_path_factory.mktemp("source")
    rows = []
    for v in range(12):
        patient = f"p{v % 9}"
        label = LABELS[v % 3]
        name = f"videos/{label} clip ({v}).mp4"  # spaces and brackets, as in real manifests
        write_video(root / name, n_frames=N_FRAMES, size=(32, 40))
        rows.append({"path": name, "label": label, "patient_id": patient, "license": f"CC BY {v}",
                     "origin_url": f"http://example.org/{v}"})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def extracted(tiny_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    summary = extract_frames(tiny_source, out, stride=3, max_frames_per_video=4, short_side=16, val_fraction=0.25,
                             test_fraction=0.25, seed=0, subsets={"ab": ["a", "b"]}, folds=None)
    assert summary.videos == 12 and summary.frames == 12 * 4 and not summary.skipped
    return out


def test_no_patient_is_in_two_splits_and_every_split_has_every_label(extracted):
    videos = read_csv(extracted / "videos.csv")
    frames = read_csv(extracted / "labels.csv")
    for rows in (videos, frames):
        splits_of = defaultdict(set)
        for r in rows:
            splits_of[r["patient_id"]].add(r["split"])
        assert all(len(s) == 1 for s in splits_of.values()), splits_of
    assert {(r["split"], r["label"]) for r in videos} == {(s, c) for s in ("train", "val", "test") for c in LABELS}
    split_of_video = {r["path"]: r["split"] for r in read_csv(extracted / "videos.csv")}
    assert len(split_of_video) == 12


def test_pretrain_manifest_holds_only_training_videos_and_reads_as_a_video_manifest(extracted, tiny_source):
    videos = read_csv(extracted / "videos.csv")
    pretrain = read_csv(extracted / "pretrain_manifest.csv")
    assert pretrain == [r for r in videos if r["split"] == "train"]
    records = read_manifest(extracted / "pretrain_manifest.csv", "unused")
    assert all(r.path.is_file() for r in records)  # paths relative to the derived manifest's folder
    assert {r.patient_id for r in records} == {r["patient_id"] for r in pretrain}


def test_labels_and_licence_columns_are_carried(extracted, tiny_source):
    source = {r["path"]: r for r in read_csv(tiny_source)}
    frames = read_csv(extracted / "labels.csv")
    assert list(frames[0])[:6] == ["image_path", "label", "patient_id", "split", "video", "frame"]
    for r in frames:
        origin = source[r["video"]]
        assert (r["label"], r["patient_id"], r["license"], r["origin_url"]) == (
            origin["label"], origin["patient_id"], origin["license"], origin["origin_url"])
    for r in read_csv(extracted / "pretrain_manifest.csv"):
        assert r["license"].startswith("CC BY") and r["origin_url"].startswith("http://example.org/")
    subset = read_csv(extracted / "labels_ab.csv")
    assert subset == [r for r in frames if r["label"] in ("a", "b")]


def test_stride_is_respected_and_frames_are_the_right_ones(extracted):
    frames = read_csv(extracted / "labels.csv")
    by_video = defaultdict(list)
    for r in frames:
        by_video[r["video"]].append(int(r["frame"]))
    # 20 frames, stride 3 -> 0,3,...,18 (7 frames), evenly thinned to 4 -> positions 0,2,4,6
    assert all(sorted(f) == [0, 6, 12, 18] for f in by_video.values())
    for r in frames[:8]:
        image = cv2.imread(str(extracted / r["image_path"]), cv2.IMREAD_GRAYSCALE)
        assert min(image.shape) == 16
        assert abs(float(np.median(image)) - frame_value(int(r["frame"]))) <= 4  # lossy codec


def test_split_is_fixed_by_the_seed(tiny_source):
    rows, _ = read_video_manifest(tiny_source)
    assert split_videos(rows, 0.25, 0.25, seed=0) == split_videos(rows, 0.25, 0.25, seed=0)


def test_thin_evenly_keeps_ends_and_caps_the_count():
    assert thin_evenly(3, 5) == [0, 1, 2]
    assert thin_evenly(7, 4) == [0, 2, 4, 6]
    assert len(thin_evenly(100, 12)) == 12 and thin_evenly(100, 12)[-1] == 99


def test_bad_manifest_names_the_missing_column(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nx.mp4,a\n")
    with pytest.raises(ValueError, match=r"m.csv: missing column\(s\) \['patient_id'\]"):
        read_video_manifest(tmp_path / "m.csv")


def test_real_pocus_split_is_grouped_by_patient():
    rows = pocus_rows()  # skips when the shared data folder is absent
    splits = split_videos(rows, 0.15, 0.2, seed=0)
    splits_of = defaultdict(set)
    for r, s in zip(rows, splits, strict=True):
        splits_of[r["patient_id"]].add(s)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {(s, r["label"]) for r, s in zip(rows, splits, strict=True)} == {
        (s, c) for s in ("train", "val", "test") for c in ("regular", "pneumonia", "covid", "viral")}
    assert 15 <= splits.count("test") <= 35  # about 25 test videos
