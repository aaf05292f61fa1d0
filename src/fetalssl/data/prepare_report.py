"""What fetalssl-prepare found, for a person to check at a glance: what the model will see of each video.

- scan_summary.csv: one row per video (kept or skipped, and why): frames decoded and kept, sector and overlay
  share, Doppler frames, split screen, how the sector was found;
- contact_sheets/<folder>[_<page>].png: per source folder, a row per cached video: a few frames as decoded, with
  the detected sector outlined in green and the overlays in red, each followed by the same frame as cached (what
  the model sees, after the scan options);
- the data-derived normalisation over every cached video (what `normalization=measured` computes per run
  over its training videos), in prepare_summary.json.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from fetalssl.data.cache import CachedVideo, CacheSummary, intensity_stats
from fetalssl.data.scan import ScanOptions
from fetalssl.io import atomic_write, save_json

SUMMARY_CSV = "scan_summary.csv"
SUMMARY_JSON = "prepare_summary.json"
SHEETS_DIR = "contact_sheets"
SUMMARY_COLUMNS = ("source", "patient_id", "status", "reason", "frames_decoded", "frames_kept", "sector_share",
                   "overlay_share", "doppler_frames", "split_screen", "sector_from")
_TILE = 96  # contact-sheet tile height, px
_GREEN, _RED = (0, 200, 0), (0, 0, 255)  # BGR


def _tile(image: np.ndarray) -> np.ndarray:
    scale = _TILE / image.shape[0]
    return cv2.resize(image, (max(1, round(image.shape[1] * scale)), _TILE), interpolation=cv2.INTER_AREA)


def _outlined(frame: np.ndarray, sector: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """A decoded grey frame with the sector outlined in green and the overlays tinted red (BGR)."""
    tile = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_GRAY2BGR)
    tile[overlay] = (0.4 * tile[overlay] + 0.6 * np.array(_RED)).astype(np.uint8)
    contours, _ = cv2.findContours(sector.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tile, contours, -1, _GREEN, 1)
    return _tile(tile)


def _sheet_row(video: CachedVideo, frames_per_video: int, width: int) -> np.ndarray:
    layout, preview, cached = video.layout(), video.source_preview(), video.frames()
    picks = np.unique(np.linspace(0, len(preview) - 1, min(frames_per_video, len(preview))).round().astype(int))
    seen = np.unique(np.linspace(0, video.n_frames - 1, len(preview)).round().astype(int))
    tiles = []
    for i in picks:
        tiles.append(_outlined(preview[i], layout.sector, layout.overlay))
        as_cached = np.asarray(cached[video.cache_index(int(seen[min(i, len(seen) - 1)]))])
        tiles.append(_tile(cv2.cvtColor(np.ascontiguousarray(as_cached), cv2.COLOR_GRAY2BGR)))
        tiles.append(np.zeros((_TILE, 4, 3), np.uint8))  # a gap between pairs
    row = np.zeros((_TILE + 14, width, 3), np.uint8)
    strip = np.concatenate(tiles, axis=1)[:, :width]
    row[14:, : strip.shape[1]] = strip
    cv2.putText(row, f"{video.source.name} ({video.patient_id}, {video.n_frames} frames)", (2, 11),
                cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return row


def _folder_name(folder: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", folder).strip("_") or "root"


def write_contact_sheets(videos: Sequence[CachedVideo], out_dir: Path, frames_per_video: int,
                         videos_per_sheet: int) -> list[Path]:
    """One PNG per source folder (and page of `videos_per_sheet`); returns the files written."""
    sheets_dir = out_dir / SHEETS_DIR
    sheets_dir.mkdir(parents=True, exist_ok=True)
    common = Path(os.path.commonpath([str(v.source.parent) for v in videos]))
    by_folder: dict[str, list[CachedVideo]] = {}
    for video in videos:
        by_folder.setdefault(video.source.parent.relative_to(common).as_posix(), []).append(video)
    width = frames_per_video * 2 * (2 * _TILE + 2)  # pairs of wide frames; narrower strips are padded with black
    written = []
    for folder, members in sorted(by_folder.items()):
        for page, start in enumerate(range(0, len(members), videos_per_sheet)):
            sheet = np.concatenate([_sheet_row(v, frames_per_video, width)
                                    for v in members[start:start + videos_per_sheet]])
            suffix = f"_{page}" if len(members) > videos_per_sheet else ""
            path = sheets_dir / f"{_folder_name(folder)}{suffix}.png"
            ok, png = cv2.imencode(".png", sheet)
            if not ok:
                raise OSError(f"cannot encode {path}")
            atomic_write(path, lambda f, b=png: f.write(b.tobytes()))
            written.append(path)
    return written


def write_prepare_report(summary: CacheSummary, patients: dict[Path, str], scan: ScanOptions, out_dir: str | Path,
                         frames_per_video: int, videos_per_sheet: int) -> dict:
    """scan_summary.csv, the contact sheets and prepare_summary.json (returned) under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = dict(summary.skipped)
    rows = []
    for source in sorted(patients):
        scan_record = summary.scans.get(source, {})
        rows.append({"source": str(source), "patient_id": patients[source],
                     "status": "skipped" if source in skipped else "kept", "reason": skipped.get(source, ""),
                     **{c: scan_record.get(c, "") for c in SUMMARY_COLUMNS[4:]}})
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / SUMMARY_CSV, lambda f: f.write(text.getvalue().encode()))
    sheets = write_contact_sheets(summary.videos, out_dir, frames_per_video, videos_per_sheet)
    mean, std = intensity_stats(summary.videos)
    record = {
        "videos": len(patients), "kept": len(summary.videos), "skipped": len(summary.skipped),
        "doppler_clips": sum(1 for r in summary.scans.values() if r["doppler_frames"] * 2 >= r["frames_decoded"]),
        "split_screen_clips": sum(1 for r in summary.scans.values() if r["split_screen"]),
        "sector_from_still": sum(1 for r in summary.scans.values() if r["sector_from"] == "still"),
        "normalization": {"mean": round(mean, 4), "std": round(std, 4),
                          "source": f"live image of all {len(summary.videos)} cached videos"},
        "scan": scan.record(),
        "contact_sheets": [p.relative_to(out_dir).as_posix() for p in sheets],
    }
    save_json(record, out_dir / SUMMARY_JSON)
    return record
