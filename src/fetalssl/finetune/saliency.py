"""Grad-CAM of a fine-tuned classifier on a sample of its correct and wrong test images (saliency.png)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from fetalssl.data.downstream import DownstreamDataModule
from fetalssl.models.saliency import grad_cam, gradcam_layer, overlay

log = logging.getLogger(__name__)

SALIENCY_FILE = "saliency.png"


def display_image(tensor: torch.Tensor, mean: Any, std: Any) -> np.ndarray:
    """A model input (C, H, W) back to the uint8 grey image it was made from (first channel)."""
    mean0 = mean if np.ndim(mean) == 0 else mean[0]
    std0 = std if np.ndim(std) == 0 else std[0]
    return np.clip(np.rint((tensor[0].numpy() * std0 + mean0) * 255), 0, 255).astype(np.uint8)


def write_saliency(images: DownstreamDataModule, backbone: nn.Module, head: nn.Module, test_probs: torch.Tensor,
                   per_kind: int, output_dir: Path) -> list[dict[str, Any]]:
    """Grad-CAM for the predicted class of the first ``per_kind`` correct and first ``per_kind`` wrong test images
    (predictions.csv order): a row of overlays each in saliency.png. Returns what was shown, for metrics.json."""
    dataset = images.dataset("test")
    labels = torch.from_numpy(dataset.labels).long()
    predicted = test_probs.argmax(dim=1)
    chosen = {kind: [int(i) for i in torch.nonzero((predicted == labels) == (kind == "correct")).flatten()[:per_kind]]
              for kind in ("correct", "wrong")}
    shown = [(kind, i) for kind in ("correct", "wrong") for i in chosen[kind]]
    if not shown:
        return []
    try:
        layer, to_map = gradcam_layer(backbone)
    except ValueError as err:  # e.g. an OpenCLIP tower: no Grad-CAM layer known, the run itself is fine
        log.warning("no saliency.png: %s", err)
        return []
    backbone, head = backbone.cpu().eval(), head.cpu().eval()  # with the test images, wherever training ran
    batch = torch.stack([dataset[i][0] for _, i in shown])
    cams = grad_cam(lambda x: head(backbone(x)), layer, to_map, batch, predicted[[i for _, i in shown]])
    fig = Figure(figsize=(2.2 * max(per_kind, 1), 4.8), layout="constrained")
    axes = fig.subplots(2, max(per_kind, 1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    record = []
    for (kind, i), image, cam in zip(shown, batch, cams, strict=True):
        column = chosen[kind].index(i)
        ax = axes[0 if kind == "correct" else 1, column]
        ax.imshow(overlay(display_image(image, images.mean, images.std), cam.numpy()))
        true, pred = images.classes[int(labels[i])], images.classes[int(predicted[i])]
        ax.set_title(f"{true} -> {pred} ({float(test_probs[i, predicted[i]]):.2f})", fontsize="small")
        record.append({"image_path": dataset.rows[i].image_path, "label": true, "pred": pred,
                       "correct": kind == "correct"})
    fig.suptitle("Grad-CAM of the predicted class: correct (top), wrong (bottom)", fontsize="small")
    fig.savefig(output_dir / SALIENCY_FILE, dpi=120)
    return record
