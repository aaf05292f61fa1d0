"""Rendering of the synthetic scans: per-patient "anatomy" (ellipses, tubes, circles with bright walls and
dark blood pools) drawn for each standard plane, pushed through a crude ultrasound model (fan-shaped sector,
multiplicative Rayleigh speckle, depth attenuation, log compression, scanner auto-gain, burned-in overlay),
and sweeps through the five planes with transitions, heartbeat and probe jitter.

Every random draw comes from a generator seeded by ``(seed, stream, index)`` (`seeded_rng`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

PLANES: tuple[str, ...] = ("4CH", "LVOT", "RVOT", "3VV", "3VT")
TRANSITION = "transition"

# Random streams: keep each kind of item independent of the others and of generation order.
STREAM_PATIENT, STREAM_VIDEO, STREAM_STILL, STREAM_EXTRA_CLIP = 1, 2, 3, 4

# Canonical anatomy is drawn at this multiple of the output size, then warped down (cheap anti-aliasing).
_SUPERSAMPLE = 2
# Heart radius on the canonical canvas, as a fraction of the canvas side.
_HEART_RADIUS_FRACTION = 0.19

# Echogenicity levels (before speckle/gain): dark fluid, mid tissue, bright walls.
_BLOOD = 0.04
_FLUID = 0.03
_MYOCARDIUM = 0.55
_WALL = 1.0

_MIN_HOLD_FRAMES = 3
_MIN_TRANSITION_FRAMES = 2
MIN_SWEEP_FRAMES = len(PLANES) * _MIN_HOLD_FRAMES + (len(PLANES) - 1) * _MIN_TRANSITION_FRAMES


def seeded_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` of one kind (``stream``): independent of generation order."""
    return np.random.default_rng([seed, stream, index])


# --------------------------------------------------------------------------------------------------
# Per-patient parameters


@dataclass(frozen=True)
class PatientAnatomy:
    """What stays fixed for one patient (and their scanner settings) across all their images."""

    heart_scale: float  # relative size of the heart (gestational age)
    heart_offset: tuple[float, float]  # heart centre shift, fraction of image side
    heart_rotation_deg: float  # axis of the heart in the image
    heart_rate_bpm: float
    tissue_level: float  # echogenicity of lung/thorax tissue
    attenuation: float  # depth attenuation coefficient (per image height)
    sector_half_angle_deg: float
    sector_apex_y: float  # probe apex position, fraction of image side (negative = above the image)
    target_mean: float  # scanner auto-gain target brightness inside the sector (0..1)
    target_std: float  # ... and contrast
    speckle_sigma: tuple[float, float]  # speckle correlation length (lateral, axial) in px at 128 px


def sample_patient_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    return PatientAnatomy(
        heart_scale=float(rng.uniform(0.85, 1.15)),
        heart_offset=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.05, 0.05))),
        heart_rotation_deg=float(rng.uniform(-20, 20)),
        heart_rate_bpm=float(rng.uniform(120, 160)),
        tissue_level=float(rng.uniform(0.18, 0.3)),
        attenuation=float(rng.uniform(0.4, 1.4)),
        sector_half_angle_deg=float(rng.uniform(33, 42)),
        sector_apex_y=float(rng.uniform(-0.06, 0.02)),
        target_mean=float(rng.uniform(0.25, 0.42)),
        target_std=float(rng.uniform(0.16, 0.24)),
        speckle_sigma=(float(rng.uniform(0.8, 1.3)), float(rng.uniform(0.5, 0.8))),
    )


@dataclass(frozen=True)
class Pose:
    """Placement of the anatomy for one frame: patient placement plus acquisition/probe jitter."""

    dx: float = 0.0  # fraction of image side
    dy: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 1.0


def _compose(anatomy: PatientAnatomy, pose: Pose) -> Pose:
    return Pose(
        dx=anatomy.heart_offset[0] + pose.dx,
        dy=anatomy.heart_offset[1] + pose.dy,
        rotation_deg=anatomy.heart_rotation_deg + pose.rotation_deg,
        scale=anatomy.heart_scale * pose.scale,
    )


# --------------------------------------------------------------------------------------------------
# Canonical anatomy drawing. Units: heart radius, origin at the heart centre, x right, y down
# (towards the spine). Drawing happens on a float32 canvas with cv2 primitives (sub-pixel via `shift`).

