"""Grad-CAM (Selvaraju et al. 2017) for the classifiers fetalssl trains: where in the image the evidence for a class
lies, as a map over the input.

Written here rather than taken from pytorch-grad-cam, which installs a second OpenCV beside albumentations'
headless one, or captum, whose LayerGradCam assumes convolutional (B, C, H, W) layer outputs: a ViT's evidence
sits in its patch tokens, which need the reshape below."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

ToMap = Callable[[Tensor], Tensor]
OVERLAY_ALPHA = 0.45  # share of the heat map in an overlay: the anatomy stays readable beneath it


def gradcam_layer(backbone: nn.Module) -> tuple[nn.Module, ToMap]:
    """The layer whose activations Grad-CAM weighs, and how its output becomes a (B, C, h, w) map.

    CNNs (ResNet, ConvNeXt, any timm model with feature_info): the last feature stage. ViT: the input of the last
    block's attention (blocks[-1].norm1), whose patch tokens the class token still reads; after the last block
    they no longer reach a class-token output."""
    if isinstance(backbone, VisionTransformer):
        prefix, (h, w) = backbone.num_prefix_tokens, backbone.patch_embed.grid_size

        def tokens_to_map(tokens: Tensor) -> Tensor:
            patches = tokens[:, prefix:]
            return patches.transpose(1, 2).reshape(len(tokens), patches.shape[2], h, w)

        return backbone.blocks[-1].norm1, tokens_to_map
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"no Grad-CAM layer known for a {type(backbone).__name__} backbone (no timm feature_info)")
    return backbone.get_submodule(info[-1]["module"]), lambda x: x


def grad_cam(logits_of: Callable[[Tensor], Tensor], layer: nn.Module, to_map: ToMap, images: Tensor,
             targets: Tensor) -> Tensor:
    """(B, H, W) maps in [0, 1] for ``targets`` (class indices): ReLU of the layer's channels weighted by the
    spatial mean of the class logit's gradient, upsampled to the image (bilinear), each divided by its maximum."""
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = logits_of(images.detach().requires_grad_(True))  # a graph even for a frozen backbone
            (activations,) = captured
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    maps, weights = to_map(activations.detach()), to_map(gradients).mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 grey (H, W) image with the map (H, W, in [0, 1]) blended over it in the jet colours: uint8 RGB."""
    grey = np.repeat(image[..., None], 3, axis=-1).astype(np.float32) / 255
    heat = colormaps["jet"](cam)[..., :3]
    return np.clip(255 * ((1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * heat), 0, 255).astype(np.uint8)
