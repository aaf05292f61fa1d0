"""Where the scan is in an ultrasound frame, and what to do with the rest.

A scanner frame is a fan (convex probe) or rectangle (linear probe) of live image on black, with burned-in text,
calipers, depth ticks, colour bars or an ECG trace, sometimes colour Doppler, sometimes two panes side by side.
`analyse_clip` finds these from the statistics of a clip over time:
- the sector is where the image changes (speckle decorrelates, tissue moves): the largest moving component after
  an opening (which detaches moving text such as a frame counter), grown into the lit regions that touch it
  (a static chest wall, a motionless deep field), as its convex hull (which fills dark, still blood pools and
  the overlays drawn inside it);
- overlays are the small parts that stay bright and still inside the sector, and anything bright outside it;
- Doppler frames carry chroma inside the sector (static colour, e.g. a colour bar, is an overlay, not Doppler);
- a split screen is two moving components of similar size side by side.
A single frame (a still image, a 1-frame video or DICOM) gets its sector from its content instead
(`analyse_still`): the largest bright component after an opening, as its convex hull; only overlays outside the
sector can be told from one frame.

`ScanOptions` says what to do with the result (crop to the sector, zero outside it, zero or inpaint overlays,
drop Doppler frames or skip Doppler / split-screen clips); `apply_to_frames` does it. Everything here is pure
numpy/OpenCV on uint8 arrays, the same for pretraining videos, labelled stills and prediction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

OUTSIDE_CHOICES = ("keep", "zero")
OVERLAY_CHOICES = ("keep", "zero", "inpaint")
DOPPLER_CHOICES = ("keep", "drop_frames", "skip_clip")
SPLIT_SCREEN_CHOICES = ("keep", "skip_clip")
ANALYSIS_VERSION = 2


@dataclass(frozen=True)
class ScanDetector:
    """Thresholds of the detectors, in grey levels (0..255) or shares; conf/scan/*.yaml holds the values."""

    motion_threshold: float  # temporal std above which a pixel is live image
    static_threshold: float  # temporal std below which a bright pixel is a burned-in overlay
    bright_threshold: int  # a still pixel inside the sector brighter than this (in every frame) is an overlay
    content_threshold: int  # outside the sector (and for stills) a pixel brighter than this is content
    lit_threshold: int  # a still region brighter than this that touches the moving image is part of the scan
    chroma_threshold: int  # max - min over RGB above which a pixel is coloured
    doppler_min_share: float  # share of the sector's pixels coloured for a frame to count as Doppler
    min_sector_share: float  # a moving region smaller than this share of the frame falls back to analyse_still
    split_min_share: float  # a second moving region at least this share of the first, beside it: split screen
    opening: float  # size of the opening, as a share of the frame's short side
    max_overlay_share: float  # a still bright part inside the sector larger than this share of the frame is tissue
    max_frames: int  # frames (evenly spaced) used for the temporal statistics

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class ScanOptions:
    """What the data pipeline does with a frame's scan layout (conf/scan/<choice>.yaml)."""

    crop_to_sector: bool  # crop every frame to the sector's bounding box
    outside_sector: str  # keep | zero
    overlays: str  # keep | zero | inpaint (OpenCV Telea, from the surrounding pixels)
    doppler: str  # keep | drop_frames | skip_clip (a clip with at least half its frames Doppler)
    split_screen: str  # keep | skip_clip
    detector: ScanDetector

    def __post_init__(self) -> None:
        for name, choices in (("outside_sector", OUTSIDE_CHOICES), ("overlays", OVERLAY_CHOICES),
                              ("doppler", DOPPLER_CHOICES), ("split_screen", SPLIT_SCREEN_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"scan.{name}={getattr(self, name)!r}: must be one of {choices}")

    @property
    def changes_pixels(self) -> bool:
        return self.crop_to_sector or self.outside_sector != "keep" or self.overlays != "keep"

    @property
    def needs_analysis(self) -> bool:
        return self.changes_pixels or self.doppler != "keep" or self.split_screen != "keep"

    @property
    def label(self) -> str:
        """Short, complete name of the choices (a sweep's grid key): "keep", or e.g. "crop+zero_outside+..."."""
        parts = {"crop": self.crop_to_sector, "zero_outside": self.outside_sector == "zero",
                 f"{self.overlays}_overlays": self.overlays != "keep",
                 "drop_doppler_frames": self.doppler == "drop_frames", "skip_doppler": self.doppler == "skip_clip",
                 "skip_split": self.split_screen == "skip_clip"}
        return "+".join(name for name, on in parts.items() if on) or "keep"

    def key(self) -> str:
        """Stable text naming what the options do to pixels (part of the frame cache's entry key)."""
        text = json.dumps({**asdict(self), "analysis_version": ANALYSIS_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def detector_key(self) -> str:
        """Short hash of the detector's thresholds (a sweep's grid key, so runs with other thresholds differ)."""
        return hashlib.sha1(self.detector.key().encode()).hexdigest()[:8]

    def record(self) -> dict:
        """The options as written into export metadata and run records."""
        return asdict(self)


@dataclass(frozen=True)
class ScanLayout:
    sector: np.ndarray  # bool (H, W): live image
    overlay: np.ndarray  # bool (H, W): burned-in overlay pixels
    doppler_frames: np.ndarray  # bool (T,): colour Doppler frames
    split_screen: bool
    from_still: bool  # sector from one frame's content (no usable motion)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(row start, row stop, col start, col stop) of the sector; the whole frame if it is empty."""
        rows, cols = np.flatnonzero(self.sector.any(1)), np.flatnonzero(self.sector.any(0))
        if rows.size == 0:
            return 0, self.sector.shape[0], 0, self.sector.shape[1]
        return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1

    @property
    def is_doppler_clip(self) -> bool:
        return bool(self.doppler_frames.size) and bool(self.doppler_frames.mean() >= 0.5)

    def summary(self) -> dict:
        return {"sector_share": round(float(self.sector.mean()), 4),
                "overlay_share": round(float(self.overlay.mean()), 4),
                "sector_bbox": list(self.bbox), "doppler_frames": int(self.doppler_frames.sum()),
                "split_screen": bool(self.split_screen), "sector_from": "still" if self.from_still else "motion"}

    def skip_reason(self, options: ScanOptions) -> str | None:
        """Why `options` skip this clip, or None."""
        if options.doppler == "skip_clip" and self.is_doppler_clip:
            return (f"colour Doppler clip ({int(self.doppler_frames.sum())} of {self.doppler_frames.size} frames; "
                    "scan.doppler=skip_clip)")
        if options.split_screen == "skip_clip" and self.split_screen:
            return "split-screen clip (scan.split_screen=skip_clip)"
        return None

    def frames_kept(self, options: ScanOptions) -> np.ndarray:
        """Indices of the frames `options` keep (all but Doppler frames under drop_frames)."""
        keep = ~self.doppler_frames if options.doppler == "drop_frames" else np.ones_like(self.doppler_frames)
        return np.flatnonzero(keep)


def _kernel(shape: tuple[int, int], share: float) -> np.ndarray:
    side = max(3, int(round(share * min(shape))) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-connectivity) of a bool mask, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in order]


def _hull(mask: np.ndarray) -> np.ndarray:
    points = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
    return out.astype(bool)


def _grow_into_content(region: np.ndarray, content: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`region` plus every component of `content` that touches it: still tissue next to the moving image (a
    bright chest wall, a lit but motionless deep field) is scan; text standing apart from it is not."""
    near = cv2.dilate(region.astype(np.uint8), kernel).astype(bool)
    _, labels = cv2.connectedComponents(content.astype(np.uint8), connectivity=8)
    touching = np.unique(labels[near & content])
    return region | np.isin(labels, touching[touching > 0])


def _small_parts(mask: np.ndarray, max_share: float) -> np.ndarray:
    """The components of `mask` no larger than `max_share` of the frame (glyphs, markers, calipers)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] <= max_share * mask.size]
    return np.isin(labels, small)


def _side_by_side(a: np.ndarray, b: np.ndarray) -> bool:
    cols_a, cols_b = np.flatnonzero(a.any(0)), np.flatnonzero(b.any(0))
    return cols_a[-1] < cols_b[0] or cols_b[-1] < cols_a[0]


def _doppler_frames(rgb: np.ndarray | None, sector: np.ndarray, overlay: np.ndarray,
                    detector: ScanDetector, n_frames: int) -> np.ndarray:
    if rgb is None:
        return np.zeros(n_frames, bool)
    region = sector & ~overlay
    if not region.any():
        return np.zeros(n_frames, bool)
    pixels = rgb[:, region].astype(np.int16)  # (T, N, 3)
    coloured = (pixels.max(-1) - pixels.min(-1)) > detector.chroma_threshold
    return coloured.mean(1) > detector.doppler_min_share


def analyse_still(gray: np.ndarray, rgb: np.ndarray | None, detector: ScanDetector) -> ScanLayout:
    """Layout of one frame (H, W) from its content; `rgb` (H, W, 3) for the Doppler check, or None."""
    content = cv2.medianBlur(gray, 3) > detector.content_threshold
    opened = cv2.morphologyEx(content.astype(np.uint8), cv2.MORPH_OPEN, _kernel(gray.shape, detector.opening))
    parts = _components(opened.astype(bool))
    sector = _hull(parts[0]) if parts else np.ones(gray.shape, bool)
    overlay = ~sector & (gray > detector.content_threshold)
    doppler = _doppler_frames(None if rgb is None else rgb[None], sector, overlay, detector, 1)
    return ScanLayout(sector, overlay, doppler, split_screen=False, from_still=True)


def analyse_clip(gray: np.ndarray, rgb: np.ndarray | None, detector: ScanDetector) -> ScanLayout:
    """Layout of a clip (T, H, W) uint8; `rgb` (T, H, W, 3) for Doppler frames, or None (no colour source)."""
    if gray.ndim != 3:
        raise ValueError(f"analyse_clip needs frames (T, H, W), got shape {gray.shape}")
    n_frames = len(gray)
    sample = gray[np.unique(np.linspace(0, n_frames - 1, min(n_frames, detector.max_frames)).round().astype(int))]
    if len(sample) < 2:
        layout = analyse_still(gray[0], None, detector)
        return ScanLayout(layout.sector, layout.overlay,
                          _doppler_frames(rgb, layout.sector, layout.overlay, detector, n_frames), False, True)
    stack = sample.astype(np.float32)
    std = stack.std(0)
    kernel = _kernel(gray.shape[1:], detector.opening)
    lit = cv2.morphologyEx((stack.max(0) > detector.lit_threshold).astype(np.uint8), cv2.MORPH_OPEN,
                           kernel).astype(bool)
    # Live and lit: codec ringing flickers just outside the sector edge, but stays dark.
    live = (std > detector.motion_threshold) & (stack.max(0) > detector.content_threshold)
    moving = cv2.morphologyEx(live.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    parts = _components(moving)
    if not parts or parts[0].mean() < detector.min_sector_share:
        # Too little motion (a frozen loop, a near-still clip): the content of the brightest-on-average image.
        layout = analyse_still(stack.max(0).astype(np.uint8), None, detector)
        sector, split, from_still = layout.sector, False, True
    else:
        split = bool(len(parts) > 1 and parts[1].sum() >= detector.split_min_share * parts[0].sum()
                 and _side_by_side(parts[0], parts[1]))
        sector = _hull(_grow_into_content(parts[0], lit, kernel))
        if split:
            sector |= _hull(_grow_into_content(parts[1], lit, kernel))
        from_still = False
    still_bright = (std < detector.static_threshold) & (stack.min(0) > detector.bright_threshold)
    # Beyond a margin around the sector: live pixels the hull missed at its edge are not overlays.
    margin = cv2.dilate(sector.astype(np.uint8), kernel).astype(bool)
    # Inside the sector only small still bright parts are burned in; a large one is still tissue (chest wall).
    overlay = _small_parts(sector & still_bright, detector.max_overlay_share) | (
        ~margin & (stack.max(0) > detector.content_threshold))
    return ScanLayout(sector, overlay, _doppler_frames(rgb, sector, overlay, detector, n_frames), split, from_still)


def apply_to_frames(frames: np.ndarray, layout: ScanLayout, options: ScanOptions) -> np.ndarray:
    """Frames (T, H, W), (T, H, W, 3) or one gray image (H, W), uint8, with the options applied: overlays filled,
    the outside zeroed, then cropped. Doppler frame selection is the caller's (`layout.frames_kept`)."""
    single = frames.ndim == 2
    out = frames[None] if single else frames
    if options.overlays != "keep" or options.outside_sector == "zero":
        out = out.copy()
    if options.overlays == "inpaint" and layout.overlay.any():
        mask = layout.overlay.astype(np.uint8)
        out = np.stack([cv2.inpaint(f, mask, 3, cv2.INPAINT_TELEA) for f in out])
    elif options.overlays == "zero":
        out[:, layout.overlay] = 0
    if options.outside_sector == "zero":
        out[:, ~layout.sector] = 0
    if options.crop_to_sector:
        r0, r1, c0, c1 = layout.bbox
        out = out[:, r0:r1, c0:c1]
    return out[0] if single else out


def intensity_moments(frames: np.ndarray, layout: ScanLayout) -> tuple[float, float, float]:
    """(pixel count, sum, sum of squares) of x/255 over the live image (sector minus overlays) of processed
    `frames` (T, H, W[, 3]): what the data-derived normalisation adds up over a run's training videos."""
    region = layout.sector & ~layout.overlay
    if frames.shape[1:3] != region.shape:  # cropped to the sector box
        r0, r1, c0, c1 = layout.bbox
        region = region[r0:r1, c0:c1]
    values = frames[:, region].astype(np.float64) / 255.0
    return float(values.size), float(values.sum()), float(np.square(values).sum())
