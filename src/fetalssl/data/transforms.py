"""Augmentation plumbing. The presets themselves are YAML (conf/augment/*.yaml, albumentations.Compose with
`_target_`), the single source of truth; this module holds what the YAML refers to and the one place where
frames become normalised tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch


def two_views(view1: A.Compose, view2: A.Compose) -> dict[str, A.Compose]:
    """The object a two-view conf/augment preset instantiates to."""
    return {"view1": view1, "view2": view2}


def multi_crop(view1: A.Compose, view2: A.Compose, local: A.Compose, n_local: int, local_frames) -> dict[str, Any]:
    """Multi-crop (Caron et al. 2020, SwAV; DINO): the two global views plus ``n_local`` small crops made by
    ``local``; ``local_frames`` (fetalssl.data.pairs.LocalFrames) picks the frame each local crop is cut from."""
    if n_local < 1:
        raise ValueError(f"n_local must be >= 1, got {n_local} (use a two-view augment preset for none)")
    return {"view1": view1, "view2": view2, "locals": [local] * n_local, "local_frames": local_frames}


class CropToContent(A.ImageOnlyTransform):
    """Crop to the bounding box of pixels brighter than `threshold` (plus a `margin` fraction per side).

    Ultrasound frames carry a scan sector on a black background, often with text overlays in the corners far
    from the sector; cropping to the content first keeps later random crops inside the image. A frame with no
    content is returned unchanged.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        threshold: int
        margin: float

    def __init__(self, threshold: int = 10, margin: float = 0.02, p: float = 1.0):
        super().__init__(p=p)
        self.threshold = threshold
        self.margin = margin

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        rows, cols = content_bbox(img, self.threshold)
        if rows is None:
            return img
        h, w = img.shape[:2]
        dy, dx = round(self.margin * h), round(self.margin * w)
        return img[max(0, rows[0] - dy) : min(h, rows[1] + dy), max(0, cols[0] - dx) : min(w, cols[1] + dx)]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("threshold", "margin")


def content_bbox(img: np.ndarray, threshold: int) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(row_start, row_stop), (col_start, col_stop) of pixels above threshold; (None, None) if there are none."""
    h, w = img.shape[:2]
    flat = np.ascontiguousarray(img).reshape(h, -1)  # (H, W*C); cv2.reduce is ~10x faster than ndarray.max
    row_max = cv2.reduce(flat, 1, cv2.REDUCE_MAX).ravel()
    col_max = cv2.reduce(flat, 0, cv2.REDUCE_MAX).reshape(w, -1).max(axis=1)
    rows, cols = np.flatnonzero(row_max > threshold), np.flatnonzero(col_max > threshold)
    if rows.size == 0:
        return None, None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def with_channels(frame: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) frame -> (H, W, channels); gray is replicated for 3 (ColorJitter needs RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == channels:
        return frame
    if channels == 3:
        return np.repeat(frame, 3, axis=-1)
    return np.round(frame @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]


def to_normalised_tensor(image: np.ndarray, mean: float | Sequence[float],
                         std: float | Sequence[float]) -> torch.Tensor:
    """uint8 (H, W, C) -> float (C, H, W), scaled to [0, 1] then (x - mean) / std; mean and std are one value for
    every channel or one per channel."""
    # one fused numpy pass on a contiguous CHW copy: torch ops on the permuted view are several times slower
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    if np.ndim(mean) == 0:
        chw *= 1.0 / (255.0 * std)
        chw -= mean / std
    else:
        std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        chw *= 1.0 / (255.0 * std)
        chw -= np.asarray(mean, np.float32).reshape(-1, 1, 1) / std
    return torch.from_numpy(chw)


def to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> uint8 (C, H, W), contiguous: what a pretraining loader worker ships."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalise_uint8(images: torch.Tensor, mean: float, std: float, channels: int) -> torch.Tensor:
    """uint8 (..., C, H, W) with C 1 or ``channels`` -> float (..., channels, H, W), (x / 255 - mean) / std: the
    same values as to_normalised_tensor, computed where the batch is (the GPU) after a 1-channel uint8 transfer."""
    if images.dtype != torch.uint8 or images.shape[-3] not in (1, channels):
        raise ValueError(f"expected uint8 images with 1 or {channels} channels, got {images.dtype} "
                         f"{tuple(images.shape)}")
    normalised = images.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)  # then replicated: the cheaper order
    return normalised.expand(*images.shape[:-3], channels, *images.shape[-2:]).contiguous()


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Zero-pad (H, W[, C]) to a square, the image centred (FetalCLIP's preprocessing before resizing)."""
    h, w = image.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padding = [(top, side - h - top), (left, side - w - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, padding)
