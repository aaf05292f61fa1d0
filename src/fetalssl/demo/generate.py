"""Writing the demo data set: videos, per-frame plane labels, labelled stills and a manifest, atomically.

No real data can be shipped or downloaded, so the demo pipeline runs on images drawn from geometric
"anatomy" (ellipses, tubes, circles with bright walls and dark blood pools) pushed through a crude
ultrasound model: fan-shaped sector, multiplicative Rayleigh speckle, depth attenuation, log compression,
scanner auto-gain and a burned-in text/caliper overlay.

Layout written by `generate_demo_data(OUT, ...)`:
    OUT/videos/<patient_id>/scanNN.mp4|.avi   cine sweep 4CH -> LVOT -> RVOT -> 3VV -> 3VT
    OUT/videos/<patient_id>/scanNN.csv        frame,plane (plane or "transition" per frame)
    OUT/frames/<label>/<patient_id>_<n>.png   labelled stills
    OUT/labels.csv                            image_path,label,patient_id (image_path relative to OUT)
    OUT/manifest.json                         summary; written last

Determinism: every random draw comes from a generator seeded by ``(seed, stream, index)`` so each file
depends only on the seed and its own index, never on generation order. Video encoding runs single-threaded
(x264 with threads=1 is bit-exact) and the containers carry no timestamps, so the same seed gives
byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from fetalssl.demo.render import (
    MIN_SWEEP_FRAMES,
    PLAIN_SWEEP,
    PLANES,
    STREAM_EXTRA_CLIP,
    STREAM_PATIENT,
    STREAM_STILL,
    STREAM_VIDEO,
    PatientAnatomy,
    render_plane_image,
    render_sweep,
    sample_patient_anatomy,
    seeded_rng,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Grayscale (T,H,W) or RGB (T,H,W,3) uint8 frames -> .mp4 (h264/yuv420p) or .avi (mpeg4). Single-threaded
    encoding so the bytes depend only on the frames."""
    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        raise ValueError(f"{path}: video dimensions must be even for yuv420p, got {w}x{h}")
    suffix = path.suffix.lower()
    # (container, codec, codec options, bit rate); mpeg4 is rate-controlled, x264 uses constant quality.
    codecs = {
        ".mp4": ("mp4", "libx264", {"crf": "18", "preset": "veryfast", "threads": "1"}, None),
        ".avi": ("avi", "mpeg4", {}, 4_000_000),
    }
    if suffix not in codecs:
        raise ValueError(f"{path}: unsupported video suffix {suffix!r}; use .mp4 or .avi")
    fmt, codec, options, bit_rate = codecs[suffix]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        stream.options = options
        if bit_rate:
            stream.bit_rate = bit_rate
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24" if frame.ndim == 3 else "gray")
            vf.pts = i
            container.mux(stream.encode(vf))
        container.mux(stream.encode())


def _write_plane_csv(path: Path, labels: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["frame", "plane"])
        writer.writerows(enumerate(labels))


@dataclass(frozen=True)
class DemoDataSummary:
    out: str
    seed: int
    video_patients: list[str]
    still_patients: list[str]
    videos: list[str]  # relative to out
    n_video_frames: int
    stills_per_class: dict[str, int]
    params: dict = field(default_factory=dict)

    def to_json(self) -> str:
        # `out` is left out of the manifest so that the bytes do not depend on where data was written.
        d = asdict(self)
        d.pop("out")
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


def patient_id(index: int) -> str:
    return f"P{index:04d}"


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():  # leftover from an interrupted run of ours
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)


@dataclass(frozen=True)
class DemoDataSpec:
    """What `fetalssl-demo-data` generates (its options); `check` says what is wrong before anything is written."""

    video_patients: int
    videos_per_patient: int
    frames: int
    size: int
    fps: float
    still_patients: int
    stills: int
    still_size: int
    overlap: int
    seed: int
    avi_every: int
    # What real scan videos have beyond a plain sweep (exercises the scan-layout detectors):
    frame_counter: bool  # every sweep carries a burned-in frame number that changes each frame
    doppler_clips: int  # extra colour Doppler clips, videos/<patient>/doppler<k>.mp4
    split_screen_clips: int  # extra split-screen clips, videos/<patient>/split<k>.mp4

    def check(self) -> None:
        counts = ("video_patients", "videos_per_patient", "still_patients", "stills", "overlap", "avi_every",
                  "doppler_clips", "split_screen_clips")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        has_videos = self.video_patients * self.videos_per_patient > 0
        if has_videos and self.size % 2:
            raise ValueError(f"video size must be even (h264/yuv420p), got {self.size}")
        if (self.doppler_clips or self.split_screen_clips) and not has_videos:
            raise ValueError("Doppler and split-screen clips need video patients")
        if has_videos and self.frames < MIN_SWEEP_FRAMES:
            raise ValueError(f"a sweep needs at least {MIN_SWEEP_FRAMES} frames, got {self.frames}")
        if has_videos and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.stills and self.still_size < 16:
            raise ValueError(f"still size must be >= 16 px, got {self.still_size}")
        if not 0 <= self.overlap <= min(self.video_patients, self.still_patients):
            raise ValueError(f"overlap must be in [0, min(video patients, still patients)], got {self.overlap}")
        if self.stills and self.still_patients < 1:
            raise ValueError("stills requested but still_patients is 0")

    def still_patient_indices(self) -> list[int]:
        """Still patients are numbered after the video patients, except the first `overlap` of them, who are
        also video patients."""
        return [self.video_patients - self.overlap + j for j in range(self.still_patients)]