_SHIFT = 3
_SUB = 1 << _SHIFT


class _Canvas:
    def __init__(self, side: int, background: float):
        self.img = np.full((side, side), background, np.float32)
        self.side = side
        self.unit = side * _HEART_RADIUS_FRACTION
        self.centre = side / 2.0

    def _pt(self, x: float, y: float) -> tuple[int, int]:
        return (round((self.centre + x * self.unit) * _SUB), round((self.centre + y * self.unit) * _SUB))

    def _len(self, r: float) -> int:
        return max(1, round(r * self.unit * _SUB))

    def ellipse(self, x, y, ax, ay, angle, level, thickness: float | None = None) -> None:
        th = -1 if thickness is None else max(1, round(thickness * self.unit))
        cv2.ellipse(
            self.img,
            self._pt(x, y),
            (self._len(ax), self._len(ay)),
            angle,
            0,
            360,
            level,
            th,
            cv2.LINE_8,
            _SHIFT,
        )

    def circle(self, x, y, r, level, thickness: float | None = None) -> None:
        self.ellipse(x, y, r, r, 0.0, level, thickness)

    def polyline(self, pts: Sequence[tuple[float, float]], level, thickness: float) -> None:
        arr = np.array([self._pt(x, y) for x, y in pts], np.int32).reshape(-1, 1, 2)
        cv2.polylines(self.img, [arr], False, level, max(1, round(thickness * self.unit)), cv2.LINE_8, _SHIFT)

    def vessel_tube(self, pts, radius, wall) -> None:
        """Longitudinal vessel: bright walls around a dark lumen."""
        self.polyline(pts, _WALL, 2 * (radius + wall))
        self.polyline(pts, _BLOOD, 2 * radius)

    def vessel_ring(self, x, y, radius, wall, lumen=_BLOOD) -> None:
        """Vessel in cross-section: bright ring, dark lumen."""
        self.circle(x, y, radius + wall, _WALL)
        self.circle(x, y, radius, lumen)


def _arc(p0, p1, bend: float, n: int = 12) -> list[tuple[float, float]]:
    """Quadratic curve from p0 to p1 whose midpoint is pushed sideways by `bend` (units)."""
    (x0, y0), (x1, y1) = p0, p1
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    cx, cy = mx - bend * (y1 - y0) / length, my + bend * (x1 - x0) / length
    t = np.linspace(0, 1, n)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t**2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t**2 * y1
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _draw_body(c: _Canvas, tissue: float, rng: np.random.Generator) -> None:
    """Plane-independent surroundings: thorax in amniotic fluid, skin line, ribs, spine, descending aorta."""
    c.ellipse(0.15, 0.1, 2.55, 2.3, 0, _WALL * 0.7)  # skin line
    c.ellipse(0.15, 0.1, 2.45, 2.2, 0, tissue)
    for ang in rng.uniform(0, 360, size=3):  # rib fragments on the chest wall
        a = math.radians(ang)
        c.ellipse(0.15 + 2.2 * math.cos(a), 0.1 + 2.0 * math.sin(a), 0.28, 0.07, ang + 90, _WALL * 0.9)
    # Spine: three ossification centres, posterior.
    for sx, sy in ((0.55, 1.55), (0.3, 1.85), (0.85, 1.85)):
        c.circle(sx, sy, 0.13, _WALL)
    c.vessel_ring(0.3, 1.15, 0.13, 0.05)  # descending aorta
    for _ in range(4):  # random echogenic clutter so that texture is not plane-specific
        x, y = rng.uniform(-1.8, 1.8, size=2)
        c.ellipse(
            x,
            y,
            rng.uniform(0.05, 0.15),
            rng.uniform(0.05, 0.15),
            rng.uniform(0, 180),
            float(rng.uniform(0.5, 0.9)),
        )


