"""Light image decoders: a convolutional one for the autoencoder and inpainting baselines, a transformer one for MAE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
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


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, section 3): the encoded visible tokens, projected to ``dim``, with a
    shared learned mask token in every removed position, fixed 2-D sin-cos position embeddings, ``depth``
    transformer blocks, and a linear layer to the pixels of each patch (B, N, p * p * C)."""

    def __init__(self, embed_dim: int, grid_size: Sequence[int], patch_size: int, in_chans: int, dim: int,
                 depth: int, num_heads: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(nn.init.normal_(torch.empty(1, 1, dim), std=0.02))
        patch_pos = build_sincos2d_pos_embed(list(grid_size), dim)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), patch_pos]).unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)

    def forward(self, encoded: Tensor, restore: Tensor) -> Tensor:
        x = self.embed(encoded)
        b, kept, d = x[:, 1:].shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, restore.shape[1] - kept, -1)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, d))
        x = self.norm(self.blocks(torch.cat([x[:, :1], patches], dim=1) + self.pos_embed))
        return self.pred(x[:, 1:])
