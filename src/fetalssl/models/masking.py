"""Patch-level parts for masked image modelling (MAE): split an image into patches, keep a random subset of
tokens, and run a timm VisionTransformer on the kept ones."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches in row-major order, each flattened as (p, p, C)."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def random_masking(tokens: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a uniformly random ``1 - mask_ratio`` of each sample's tokens (B, N, D) (He et al. 2022, by sorting
    noise). Returns the kept tokens (B, N_keep, D), the mask (B, N; 1 = removed) and the order that puts the
    kept tokens followed by the removed ones back in place (B, N)."""
    b, n, d = tokens.shape
    keep = int(n * (1 - mask_ratio))
    if not 0 < keep < n:
        raise ValueError(f"mask_ratio {mask_ratio} of {n} patches keeps {keep}: must keep at least one and mask one")
    shuffle = torch.rand(b, n, device=tokens.device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def check_maskable(vit: object) -> VisionTransformer:
    """MAE needs a timm VisionTransformer with one class token, no register tokens and position embeddings for
    the class token and a fixed patch grid (the ViT-S/B/L models)."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"MAE needs a timm VisionTransformer backbone (backbone=vit_small), got {type(vit).__name__}")
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class or vit.dynamic_img_size:
        raise ValueError("MAE needs a ViT with one class token, no register tokens, a class position embedding and "
                         "a fixed image size (no dynamic_img_size)")
    return vit


def encode_visible(vit: VisionTransformer, images: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ViT on a random ``1 - mask_ratio`` of its patches: position embeddings are added before masking, the
    class token is prepended after. Returns the encoded tokens (B, 1 + N_keep, D), the mask and the restore order
    of :func:`random_masking`."""
    prefix = vit.num_prefix_tokens
    tokens = vit.patch_embed(images) + vit.pos_embed[:, prefix:]
    kept, mask, restore = random_masking(tokens, mask_ratio)
    cls = (vit.cls_token + vit.pos_embed[:, :prefix]).expand(len(images), -1, -1)
    x = vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, kept], dim=1))))
    return x, mask, restore