def _draw_4ch(c: _Canvas, vent: float, atr: float, vessel: float) -> None:
    c.ellipse(0, -0.05, 1.05, 0.95, 0, _WALL * 0.8)  # pericardium
    c.ellipse(0, -0.05, 0.97, 0.87, 0, _MYOCARDIUM)
    c.ellipse(0.4, -0.38, 0.3 * vent, 0.42 * vent, -10, _BLOOD)  # LV
    c.ellipse(-0.4, -0.36, 0.32 * vent, 0.4 * vent, 10, _BLOOD)  # RV
    c.ellipse(0.4, 0.42, 0.3 * atr, 0.26 * atr, 0, _BLOOD)  # LA
    c.ellipse(-0.4, 0.42, 0.32 * atr, 0.27 * atr, 0, _BLOOD)  # RA
    # Crux: interventricular/interatrial septum and AV valve plane cross.
    c.polyline([(0, -0.85), (0, 0.75)], _WALL, 0.09)
    c.polyline([(-0.8, 0.06), (0.8, 0.06)], _WALL * 0.85, 0.06)


def _draw_lvot(c: _Canvas, vent: float, atr: float, vessel: float) -> None:
    c.ellipse(-0.1, 0.0, 1.0, 0.85, 25, _MYOCARDIUM)
    c.ellipse(-0.6, -0.4, 0.26 * vent, 0.36 * vent, 30, _BLOOD)  # RV, partly cut
    c.ellipse(-0.05, 0.15, 0.34 * vent, 0.62 * vent, 35, _BLOOD)  # LV long axis
    # Aorta leaves the LV base in continuity with the septum.
    c.vessel_tube(_arc((0.2, -0.25), (1.15, -1.05), 0.15), 0.2 * vessel, 0.06)
    c.polyline([(-0.45, 0.5), (0.12, -0.35)], _WALL, 0.08)  # septum


def _draw_rvot(c: _Canvas, vent: float, atr: float, vessel: float) -> None:
    c.ellipse(0.0, 0.1, 0.95, 0.8, -20, _MYOCARDIUM)
    c.ellipse(-0.35, 0.25, 0.48 * vent, 0.38 * vent, -20, _BLOOD)  # RV
    c.vessel_ring(0.15, -0.55, 0.22 * vessel, 0.06)  # aorta in cross-section
    # Pulmonary artery crosses over the aorta and bifurcates.
    trunk = _arc((-0.55, -0.1), (0.85, -0.6), -0.75)
    c.vessel_tube(trunk, 0.2 * vessel, 0.06)
    c.vessel_tube([(0.85, -0.6), (1.3, -0.35)], 0.13 * vessel, 0.05)
    c.vessel_tube([(0.85, -0.6), (1.25, -1.0)], 0.13 * vessel, 0.05)


def _draw_3vv(c: _Canvas, vent: float, atr: float, vessel: float) -> None:
    # PA, aorta, SVC in a row, decreasing in size.
    c.vessel_ring(-0.75, -0.45, 0.36 * vessel, 0.07)
    c.vessel_ring(0.05, -0.05, 0.27 * vessel, 0.07)
    c.vessel_ring(0.7, 0.3, 0.17 * vessel, 0.06)


def _draw_3vt(c: _Canvas, vent: float, atr: float, vessel: float) -> None:
    # Ductal and aortic arches converge in a V towards the descending aorta; trachea and SVC beside.
    apex = (0.3, 1.0)
    c.vessel_tube(_arc((-0.95, -0.65), apex, -0.1), 0.17 * vessel, 0.06)
    c.vessel_tube(_arc((0.05, -0.85), apex, 0.1), 0.15 * vessel, 0.06)
    c.vessel_ring(1.05, -0.35, 0.14 * vessel, 0.05)  # SVC
    c.vessel_ring(0.8, 0.35, 0.14, 0.09, lumen=0.25)  # trachea: thick bright ring


_PLANE_DRAWERS = {
    "4CH": _draw_4ch,
    "LVOT": _draw_lvot,
    "RVOT": _draw_rvot,
    "3VV": _draw_3vv,
    "3VT": _draw_3vt,
}


def _cardiac_sizes(phase: float) -> tuple[float, float, float]:
    """Ventricles dilate in diastole while the atria empty; great vessels pulse slightly."""
    wave = math.cos(2 * math.pi * phase)
    return 1.0 + 0.12 * wave, 1.0 - 0.12 * wave, 1.0 - 0.04 * wave


def _canonical_map(
    plane: str, size: int, phase: float, tissue: float, rng: np.random.Generator
) -> np.ndarray:
    c = _Canvas(size * _SUPERSAMPLE, _FLUID)
    _draw_body(c, tissue, rng)
    _PLANE_DRAWERS[plane](c, *_cardiac_sizes(phase))
    return c.img


