"""Light image decoder for the autoencoder and inpainting baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _up(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True)]


class ConvDecoder(nn.Module):
    """Pooled embedding (B, in_dim) -> image (B, out_chans, image_size, image_size).

    A linear layer makes a ``channels[0]`` x s x s seed map; each entry of ``channels`` then marks one stride-2
    transposed conv, the last one producing the image (no activation: targets are normalised frames). With
    five entries the seed is image_size / 32, mirroring the encoder's stride. Decoding from the pooled
    embedding works for any backbone and trains exactly the features used downstream.
    """

    def __init__(self, in_dim: int, out_chans: int, image_size: int, channels: Sequence[int]):
        super().__init__()
        self.image_size = image_size
        self.seed = math.ceil(image_size / 2 ** len(channels))
        self.stem = nn.Sequential(
            nn.Linear(in_dim, channels[0] * self.seed**2, bias=False),
            nn.Unflatten(1, (channels[0], self.seed, self.seed)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        ups: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            ups += _up(c_in, c_out)
        ups += [nn.ConvTranspose2d(channels[-1], out_chans, 4, stride=2, padding=1)]
        self.up = nn.Sequential(*ups)

    def forward(self, z: Tensor) -> Tensor:
        x = self.up(self.stem(z))
        if x.shape[-1] != self.image_size:  # image sizes that are not seed * 2**k
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x
