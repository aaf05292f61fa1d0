"""From a labelled video manifest to what pretraining and fine-tuning read: a patient split, a pretraining
manifest of the training patients' videos, and strided frames as PNG with a labels CSV.

Input: a CSV with at least `path` (relative to the CSV's folder), `label` and `patient_id`, one row per video;
any other column (licence, origin, probe ...) is carried into every derived file. Output folder:
- videos.csv: every source row, `path` rewritten relative to the output folder, plus `split`;
- pretrain_manifest.csv: the rows of the training split only (what `data.manifest` of fetalssl-train reads),
  so SSL pretraining never sees a validation or test patient;
- with `folds=K` (cross-validation): a `fold` column in videos.csv and labels.csv (patient-grouped,
  label-stratified folds over videos) and pretrain_manifest_fold<k>.csv per round k: the videos of round k's
  training folds only (fine-tuning's `data.folds=K data.fold=k` makes fold k test and fold (k+1) % K val);
- frames/<label>/<video n>_<video stem>_f<frame>.png: every `stride`-th frame of each video (evenly thinned to
  at most `max_frames_per_video`), grayscale, short side resized to `short_side`;
- labels.csv: image_path,label,patient_id,split,video,frame + the carried columns (fetalssl-finetune's input;
  `video` = the source path, so predictions can be pooled per video); labels_<name>.csv for each subset of
  classes in `subsets` (e.g. the three large classes).
The split is patient-grouped and label-stratified over videos (data.splits.grouped_split) with a fixed seed:
a patient's videos, hence frames, are all in one split.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fetalssl.data.splits import SPLITS, fold_splits, grouped_folds, grouped_split
from fetalssl.data.video import VideoReadError, read_frames

log = logging.getLogger(__name__)

REQUIRED_VIDEO_COLUMNS = ("path", "label", "patient_id")
FRAME_COLUMNS = ("image_path", "label", "patient_id", "split", "video", "frame")
VIDEOS_CSV = "videos.csv"
PRETRAIN_MANIFEST = "pretrain_manifest.csv"
LABELS_CSV = "labels.csv"
FRAMES_DIR = "frames"


@dataclass(frozen=True)
class ExtractionSummary:
    videos: int
    frames: int
    skipped: tuple[str, ...]  # "<path>: <reason>" for videos that could not be decoded
    patients_per_split: dict[str, int]
    videos_per_split: dict[str, int]

    def __str__(self) -> str:
        return (f"{self.videos} videos -> {self.frames} frames; patients per split {self.patients_per_split}, "
                f"videos per split {self.videos_per_split}; {len(self.skipped)} skipped")


def read_video_manifest(manifest: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """(rows, column names) of a video manifest; every row must name a path, a label and a patient."""
    manifest = Path(manifest)
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in REQUIRED_VIDEO_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {missing}; found {columns}")
        rows = []
        for row in reader:
            empty = [c for c in REQUIRED_VIDEO_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{manifest}, row {reader.line_num}: empty {empty}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{manifest}: no rows")
    return rows, columns


def _label_indices(rows: Sequence[Mapping[str, str]]) -> np.ndarray:
    labels = sorted({r["label"] for r in rows})
    return np.array([labels.index(r["label"]) for r in rows])


def split_videos(rows: Sequence[Mapping[str, str]], val_fraction: float, test_fraction: float,
                 seed: int) -> list[str]:
    """Split name per video: grouped by patient, stratified by label over videos."""
    return grouped_split(_label_indices(rows), [r["patient_id"] for r in rows], val_fraction, test_fraction,
                         seed).tolist()


def fold_videos(rows: Sequence[Mapping[str, str]], folds: int, seed: int) -> list[int]:
    """Cross-validation fold per video: grouped by patient, stratified by label over videos."""
    return grouped_folds(_label_indices(rows), [r["patient_id"] for r in rows], folds, seed).tolist()


def pretrain_manifest_name(fold: int | None) -> str:
    """pretrain_manifest.csv, or pretrain_manifest_fold<k>.csv for cross-validation round k."""
    return PRETRAIN_MANIFEST if fold is None else f"pretrain_manifest_fold{fold}.csv"


def thin_evenly(n: int, max_count: int) -> list[int]:
    """Positions 0..n-1, evenly thinned to at most max_count (first and last kept)."""
    if n <= max_count:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, max_count)})


def _safe_stem(path: str) -> str:
    """A file-name-safe version of a video's stem (source names hold spaces, '+', brackets)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem).strip("_") or "video"


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def extract_frames(manifest: str | Path, out_dir: str | Path, stride: int, max_frames_per_video: int,
                   short_side: int, val_fraction: float, test_fraction: float, seed: int,
                   subsets: Mapping[str, Sequence[str]], folds: int | None) -> ExtractionSummary:
    """Write the split, the pretraining manifest and the strided frames (see the module docstring)."""
    if stride < 1 or max_frames_per_video < 1:
        raise ValueError(f"stride={stride} and max_frames_per_video={max_frames_per_video} must be >= 1")
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, columns = read_video_manifest(manifest)
    for name, classes in subsets.items():
        unknown = sorted(set(classes) - {r["label"] for r in rows})
        if unknown:
            raise ValueError(f"subset {name!r}: classes {unknown} do not occur in {manifest}")
    splits = split_videos(rows, val_fraction, test_fraction, seed)
    fold_of = fold_videos(rows, folds, seed) if folds is not None else [None] * len(rows)
    derived = ("split",) if folds is None else ("split", "fold")
    carried = [c for c in columns if c not in (*REQUIRED_VIDEO_COLUMNS, *derived)]

    video_rows, frame_rows, skipped = [], [], []
    for number, (row, split, fold) in enumerate(zip(rows, splits, fold_of, strict=True)):
        source = manifest.parent / row["path"]
        # Relative paths keep the derived manifests valid when source and output move together.
        relative = Path(os.path.relpath(source.resolve(), out_dir.resolve())).as_posix()
        video_rows.append({**row, "path": relative, "split": split, **({} if fold is None else {"fold": fold})})
        try:
            frames, _ = read_frames(source, stride=stride, short_side=short_side)
        except (VideoReadError, OSError) as err:
            skipped.append(f"{row['path']}: {err}")
            log.warning("Skipping %s: %s", source, err)
            continue
        label_dir = out_dir / FRAMES_DIR / row["label"]
        label_dir.mkdir(parents=True, exist_ok=True)
        for position in thin_evenly(len(frames), max_frames_per_video):
            frame_number = position * stride  # index in the source video
            image_path = label_dir / f"{number:04d}_{_safe_stem(row['path'])}_f{frame_number:05d}.png"
            if not cv2.imwrite(str(image_path), frames[position]):
                raise OSError(f"cannot write {image_path}")
            frame_rows.append({"image_path": image_path.relative_to(out_dir).as_posix(), "label": row["label"],
                               "patient_id": row["patient_id"], "split": split, "video": row["path"],
                               "frame": frame_number, **({} if fold is None else {"fold": fold}),
                               **{c: row[c] for c in carried}})

    video_columns = [*[c for c in columns if c not in derived], *derived]
    _write_csv(out_dir / VIDEOS_CSV, video_columns, video_rows)
    _write_csv(out_dir / PRETRAIN_MANIFEST, video_columns, [r for r in video_rows if r["split"] == "train"])
    for k in range(folds or 0):
        # Round k trains on every fold but k (test) and (k + 1) % K (val): pretraining sees those patients only.
        round_split = fold_splits([r["fold"] for r in video_rows], k, folds)
        _write_csv(out_dir / pretrain_manifest_name(k), video_columns,
                   [r for r, s in zip(video_rows, round_split, strict=True) if s == "train"])
    frame_columns = [*FRAME_COLUMNS, *derived[1:], *carried]
    _write_csv(out_dir / LABELS_CSV, frame_columns, frame_rows)
    for name, classes in subsets.items():
        _write_csv(out_dir / f"labels_{name}.csv", frame_columns, [r for r in frame_rows if r["label"] in classes])
    summary = ExtractionSummary(
        videos=len(rows) - len(skipped), frames=len(frame_rows), skipped=tuple(skipped),
        patients_per_split={s: len({r["patient_id"] for r in video_rows if r["split"] == s}) for s in SPLITS},
        videos_per_split={s: sum(r["split"] == s for r in video_rows) for s in SPLITS})
    log.info("%s", summary)
    return summary