def echogenicity_map(
    plane: str, anatomy: PatientAnatomy, pose: Pose, phase: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Noise-free tissue reflectivity (float32, HxW) of `plane`, placed by patient anatomy and pose."""
    if plane not in _PLANE_DRAWERS:
        raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")
    canon = _canonical_map(plane, size, phase, anatomy.tissue_level, rng)
    p = _compose(anatomy, pose)
    side = size * _SUPERSAMPLE
    m = cv2.getRotationMatrix2D((side / 2, side / 2), p.rotation_deg, p.scale / _SUPERSAMPLE)
    # Place the heart centre in the middle of the sector, slightly below the image centre.
    m[0, 2] += size * (0.5 + p.dx) - side / 2
    m[1, 2] += size * (0.55 + p.dy) - side / 2
    canon = cv2.GaussianBlur(canon, (0, 0), _SUPERSAMPLE * 0.5)
    return cv2.warpAffine(canon, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=_FLUID)


# --------------------------------------------------------------------------------------------------
# Ultrasound image formation


@dataclass(frozen=True)
class _Sector:
    mask: np.ndarray  # bool HxW, inside the fan
    depth: np.ndarray  # float HxW, distance from the probe apex in image heights


def _sector(anatomy: PatientAnatomy, size: int) -> _Sector:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ax, ay = size / 2.0, anatomy.sector_apex_y * size
    r = np.hypot(xx - ax, yy - ay)
    ang = np.degrees(np.arctan2(xx - ax, yy - ay))
    mask = (np.abs(ang) <= anatomy.sector_half_angle_deg) & (r >= 0.06 * size) & (r <= 0.97 * size)
    return _Sector(mask=mask, depth=r / size)


def _complex_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.standard_normal((2, size, size), dtype=np.float32)


def _speckle(z: np.ndarray, sigma: tuple[float, float], size: int) -> np.ndarray:
    """Rayleigh-distributed envelope (mean ~1) of a spatially correlated complex Gaussian field."""
    sx, sy = (s * size / 128 for s in sigma)
    re = cv2.GaussianBlur(z[0], (0, 0), sigmaX=sx, sigmaY=sy)
    im = cv2.GaussianBlur(z[1], (0, 0), sigmaX=sx, sigmaY=sy)
    env = np.sqrt(re * re + im * im)
    return env / max(float(env.mean()), 1e-6)


def _log_compress(img: np.ndarray) -> np.ndarray:
    dynamic = 30.0
    return np.log1p(dynamic * img) / math.log1p(dynamic)


def _form_image(
    echo: np.ndarray, speckle: np.ndarray, anatomy: PatientAnatomy, sector: _Sector
) -> np.ndarray:
    att = np.exp(-anatomy.attenuation * sector.depth)
    img = _log_compress(np.clip(echo, 0, None) * speckle * att)
    return np.where(sector.mask, img, 0.0).astype(np.float32)


@dataclass(frozen=True)
class Gain:
    """Linear display mapping 0..1 -> 0..255: value = gain * img + offset."""

    gain: float
    offset: float

    def apply(self, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.clip(self.gain * img + self.offset, 0, 255)
        return np.where(mask, out, 0).astype(np.uint8)


def auto_gain(img: np.ndarray, mask: np.ndarray, target_mean: float, target_std: float) -> Gain:
    """Scanner auto-gain: map sector intensities to a target brightness/contrast. This is what keeps
    global intensity statistics from revealing the plane (chamber-rich planes are darker otherwise)."""
    vals = img[mask]
    std = max(float(vals.std()), 1e-6)
    gain = 255.0 * target_std / std
    return Gain(gain=gain, offset=255.0 * target_mean - gain * float(vals.mean()))


# --------------------------------------------------------------------------------------------------
# Burned-in overlay (plane independent)


@dataclass(frozen=True)
class Overlay:
    texts: tuple[tuple[str, int, int, float, int], ...]  # (text, x, y, font scale, grey level)
    caliper: tuple[int, int, int, int] | None  # two caliper crosses joined by a dotted line
    depth_ticks: tuple[int, int, int]  # x, first y, spacing


def sample_overlay(rng: np.random.Generator, size: int) -> Overlay:
    s = size / 128
    ga = f"GA {rng.integers(18, 34)}w{rng.integers(0, 7)}d"
    texts = [
        (ga, round(2 * s), round(9 * s), 0.28 * s, int(rng.integers(170, 256))),
        (f"FR {rng.integers(18, 60)}Hz", round(2 * s), round(18 * s), 0.25 * s, int(rng.integers(150, 240))),
        (
            f"G{rng.integers(30, 80)} C{rng.integers(3, 9)}",
            round(96 * s),
            round(9 * s),
            0.25 * s,
            int(rng.integers(150, 240)),
        ),
        (f"{rng.integers(6, 16)}cm", round(100 * s), round(124 * s), 0.25 * s, int(rng.integers(150, 240))),
    ]
    caliper = None
    if rng.random() < 0.5:
        x0, y0 = (int(v) for v in rng.integers(round(35 * s), round(95 * s), size=2))
        x1, y1 = (int(v) for v in rng.integers(round(35 * s), round(95 * s), size=2))
        caliper = (x0, y0, x1, y1)
        texts.append((f"D1 {rng.uniform(2, 15):.1f}mm", round(2 * s), round(124 * s), 0.25 * s, 230))
    ticks = (round(123 * s), round(int(rng.integers(18, 26)) * s), round(int(rng.integers(12, 18)) * s))
    return Overlay(texts=tuple(texts), caliper=caliper, depth_ticks=ticks)


def burn_in(img: np.ndarray, ov: Overlay) -> np.ndarray:
    out = img.copy()
    for text, x, y, scale, level in ov.texts:
        cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, level, 1, cv2.LINE_AA)
    x, y, step = ov.depth_ticks
    while y < out.shape[0] - 10:
        cv2.line(out, (x, y), (x + 3, y), 200, 1)
        y += step
    if ov.caliper is not None:
        x0, y0, x1, y1 = ov.caliper
        n = max(2, int(math.hypot(x1 - x0, y1 - y0) // 4))
        for t in np.linspace(0, 1, n):
            out[round(y0 + t * (y1 - y0)), round(x0 + t * (x1 - x0))] = 255
        for cx, cy in ((x0, y0), (x1, y1)):
            cv2.drawMarker(out, (cx, cy), 255, cv2.MARKER_CROSS, 5, 1)
    return out


# --------------------------------------------------------------------------------------------------
# Public renderers


def render_plane_image(
    plane: str,
    *,
    size: int,
    rng: np.random.Generator,
    anatomy: PatientAnatomy | None = None,
    phase: float | None = None,
    overlay: bool = True,
) -> np.ndarray:
    """One labelled still (uint8 HxW) of `plane`. Anatomy defaults to a freshly sampled patient; the
    acquisition (pose, cardiac phase, gain, speckle, overlay) is drawn from `rng` every call."""
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")
    anatomy = anatomy if anatomy is not None else sample_patient_anatomy(rng)
    phase = float(rng.random()) if phase is None else phase
    pose = Pose(
        dx=float(rng.uniform(-0.04, 0.04)),
        dy=float(rng.uniform(-0.04, 0.04)),
        rotation_deg=float(rng.uniform(-10, 10)),
        scale=float(rng.uniform(0.9, 1.1)),
    )
    sector = _sector(anatomy, size)
    echo = echogenicity_map(plane, anatomy, pose, phase, size, rng)
    img = _form_image(echo, _speckle(_complex_noise(rng, size), anatomy.speckle_sigma, size), anatomy, sector)
    # Each still is its own acquisition: the gain target varies around the patient's preset.
    gain = auto_gain(
        img,
        sector.mask,
        anatomy.target_mean * float(rng.uniform(0.8, 1.2)),
        anatomy.target_std * float(rng.uniform(0.85, 1.15)),
    )
    out = gain.apply(img, sector.mask)
    return burn_in(out, sample_overlay(rng, size)) if overlay else out


def plan_sweep(n_frames: int, rng: np.random.Generator) -> list[tuple[str, str, float]]:
    """Per frame (from_plane, to_plane, blend weight 0..1). Holds on each plane in PLANES order with a
    transition between consecutive planes; hold/transition lengths are random."""
    if n_frames < MIN_SWEEP_FRAMES:
        raise ValueError(f"a sweep needs at least {MIN_SWEEP_FRAMES} frames, got {n_frames}")
    n_trans = len(PLANES) - 1
    trans_len = [
        int(v) for v in rng.integers(_MIN_TRANSITION_FRAMES, max(3, n_frames // 12) + 1, size=n_trans)
    ]
    spare = n_frames - sum(trans_len) - len(PLANES) * _MIN_HOLD_FRAMES
    if spare < 0:  # short sweeps: fall back to minimal transitions
        trans_len = [_MIN_TRANSITION_FRAMES] * n_trans
        spare = n_frames - sum(trans_len) - len(PLANES) * _MIN_HOLD_FRAMES
    weights = rng.dirichlet(np.full(len(PLANES), 4.0))
    extra = np.floor(weights * spare).astype(int)
    extra[: spare - int(extra.sum())] += 1
    plan: list[tuple[str, str, float]] = []
    for i, plane in enumerate(PLANES):
        plan += [(plane, plane, 0.0)] * (_MIN_HOLD_FRAMES + int(extra[i]))
        if i < n_trans:
            k = trans_len[i]
            plan += [(plane, PLANES[i + 1], (j + 1) / (k + 1)) for j in range(k)]
    assert len(plan) == n_frames
    return plan


def frame_label(step: tuple[str, str, float]) -> str:
    src, dst, _ = step
    return src if src == dst else TRANSITION


@dataclass(frozen=True)
class SweepKind:
    """What a clip carries beyond the plain sweep, as real scan videos do."""

    frame_counter: bool  # moving burned-in text: a frame number that changes every frame
    doppler: bool  # colour flow inside the sector (the clip is RGB)
    split_screen: bool  # two panes side by side, each with its own sector


PLAIN_SWEEP = SweepKind(frame_counter=False, doppler=False, split_screen=False)
_OVERLAY_TRUTH_LEVEL = 24  # a pixel counts as overlay where the overlay alone would draw it brighter than this
_SPLIT_GAP = 8  # pixels between the panes of a split screen


@dataclass(frozen=True)
class Sweep:
    frames: np.ndarray  # uint8 (T, H, W), or (T, H, W, 3) RGB for a Doppler clip
    labels: list[str]  # plane (or "transition") per frame
    sector: np.ndarray  # bool (H, W): the true scan sector (both panes of a split screen)
    overlay: np.ndarray  # bool (H, W): pixels a burned-in overlay covers in at least one frame


def render_sweep(
    anatomy: PatientAnatomy, *, n_frames: int, size: int, fps: float, rng: np.random.Generator,
    kind: SweepKind = PLAIN_SWEEP,
) -> Sweep:
    """A cine sweep through the five planes, with the true sector and overlay masks."""
    plan = plan_sweep(n_frames, rng)
    sector = _sector(anatomy, size)
    overlay = sample_overlay(rng, size)
    beat_phase0 = float(rng.random())
    beats_per_frame = anatomy.heart_rate_bpm / 60.0 / fps
    # Probe jitter: a damped random walk of small translations/rotations.
    jitter = np.zeros(4)
    speckle_z = _complex_noise(rng, size)
    # Tissue clutter is tied to the patient/video, not redrawn per frame.
    clutter_seed = int(rng.integers(2**31))
    gain: Gain | None = None
    frames = np.empty((n_frames, size, size), np.uint8)
    overlay_alone = burn_in(np.zeros((size, size), np.uint8), overlay)  # brightest any overlay draws each pixel
    phases = []
    for t, (src, dst, w) in enumerate(plan):
        jitter = 0.8 * jitter + rng.normal(0, [0.004, 0.004, 0.6, 0.005])
        phase = (beat_phase0 + t * beats_per_frame) % 1.0
        phases.append(phase)
        pose = Pose(dx=jitter[0], dy=jitter[1], rotation_deg=jitter[2], scale=1.0 + jitter[3])
        echo = echogenicity_map(
            src, anatomy, _slide(pose, -w), phase, size, np.random.default_rng(clutter_seed)
        )
        if src != dst:  # morph: the next plane slides in while the current one fades out
            w_s = w * w * (3 - 2 * w)
            nxt = echogenicity_map(
                dst, anatomy, _slide(pose, 1 - w), phase, size, np.random.default_rng(clutter_seed)
            )
            echo = (1 - w_s) * echo + w_s * nxt
        # Speckle decorrelates partially from frame to frame (AR(1) on the complex field).
        speckle_z = 0.75 * speckle_z + math.sqrt(1 - 0.75**2) * _complex_noise(rng, size)
        img = _form_image(echo, _speckle(speckle_z, anatomy.speckle_sigma, size), anatomy, sector)
        if gain is None:  # gain is set once per clip, like a sonographer does, so it does not flicker
            gain = auto_gain(img, sector.mask, anatomy.target_mean, anatomy.target_std)
        frames[t] = burn_in(gain.apply(img, sector.mask), overlay)
        if kind.frame_counter:
            counter = _frame_counter(t, size)
            frames[t] = np.maximum(frames[t], counter)
            overlay_alone = np.maximum(overlay_alone, counter)
    sector_truth = sector.mask
    if kind.split_screen:
        frames, sector_truth, overlay_alone = _split_screen(frames, sector_truth, overlay_alone)
    overlay_truth = overlay_alone > _OVERLAY_TRUTH_LEVEL
    if kind.doppler:
        frames = _colour_flow(frames, sector_truth & ~overlay_truth, np.array(phases))
    return Sweep(frames, [frame_label(s) for s in plan], sector_truth, overlay_truth)


def _frame_counter(t: int, size: int) -> np.ndarray:
    s = size / 128
    out = np.zeros((size, size), np.uint8)
    cv2.putText(out, f"{t:04d}", (round(100 * s), round(18 * s)), cv2.FONT_HERSHEY_SIMPLEX, 0.25 * s, 220, 1,
                cv2.LINE_AA)
    return out


def _split_screen(frames: np.ndarray, sector: np.ndarray, overlay_alone: np.ndarray):
    """Two half-width panes side by side (the clip and its time-reversed copy), vertically centred."""
    t, size, _ = frames.shape
    pane = (size - _SPLIT_GAP) // 2
    top = (size - pane) // 2

    def place(left: np.ndarray, right: np.ndarray, dtype) -> np.ndarray:
        canvas = np.zeros((size, size), dtype)
        canvas[top:top + pane, :pane] = left
        canvas[top:top + pane, size - pane:] = right
        return canvas

    def shrink(image: np.ndarray, interpolation: int) -> np.ndarray:
        return cv2.resize(image, (pane, pane), interpolation=interpolation)

    out = np.stack([place(shrink(a, cv2.INTER_AREA), shrink(b, cv2.INTER_AREA), np.uint8)
                    for a, b in zip(frames, frames[::-1], strict=True)])
    pane_sector = shrink(sector.astype(np.uint8), cv2.INTER_NEAREST).astype(bool)
    pane_overlay = shrink(overlay_alone, cv2.INTER_AREA)
    return out, place(pane_sector, pane_sector, bool), place(pane_overlay, pane_overlay, np.uint8)


def _colour_flow(frames: np.ndarray, region: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Colour Doppler: a colour box in the middle of the sector, red/blue flow pulsing with the heartbeat."""
    t, h, w = frames.shape
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    r0, r1 = rows[0] + (rows[-1] - rows[0]) // 3, rows[0] + 2 * (rows[-1] - rows[0]) // 3
    c0, c1 = cols[0] + (cols[-1] - cols[0]) // 3, cols[0] + 2 * (cols[-1] - cols[0]) // 3
    box = np.zeros((h, w), bool)
    box[r0:r1, c0:c1] = True
    box &= region
    xx = np.linspace(0, 2 * np.pi, w, dtype=np.float32)[None, :]
    rgb = np.repeat(frames[..., None], 3, axis=-1).astype(np.float32)
    for k, phase in enumerate(phases):
        velocity = np.sin(2 * np.pi * phase + xx) * np.ones((h, 1), np.float32)  # (H, W) in [-1, 1]
        red, blue = np.clip(velocity, 0, 1) * box, np.clip(-velocity, 0, 1) * box
        rgb[k, ..., 0] += 200 * red
        rgb[k, ..., 2] += 200 * blue
        rgb[k, ..., 1] -= 60 * (red + blue)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _slide(pose: Pose, amount: float) -> Pose:
    """Offset used during transitions: moving the probe cranially shifts the anatomy sideways."""
    return replace(pose, dy=pose.dy - 0.08 * amount, rotation_deg=pose.rotation_deg + 8 * amount)


# --------------------------------------------------------------------------------------------------
# Writing
