"""Finding the videos of a dataset and the patient each belongs to.

Two ways in:
- a folder `root`, searched recursively for video files (mp4, avi, mov, mpeg, mpg, gif, dcm, and extensionless
  DICOM); the patient id is taken from the path relative to `root` with the regex `patient_pattern` (its first
  group, or the whole match). The default `^([^/]+)/` takes the first directory, i.e. the demo layout
  videos/<patient_id>/<scan>.mp4 with root=videos.
- a manifest CSV with a `path` column (relative to the manifest's folder) and optionally `patient_id`; other
  columns are ignored. Without `patient_id`, `patient_pattern` is applied to `path`.
Non-video files (e.g. the per-video plane .csv of the demo data) are ignored.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fetalssl.data.video import CONTAINER_EXTENSIONS, DICOM_EXTENSIONS, is_dicom

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = CONTAINER_EXTENSIONS | DICOM_EXTENSIONS


@dataclass(frozen=True)
class VideoRecord:
    """One source video. n_frames/fps are 0/nan until decoded (the cache fills them in)."""

    path: Path
    patient_id: str
    n_frames: int = 0
    fps: float = math.nan


def is_video_file(path: Path) -> bool:
    return path.is_file() and (
        path.suffix.lower() in VIDEO_EXTENSIONS or (not path.suffix and is_dicom(path))
    )


def patient_id_from_path(relative_path: str, patient_pattern: str) -> str:
    """Patient id from a '/'-separated path relative to the dataset root, via the regex's first group."""
    match = re.search(patient_pattern, relative_path)
    if match is None:
        raise ValueError(
            f"patient_pattern {patient_pattern!r} does not match {relative_path!r}; set data.patient_pattern "
            "or give a manifest with a patient_id column"
        )
    return match.group(1) if match.groups() else match.group(0)


def find_videos(root: str | Path, patient_pattern: str) -> list[VideoRecord]:
    """Every video file under `root` (recursive, sorted, hidden folders such as the cache skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video root {root} is not a folder")
    records = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not is_video_file(path):
            continue
        records.append(VideoRecord(path, patient_id_from_path(relative.as_posix(), patient_pattern)))
    if not records:
        raise FileNotFoundError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) under {root}")
    return records


def read_manifest(manifest: str | Path, patient_pattern: str) -> list[VideoRecord]:
    """Records from a CSV with `path` (relative to the CSV's folder) and optional `patient_id` columns."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{manifest}: needs a 'path' column, has {reader.fieldnames}")
        records = []
        for row_number, row in enumerate(reader, start=2):
            if not row["path"]:
                raise ValueError(f"{manifest} line {row_number}: empty path")
            patient_id = row.get("patient_id") or patient_id_from_path(row["path"], patient_pattern)
            records.append(VideoRecord(manifest.parent / row["path"], str(patient_id)))
    if not records:
        raise ValueError(f"{manifest}: no rows")
    return records


def index_videos(
    root: str | Path | None, manifest: str | Path | None, patient_pattern: str
) -> list[VideoRecord]:
    """The manifest when given, else a recursive search of `root`."""
    if manifest is not None:
        return read_manifest(manifest, patient_pattern)
    if root is None:
        raise ValueError("give data.root or data.manifest")
    return find_videos(root, patient_pattern)
