"""Positive-pair samplers: which cached frames make up each of the two views.

A sampler is called as `sampler(rng, n_frames, fps, stride)` for one video with `n_frames` cached frames (cached
frame k is source frame k * stride; the source runs at `fps`) and returns a `PairSpec`: per view, a list of
(cached frame index, weight) whose weighted sum is the view's image before augmentation. All randomness comes
from the numpy Generator passed in, so a pair is a pure function of it.
Gaps are given in source frames or seconds and converted to cached-frame units (rounded down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNITS = ("frames", "seconds")

ViewSpec = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PairSpec:
    view1: ViewSpec
    view2: ViewSpec

    def frame_indices(self) -> list[int]:
        return sorted({i for i, _ in (*self.view1, *self.view2)})


def gap_in_cached_frames(gap: float, unit: str, fps: float, stride: int) -> int:
    """A gap in source frames or seconds, as a whole number of cached frames (rounded down)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "seconds":
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"a gap in seconds needs the video's fps, which is unknown ({fps})")
        gap = gap * fps
    return int(math.floor(gap / stride + 1e-9))


def _neighbour(rng: np.random.Generator, anchor: int, max_gap: int, n_frames: int) -> int:
    """Uniform over frames within +-max_gap of anchor (anchor included), clipped to the video."""
    low, high = max(0, anchor - max_gap), min(n_frames - 1, anchor + max_gap)
    return int(rng.integers(low, high + 1))


class SameFramePairs:
    """Both views from one frame (SimCLR/Barlow Twins on still images)."""

    def __call__(self, rng: np.random.Generator, n_frames: int, fps: float, stride: int) -> PairSpec:
        frame = int(rng.integers(n_frames))
        return PairSpec(((frame, 1.0),), ((frame, 1.0),))


class TemporalPairs:
    """Second view from a frame within +-max_gap (source frames or seconds) of the first."""

    def __init__(self, max_gap: float, unit: str):
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        gap_in_cached_frames(0, unit, 1.0, 1)  # validates unit
        self.max_gap = max_gap
        self.unit = unit

    def __call__(self, rng: np.random.Generator, n_frames: int, fps: float, stride: int) -> PairSpec:
        gap = gap_in_cached_frames(self.max_gap, self.unit, fps, stride)
        anchor = int(rng.integers(n_frames))
        return PairSpec(((anchor, 1.0),), ((_neighbour(rng, anchor, gap, n_frames), 1.0),))


class MixupPairs:
    """USCL-style: each view mixes the anchor frame with its own neighbour within +-window.

    view = lam * anchor + (1 - lam) * neighbour, lam ~ Beta(alpha, alpha), or Uniform(0, 1) when alpha is null.
    """

    def __init__(self, window: float, unit: str, alpha: float | None):
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"alpha must be > 0 or null (uniform), got {alpha}")
        gap_in_cached_frames(0, unit, 1.0, 1)
        self.window = window
        self.unit = unit
        self.alpha = alpha

    def _weight(self, rng: np.random.Generator) -> float:
        return float(rng.uniform() if self.alpha is None else rng.beta(self.alpha, self.alpha))

    def _view(self, rng: np.random.Generator, anchor: int, gap: int, n_frames: int) -> ViewSpec:
        lam = self._weight(rng)
        return ((anchor, lam), (_neighbour(rng, anchor, gap, n_frames), 1.0 - lam))

    def __call__(self, rng: np.random.Generator, n_frames: int, fps: float, stride: int) -> PairSpec:
        gap = gap_in_cached_frames(self.window, self.unit, fps, stride)
        anchor = int(rng.integers(n_frames))
        return PairSpec(self._view(rng, anchor, gap, n_frames), self._view(rng, anchor, gap, n_frames))


class LocalFrames:
    """Which frame each local crop of multi-crop is cut from. Local crop i belongs to global view i % 2: with
    ``max_gap`` 0 it is cut from that view's own frame(s) (the image multi-crop of DINO); otherwise from one frame
    within +-max_gap (source frames or seconds) of that view's first frame, so local crops also see nearby moments
    of the video."""

    def __init__(self, max_gap: float, unit: str):
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        gap_in_cached_frames(0, unit, 1.0, 1)
        self.max_gap = max_gap
        self.unit = unit

    def __call__(self, rng: np.random.Generator, pair: PairSpec, n_local: int, n_frames: int, fps: float,
                 stride: int) -> tuple[ViewSpec, ...]:
        globals_ = (pair.view1, pair.view2)
        if self.max_gap == 0:
            return tuple(globals_[i % 2] for i in range(n_local))
        gap = gap_in_cached_frames(self.max_gap, self.unit, fps, stride)
        return tuple(((_neighbour(rng, globals_[i % 2][0][0], gap, n_frames), 1.0),) for i in range(n_local))


def compose_view(frames: dict[int, np.ndarray], view: ViewSpec) -> np.ndarray:
    """Weighted sum of the view's frames, as uint8 (a single frame passes through untouched)."""
    if len(view) == 1:
        return np.asarray(frames[view[0][0]])
    mixed = sum(weight * frames[index].astype(np.float32) for index, weight in view)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
