"""Grad-CAM: the layer chosen per backbone family, and maps that put the evidence where the toy model reads it."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

from fetalssl.models.saliency import grad_cam, gradcam_layer, overlay


@pytest.mark.parametrize("name, kwargs, layer_name", [
    ("resnet18", {}, "layer4"),
    ("convnext_atto", {}, "stages.3"),
    ("vit_small_patch16_224", {"img_size": 64}, "blocks.11.norm1"),
])
def test_the_layer_is_the_last_feature_stage_or_the_last_attentions_input(name, kwargs, layer_name):
    backbone = timm.create_model(name, num_classes=0, in_chans=1, **kwargs).eval()
    layer, to_map = gradcam_layer(backbone)
    assert layer is backbone.get_submodule(layer_name)
    captured = []
    handle = layer.register_forward_hook(lambda m, a, out: captured.append(out))
    backbone(torch.randn(2, 1, 64, 64))
    handle.remove()
    grid = to_map(captured[0])
    assert grid.ndim == 4 and grid.shape[0] == 2 and grid.shape[-2:] == ((4, 4) if "vit" in name else (2, 2))
    head = nn.Linear(backbone.num_features, 3)
    with torch.no_grad():  # evidence for every class grows with the features, so no map is all zero
        head.weight.abs_()
    cams = grad_cam(lambda x: head(backbone(x)), layer, to_map, torch.randn(2, 1, 64, 64), torch.tensor([0, 2]))
    assert cams.shape == (2, 64, 64) and cams.min() >= 0
    torch.testing.assert_close(cams.amax(dim=(1, 2)), torch.ones(2))  # each scaled to its peak


class LeftRight(nn.Module):
    """Channel 0 of the feature map, averaged over the left half, is class 0's logit; channel 1 over the right
    half is class 1's."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.zero_()

    def forward(self, x):
        f = self.features(x)
        half = f.shape[-1] // 2
        return torch.stack([f[:, 0, :, :half].mean(dim=(1, 2)), f[:, 1, :, half:].mean(dim=(1, 2))], dim=1)


def test_the_map_of_a_class_lies_where_the_model_reads_that_class():
    model = LeftRight()
    images = torch.rand(2, 1, 8, 8) + 0.5
    cams = grad_cam(model, model.features, lambda x: x, images, torch.tensor([0, 1]))
    assert cams[0, :, :4].min() > 0 and cams[1, :, 4:].min() > 0  # the half each class is read from
    # Grad-CAM weighs whole channels (the gradient's mean over the map), so the other half is not zero; the
    # class's own channel is the one weighted: class 0's map is channel 0 alone
    expected = images[0, 0] / images[0, 0].max()
    torch.testing.assert_close(cams[0], expected, rtol=1e-5, atol=1e-6)


def test_overlay_keeps_the_image_size_and_shows_the_map():
    image = np.full((6, 6), 128, np.uint8)
    cam = np.zeros((6, 6))
    cam[:3] = 1.0
    shown = overlay(image, cam)
    assert shown.shape == (6, 6, 3) and shown.dtype == np.uint8
    assert not np.array_equal(shown[0, 0], shown[5, 5])  # hot and cold parts differ


def test_a_backbone_without_a_known_layer_gets_no_saliency_and_a_warning_not_a_failed_run(tmp_path, caplog):
    from types import SimpleNamespace

    from fetalssl.finetune.saliency import write_saliency

    dataset = SimpleNamespace(labels=np.array([0, 1]), rows=[], __getitem__=None)
    images = SimpleNamespace(dataset=lambda split: dataset, classes=["a", "b"], mean=0.5, std=0.25)
    tower = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # like an OpenCLIP tower: no timm feature_info
    shown = write_saliency(images, tower, nn.Identity(), torch.tensor([[0.9, 0.1], [0.9, 0.1]]), 2, tmp_path)
    assert shown == [] and "no saliency.png" in caplog.text and not (tmp_path / "saliency.png").exists()