class _Anatomies:
    """Each patient's anatomy, drawn once from its own stream (video and still patients may overlap)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._cache: dict[int, PatientAnatomy] = {}

    def __call__(self, index: int) -> PatientAnatomy:
        if index not in self._cache:
            self._cache[index] = sample_patient_anatomy(seeded_rng(self.seed, STREAM_PATIENT, index))
        return self._cache[index]


def _write_videos(spec: DemoDataSpec, staging: Path, anatomy_of: _Anatomies) -> tuple[list[str], int]:
    """Every patient's sweeps (then the extra Doppler / split-screen clips) and their per-frame plane CSVs;
    (relative video paths, frames written)."""
    counter = replace(PLAIN_SWEEP, frame_counter=spec.frame_counter)
    clips = []  # (patient, file name, random stream, index, kind)
    for p in range(spec.video_patients):
        for v in range(spec.videos_per_patient):
            k = p * spec.videos_per_patient + v
            suffix = ".avi" if spec.avi_every and k % spec.avi_every == spec.avi_every - 1 else ".mp4"
            clips.append((p, f"scan{v:02d}{suffix}", STREAM_VIDEO, k, counter))
    for name, count, kind in (("doppler", spec.doppler_clips, replace(counter, doppler=True)),
                              ("split", spec.split_screen_clips, replace(counter, split_screen=True))):
        clips += [(k % spec.video_patients, f"{name}{k:02d}.mp4", STREAM_EXTRA_CLIP, len(clips) + k, kind)
                  for k in range(count)]
    videos: list[str] = []
    n_frames = 0
    for p, name, stream, k, kind in clips:
        sweep = render_sweep(anatomy_of(p), n_frames=spec.frames, size=spec.size, fps=spec.fps,
                             rng=seeded_rng(spec.seed, stream, k), kind=kind)
        rel = Path("videos") / patient_id(p) / name
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(staging / rel, sweep.frames, spec.fps)
        _write_plane_csv((staging / rel).with_suffix(".csv"), sweep.labels)
        videos.append(rel.as_posix())
        n_frames += len(sweep.labels)
    return videos, n_frames


def _write_stills(spec: DemoDataSpec, staging: Path, anatomy_of: _Anatomies) -> tuple[dict[str, int], list[str]]:
    """The labelled stills and labels.csv; (stills per class, still patients that got any)."""
    indices = spec.still_patient_indices()
    per_class = dict.fromkeys(PLANES, 0)
    per_patient = dict.fromkeys(indices, 0)
    rows = []
    for k in range(spec.stills):
        # Round-robin over planes keeps the classes balanced to within one image; each block of five
        # goes to one patient so that every patient contributes all planes.
        plane = PLANES[k % len(PLANES)]
        p = indices[(k // len(PLANES)) % spec.still_patients]
        img = render_plane_image(plane, size=spec.still_size, rng=seeded_rng(spec.seed, STREAM_STILL, k),
                                 anatomy=anatomy_of(p))
        rel = Path("frames") / plane / f"{patient_id(p)}_{per_patient[p]}.png"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(staging / rel), img):
            raise OSError(f"could not write {staging / rel}")
        per_patient[p] += 1
        per_class[plane] += 1
        rows.append((rel.as_posix(), plane, patient_id(p)))
    with (staging / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_path", "label", "patient_id"])
        writer.writerows(rows)
    return per_class, [patient_id(p) for p in indices if per_patient[p]]


def generate_demo_data(out: Path, spec: DemoDataSpec, overwrite: bool) -> DemoDataSummary:
    """Write the demo data set (layout in the module docstring) into `out`.

    Everything is generated in a hidden sibling `.<out>.partial` and renamed to `out` at the end, with
    `manifest.json` as the last file written, so an interrupted run never looks complete.
    """
    spec.check()
    out = Path(out)
    t0 = time.perf_counter()
    staging = _prepare_out(out, overwrite)
    anatomy_of = _Anatomies(spec.seed)
    videos, n_video_frames = _write_videos(spec, staging, anatomy_of)
    per_class, still_patients = _write_stills(spec, staging, anatomy_of)
    params = {k: v for k, v in asdict(spec).items() if k not in ("seed", "video_patients", "still_patients")}
    summary = DemoDataSummary(out=str(out), seed=spec.seed,
                              video_patients=[patient_id(p) for p in range(spec.video_patients)],
                              still_patients=still_patients, videos=videos, n_video_frames=n_video_frames,
                              stills_per_class=per_class, params=params)
    (staging / MANIFEST_NAME).write_text(summary.to_json())
    _publish(staging, out)
    logger.info("wrote %d videos (%d frames) and %d stills to %s in %.1f s", len(videos), n_video_frames,
                spec.stills, out, time.perf_counter() - t0)
    return summary


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path (for determinism checks)."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
