"""Inpainting baseline (Context Encoders, Pathak et al. 2016): reconstruct the whole clean frame from a copy
with random rectangles erased. Same encoder/decoder as the autoencoder; only the input differs."""

from __future__ import annotations

import torch
from torch import Tensor

from fetalssl.methods.autoencoder import Autoencoder


def random_rectangle_mask(shape: tuple[int, int, int], n_holes: int, min_frac: float, max_frac: float,
                          device: torch.device | None = None) -> Tensor:
    """Boolean (B, H, W) mask, True inside ``n_holes`` axis-aligned rectangles per image whose sides are
    uniformly ``min_frac``..``max_frac`` of the image side, placed uniformly inside the image."""
    b, h, w = shape
    size = torch.tensor([h, w], device=device)
    side = (min_frac + (max_frac - min_frac) * torch.rand(b, n_holes, 2, device=device)) * size
    side = side.round().clamp(min=1).long()
    start = (torch.rand(b, n_holes, 2, device=device) * (size - side + 1)).long()
    ys = torch.arange(h, device=device).view(1, 1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, 1, w)
    y0, x0 = start[..., 0, None, None], start[..., 1, None, None]
    hh, ww = side[..., 0, None, None], side[..., 1, None, None]
    inside = (ys >= y0) & (ys < y0 + hh) & (xs >= x0) & (xs < x0 + ww)  # (B, n_holes, H, W)
    return inside.any(dim=1)


class Inpainting(Autoencoder):
    """Loss on the whole image (the paper's choice here), not only the holes."""

    def __init__(self, n_holes: int, min_hole_frac: float, max_hole_frac: float, fill_value: float,
                 **autoencoder_kwargs):
        super().__init__(**autoencoder_kwargs)
        if not 0 < min_hole_frac <= max_hole_frac <= 1:
            raise ValueError(f"need 0 < min_hole_frac <= max_hole_frac <= 1, got {min_hole_frac}, {max_hole_frac}")
        self.n_holes = n_holes
        self.min_hole_frac = min_hole_frac
        self.max_hole_frac = max_hole_frac
        self.fill_value = fill_value  # 0 = the mean intensity of normalised frames

    def corrupt(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        mask = random_rectangle_mask((b, h, w), self.n_holes, self.min_hole_frac, self.max_hole_frac, x.device)
        return x.masked_fill(mask[:, None], self.fill_value)
