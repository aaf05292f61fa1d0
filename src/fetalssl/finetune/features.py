"""Cached-feature linear probe: run the frozen backbone once per image, then train the head on the features.

Much faster than the image loop for a linear probe (one backbone pass per image instead of one per epoch),
at one cost: training images are embedded with the eval transform, i.e. without augmentation. It is off by
default (`finetune_mode.cache_features: false`); with augmentation off, both paths train the same head.

With `feature_cache_dir` (conf/finetune.yaml) the features also persist on disk, keyed by what determines them
(backbone class and weights, the images' paths, sizes and modification times, the eval transform, the
normalisation and the device type), so the runs of a sweep that share a frozen backbone (every fraction and
seed of an SSL init; every fraction of a random init's seed) embed each image once, in one process or many.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fetalssl.data.downstream import DownstreamDataModule, EpochShuffle, LabelledImageDataset, SplitDataModule
from fetalssl.data.splits import SPLITS
from fetalssl.evaluation import Features, extract_features
from fetalssl.io import save_torch

log = logging.getLogger(__name__)

def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's class and every state_dict entry (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_digest(dataset: LabelledImageDataset) -> str:
    """sha256 over what turns the dataset's files into tensors: each file's path, size and mtime, in order,
    the transform (albumentations' repr lists every parameter), the padding, the scan options and the
    normalisation."""
    digest = hashlib.sha256(repr((dataset.transform, dataset.mean, dataset.std, dataset.channels,
                                  dataset.image_size, dataset.scan.key(), dataset.pad_square)).encode())
    for row in dataset.rows:
        stat = row.path.stat()
        digest.update(f"{row.path}|{stat.st_size}|{stat.st_mtime_ns}|{row.label}\n".encode())
    return digest.hexdigest()


def cached_extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                            cache_dir: Path | None, weights: str | None = None) -> Features:
    """extract_features, read from / written to cache_dir when given (atomic writes; an unreadable or
    mismatching file is logged and recomputed)."""
    if cache_dir is None:
        return extract_features(backbone, loader, device)
    weights = weights or weights_digest(backbone)
    key = hashlib.sha256(f"{weights}|{images_digest(loader.dataset)}|{device.type}".encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if len(cached["labels"]) == len(loader.dataset):
                log.debug("Read cached features %s", path)
                return cached["features"], cached["labels"]
            log.warning("%s holds %d rows, expected %d: recomputing", path, len(cached["labels"]),
                        len(loader.dataset))
        except Exception as err:  # a cache must never stop a run: recompute and overwrite it
            log.warning("Cannot read cached features %s (%s): recomputing", path, err)
    features, labels = extract_features(backbone, loader, device)
    save_torch({"features": features, "labels": labels}, path)
    return features, labels


class CachedFeatureDataModule(SplitDataModule):
    """Batches of (features (B, D), labels (B,)) for every split of a DownstreamDataModule."""

    def __init__(self, features: dict[str, Features], batch_size: int, seed: int):
        super().__init__()
        self.features = features
        self.batch_size = batch_size
        self.seed = seed

    @classmethod
    def from_images(cls, backbone: nn.Module, images: DownstreamDataModule, device: torch.device,
                    cache_dir: str | Path | None = None) -> CachedFeatureDataModule:
        images.setup()
        weights = weights_digest(backbone) if cache_dir is not None else None
        features = {}
        # Each DataLoader iteration draws a seed from the global RNG: fork it so that caching leaves the head's
        # initialisation and batch order exactly as the looped probe would have them.
        with torch.random.fork_rng(devices=[]):
            for split in SPLITS:
                features[split] = cached_extract_features(backbone, images.loader(split), device,
                                                          None if cache_dir is None else Path(cache_dir), weights)
                log.debug("Features %s of %d %s images", tuple(features[split][0].shape[1:]),
                         len(features[split][0]), split)
        return cls(features, images.batch_size, images.seed)

    @property
    def num_features(self) -> int:
        return self.features["train"][0].shape[1]

    def loader(self, split: str, train: bool = False) -> DataLoader:
        # The image loop's order (EpochShuffle of the same seed), so both paths train the same head.
        rows = FeatureRows(*self.features[split])
        return DataLoader(rows, batch_size=self.batch_size,
                          sampler=EpochShuffle(len(rows), self.seed) if train else None)


class FeatureRows(TensorDataset):
    """TensorDataset that also takes EpochShuffle's ``(index, epoch)`` keys (features need no augmentation)."""

    def __getitem__(self, key: int | tuple[int, int]):
        return super().__getitem__(key[0] if isinstance(key, tuple) else key)
