"""On-disk frame cache: each video decoded once into a .npy (uint8, short side resized, every `stride`-th frame),
read at random by many DataLoader workers through np.memmap.

Layout: <cache_dir>/frames/<key>.npy, <cache_dir>/scan/<key>.npz (the video's scan layout: sector and overlay
masks, Doppler frames; data.scan) plus <cache_dir>/index.json. The key hashes the source path and the parameters
(short_side, stride, rgb, the scan options); an entry also records the source's size and mtime, so a touched or
replaced source is rebuilt and a change of parameters makes new entries. Each entry's index record holds the
layout's summary (sector and overlay share, Doppler frames, frames kept) and the intensity moments of its live
image, from which a run's normalisation is computed without reading the frames again. Writes are atomic (temp file, fsync, os.replace)
and the index entry is written after its .npy: a crash leaves at most an orphan temp file, never a readable half
entry, and a rerun keeps every entry already complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from fetalssl.data.index import VideoRecord
from fetalssl.data.scan import ScanLayout, ScanOptions, analyse_clip, apply_to_frames, intensity_moments
from fetalssl.data.video import VideoReadError, declared_frame_count, read_gray_and_colour, resize_short_side
from fetalssl.io import TMP_SUFFIX, atomic_write
from fetalssl.progress import progress

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
# The index is rewritten at most this often while videos are decoded, and once at the end (also on an error or
# Ctrl-C): rewriting all entries after each video made preparing N videos cost O(N^2) (BENCHMARKS.md section 7).
INDEX_WRITE_EVERY_SECONDS = 10.0
FRAMES_DIR = "frames"
SCAN_DIR = "scan"
FORMAT_VERSION = 3
PREVIEW_FRAMES = 4  # source frames (before the scan options) kept with the layout, for the prepare report


class CacheError(RuntimeError):
    """The cache cannot be built at all (e.g. not one readable video)."""


@dataclass(frozen=True)
class CachedVideo:
    """One cached video: `n_frames` cached frames, frame k of the cache is source frame k * stride."""

    source: Path
    patient_id: str
    frames_file: Path
    n_frames: int
    fps: float  # of the source; the cache holds fps / stride frames per second
    stride: int
    # A subset of the cached frames (pretraining data budgets): frame k is cached frame first + k * step, and
    # stride counts source frames between them (cache stride x step).
    first: int = 0
    step: int = 1
    moments: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pixels, sum, sum of squares of the live image (x/255)
    scan_file: Path | None = None  # the layout (sector, overlay masks) found when the entry was built

    def cache_index(self, k: int) -> int:
        return self.first + k * self.step

    def frames(self) -> np.ndarray:
        """Read-only memmap (T, H, W) or (T, H, W, 3); open it inside the worker that reads it."""
        return np.load(self.frames_file, mmap_mode="r")

    def layout(self) -> ScanLayout:
        with np.load(self.scan_file) as f:
            return ScanLayout(f["sector"], f["overlay"], f["doppler_frames"], bool(f["split_screen"]),
                              bool(f["from_still"]))

    def source_preview(self) -> np.ndarray:
        """A few evenly spaced grey frames (P, H, W) as decoded, before the scan options changed any pixel."""
        with np.load(self.scan_file) as f:
            return f["preview"]


def intensity_stats(videos: Sequence[CachedVideo]) -> tuple[float, float]:
    """(mean, std) of x/255 over the live image (sector minus overlays) of these cached videos."""
    n, total, squares = (sum(v.moments[i] for v in videos) for i in range(3))
    if n == 0:
        raise CacheError("no live-image pixels in these videos to compute the normalisation from")
    mean = total / n
    return mean, math.sqrt(max(squares / n - mean * mean, 0.0))


@dataclass
class CacheSummary:
    videos: list[CachedVideo]
    built: int
    reused: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    truncated: list[tuple[Path, str]] = field(default_factory=list)  # kept, but shorter than declared
    scans: dict[Path, dict] = field(default_factory=dict)  # per source: its layout summary and frames kept

    @property
    def videos_read(self) -> int:
        return len(self.videos)

    @property
    def frames_cached(self) -> int:
        return sum(v.n_frames for v in self.videos)

    def __str__(self) -> str:
        lines = [
            f"frame cache: {self.videos_read} videos ({self.built} decoded, {self.reused} reused), "
            f"{self.frames_cached} frames, {len(self.skipped)} skipped, {len(self.truncated)} kept truncated"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        lines += [f"  truncated {path}: {reason}" for path, reason in self.truncated]
        return "\n".join(lines)


def entry_key(source: Path, short_side: int | None, stride: int, rgb: bool, scan: ScanOptions) -> str:
    text = (f"{Path(source).resolve()}|short_side={short_side}|stride={stride}|rgb={rgb}|scan={scan.key()}"
            f"|v{FORMAT_VERSION}")
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def load_index(cache_dir: Path) -> dict[str, dict]:
    path = Path(cache_dir) / INDEX_NAME
    if not path.exists():
        return {}
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("frame cache index %s is corrupt; rebuilding the cache", path)
        return {}
    if index.get("version") != FORMAT_VERSION:
        return {}
    return index["entries"]


def _write_index(cache_dir: Path, entries: dict[str, dict]) -> None:
    payload = json.dumps({"version": FORMAT_VERSION, "entries": entries}, indent=1).encode()
    atomic_write(cache_dir / INDEX_NAME, lambda f: f.write(payload))


def _is_fresh(entry: dict | None, stat: os.stat_result, cache_dir: Path) -> bool:
    if entry is None or entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
        return False
    if "skipped" in entry:  # a decision on this very file with these options: no frames to check
        return True
    try:
        frames = np.load(cache_dir / entry["file"], mmap_mode="r")
    except (OSError, ValueError):
        return False
    return list(frames.shape) == entry["shape"]


def _cached_video(record: VideoRecord, entry: dict, cache_dir: Path) -> CachedVideo:
    return CachedVideo(
        source=record.path,
        patient_id=record.patient_id,
        frames_file=cache_dir / entry["file"],
        n_frames=entry["shape"][0],
        fps=entry["fps"],
        stride=entry["stride"],
        moments=tuple(entry["moments"]),
        scan_file=cache_dir / entry["scan_file"],
    )


def _remove_orphan_temps(cache_dir: Path) -> None:
    for tmp in [*cache_dir.glob(f"*{TMP_SUFFIX}"), *(cache_dir / FRAMES_DIR).glob(f"*{TMP_SUFFIX}"),
                *(cache_dir / SCAN_DIR).glob(f"*{TMP_SUFFIX}")]:
        tmp.unlink(missing_ok=True)


@dataclass
class _Decoded:
    """What decoding one video gave: its index entry, or why it was skipped; and a truncation note."""

    entry: dict | None = None
    skipped: str | None = None
    scan: dict | None = None
    truncated: str | None = None


def _decode(record: VideoRecord, key: str, stat: os.stat_result, cache_dir: Path, short_side: int | None, stride: int,
            rgb: bool, min_decoded_fraction: float, scan: ScanOptions) -> _Decoded:
    """Decode one video, find its scan layout, apply the options and write its frames and layout (each file
    atomically, named by its key, so worker processes never write the same file). The index is the caller's."""
    try:
        gray, colour, fps = read_gray_and_colour(record.path, stride=stride, short_side=short_side)
    except VideoReadError as e:
        return _Decoded(skipped=str(e).removeprefix(f"{record.path}: "))
    declared = declared_frame_count(record.path)
    truncated = None
    if declared is not None and len(colour) < math.ceil(declared / stride):
        truncated = f"decoded {len(colour)} of the {math.ceil(declared / stride)} frames its container " \
                    f"declares ({declared} at stride {stride}): truncated or damaged"
        if len(colour) < min_decoded_fraction * math.ceil(declared / stride):
            return _Decoded(skipped=f"{truncated}, below data.min_decoded_fraction={min_decoded_fraction}")
    layout = analyse_clip(gray, colour, scan.detector)
    scan_record = {**layout.summary(), "frames_decoded": len(gray)}
    reason = layout.skip_reason(scan)
    kept = layout.frames_kept(scan)
    if reason is None and kept.size == 0:
        reason = "every frame is colour Doppler (scan.doppler=drop_frames)"
    source = {"source": str(record.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if reason is not None:
        scan_record = {**scan_record, "frames_kept": 0}
        return _Decoded(entry={**source, "skipped": reason, "scan": scan_record}, skipped=reason, scan=scan_record,
                        truncated=truncated)
    frames = apply_to_frames((colour if rgb else gray)[kept], layout, scan)
    moments = intensity_moments(frames, layout)
    if scan.crop_to_sector:
        frames = np.stack([resize_short_side(f, short_side) for f in frames])
    entry_file, scan_file = f"{FRAMES_DIR}/{key}.npy", f"{SCAN_DIR}/{key}.npz"
    preview = gray[np.unique(np.linspace(0, len(gray) - 1, PREVIEW_FRAMES).round().astype(int))]
    atomic_write(cache_dir / scan_file, lambda f: np.savez_compressed(
        f, sector=layout.sector, overlay=layout.overlay, doppler_frames=layout.doppler_frames,
        split_screen=layout.split_screen, from_still=layout.from_still, preview=preview))
    atomic_write(cache_dir / entry_file, lambda f: np.save(f, frames))
    entry = {**source, "short_side": short_side, "stride": stride, "rgb": rgb, "fps": fps,
             "shape": list(frames.shape), "file": entry_file, "scan_file": scan_file,
             "scan": {**scan_record, "frames_kept": int(kept.size)}, "moments": list(moments)}
    return _Decoded(entry=entry, truncated=truncated)


START_METHOD = "fork" if "fork" in get_all_start_methods() else "spawn"  # spawn re-imports torch per worker


def available_cores() -> int:
    """CPU cores this process may use (its affinity, e.g. a Slurm allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_cache(
    records: Sequence[VideoRecord], cache_dir: str | Path, short_side: int | None, stride: int, rgb: bool,
    min_decoded_fraction: float, scan: ScanOptions, progress_every_seconds: float | None = None, workers: int = 1,
) -> CacheSummary:
    """Decode every record not already fresh in the cache; skip unreadable videos with one warning each.

    Each decoded video's scan layout is found (data/scan.py) and `scan` applied: a Doppler or split-screen clip
    may be skipped (named in the summary), Doppler frames dropped, overlays filled, the outside zeroed and the
    frames cropped to the sector (then resized back to `short_side`).

    A video that decodes to fewer frames than its container declares (truncated, damaged) is named in the
    summary with both counts; it is kept if at least ``min_decoded_fraction`` of the declared frames decoded,
    and skipped otherwise. Raises CacheError when no video at all could be cached. ``progress_every_seconds``:
    show progress (fetalssl.progress.progress); None: silent. ``workers`` > 1 decodes in that many processes
    (forked where the platform can: this process opens no video reader before, so none crosses the fork; the
    DataLoader workers are forked the same way); the index is written by this process alone, only ever listing
    videos whose files are complete (every INDEX_WRITE_EVERY_SECONDS and at the end, also after an error or
    Ctrl-C; a process killed outright loses at most that many seconds of videos, decoded again next time), and
    the summary keeps the order of ``records`` whatever the order of finishing.
    """
    cache_dir = Path(cache_dir)
    (cache_dir / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    (cache_dir / SCAN_DIR).mkdir(exist_ok=True)
    _remove_orphan_temps(cache_dir)
    entries = load_index(cache_dir)
    summary = CacheSummary(videos=[], built=0, reused=0)
    stale: dict[int, tuple[str, os.stat_result]] = {}
    statted: dict[int, str | tuple[str, os.stat_result]] = {}
    for i, record in enumerate(records):
        key = entry_key(record.path, short_side, stride, rgb, scan)
        try:
            stat = record.path.stat()
        except OSError as e:
            statted[i] = f"cannot stat ({e.strerror})"
            continue
        statted[i] = (key, stat)
        if not _is_fresh(entries.get(key), stat, cache_dir):
            stale[i] = (key, stat)
    decode = partial(_decode, cache_dir=cache_dir, short_side=short_side, stride=stride, rgb=rgb,
                     min_decoded_fraction=min_decoded_fraction, scan=scan)
    jobs = [(records[i], key, stat) for i, (key, stat) in stale.items()]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context(START_METHOD)))
            decoded_in_order = pool.map(decode, *zip(*jobs, strict=True))
        else:
            decoded_in_order = (decode(*job) for job in jobs)
        decoded = iter(decoded_in_order)
        shown = range(len(records))
        if progress_every_seconds is not None:
            shown = progress(shown, len(records), "frame cache", progress_every_seconds)
        unwritten, written_at = False, time.monotonic()

        def write_last_entries() -> None:
            if unwritten:
                _write_index(cache_dir, entries)

        stack.callback(write_last_entries)  # at the end, also on an error or Ctrl-C
        for i in shown:
            record = records[i]
            if isinstance(statted[i], str):
                _skip(summary, record.path, statted[i])
                continue
            key, _stat = statted[i]
            if i in stale:
                result = next(decoded)
                if result.truncated is not None and (result.skipped is None or result.entry is not None):
                    log.warning("%s: %s; kept (data.min_decoded_fraction=%s)", record.path, result.truncated,
                                min_decoded_fraction)
                    summary.truncated.append((record.path, result.truncated))
                if result.entry is not None:
                    entries[key] = result.entry  # after the video's files: a crash never indexes half an entry
                    unwritten = True
                    if time.monotonic() - written_at >= INDEX_WRITE_EVERY_SECONDS:
                        _write_index(cache_dir, entries)
                        unwritten, written_at = False, time.monotonic()
                if result.skipped is not None:
                    if result.scan is not None:
                        summary.scans[record.path] = result.scan
                    _skip(summary, record.path, result.skipped)
                    continue
                summary.built += 1
            elif "skipped" in entries[key]:  # skipped by the scan options before: not decoded again
                summary.scans[record.path] = entries[key]["scan"]
                _skip(summary, record.path, entries[key]["skipped"])
                continue
            else:
                summary.reused += 1
            summary.scans[record.path] = entries[key]["scan"]
            summary.videos.append(_cached_video(record, entries[key], cache_dir))
    if not summary.videos:
        raise CacheError(
            f"none of the {len(records)} videos could be read into {cache_dir}: "
            + "; ".join(f"{path}: {reason}" for path, reason in summary.skipped[:10])
        )
    log.info("%s", summary)
    return summary


def _skip(summary: CacheSummary, path: Path, reason: str) -> None:
    log.warning("skipping video %s: %s", path, reason)
    summary.skipped.append((path, reason))


def load_cache(
    records: Sequence[VideoRecord], cache_dir: str | Path, short_side: int | None, stride: int, rgb: bool,
    scan: ScanOptions,
) -> list[CachedVideo]:
    """The cached entries for `records` without decoding anything (sources that were skipped are absent).

    Raises CacheError when none is cached: run build_cache (prepare_data / fetalssl-prepare) first.
    """
    cache_dir = Path(cache_dir)
    entries = load_index(cache_dir)
    videos = []
    for record in records:
        entry = entries.get(entry_key(record.path, short_side, stride, rgb, scan))
        if entry is not None and "skipped" not in entry and (cache_dir / entry["file"]).exists():
            videos.append(_cached_video(record, entry, cache_dir))
    if not videos:
        raise CacheError(f"no cached frames in {cache_dir} for these videos; build the cache first")
    return videos
