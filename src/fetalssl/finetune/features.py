"""Cached-feature linear probe: run the frozen backbone once per image, then train the head on the features.

Much faster than the image loop for a linear probe (one backbone pass per image instead of one per epoch),
at one cost: training images are embedded with the eval transform, i.e. without augmentation. It is off by
default (`finetune_mode.cache_features: false`); with augmentation off, both paths train the same head.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fetalssl.data.downstream import DownstreamDataModule, SplitDataModule
from fetalssl.data.splits import SPLITS

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """(features (N, D), labels (N,)) on the CPU, in loader order, with the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval().to(device)
    features, labels = [], []
    for x, y in loader:
        features.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


class CachedFeatureDataModule(SplitDataModule):
    """Batches of (features (B, D), labels (B,)) for every split of a DownstreamDataModule."""

    def __init__(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int):
        super().__init__()
        self.features = features
        self.batch_size = batch_size

    @classmethod
    def from_images(cls, backbone: nn.Module, images: DownstreamDataModule,
                    device: torch.device) -> CachedFeatureDataModule:
        images.setup()
        features = {}
        # Each DataLoader iteration draws a seed from the global RNG: fork it so that caching leaves the head's
        # initialisation and batch order exactly as the looped probe would have them.
        with torch.random.fork_rng(devices=[]):
            for split in SPLITS:
                features[split] = extract_features(backbone, images.loader(split), device)
                log.info("Cached %s features of %d %s images", tuple(features[split][0].shape[1:]),
                         len(features[split][0]), split)
        return cls(features, images.batch_size)

    @property
    def num_features(self) -> int:
        return self.features["train"][0].shape[1]

    def loader(self, split: str, train: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(*self.features[split]), batch_size=self.batch_size, shuffle=train)
