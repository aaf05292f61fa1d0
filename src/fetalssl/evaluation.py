"""What pretraining monitors, fine-tuning and the report share: frozen-feature extraction, kNN voting and
the video-level grouping of frame predictions. One home, so the three agree by construction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

Features = tuple[Tensor, Tensor]


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> Features:
    """(features (N, D), labels (N,)) on the CPU, in loader order, with the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval().to(device)
    features, labels = [], []
    for x, y in loader:
        features.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int) -> Tensor:
    """Majority vote among the k nearest training features by cosine similarity."""
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    neighbours = train_y[sim.topk(min(k, len(train_x)), dim=1).indices]  # (N_test, k)
    votes = F.one_hot(neighbours, int(train_y.max()) + 1).sum(dim=1)
    return votes.argmax(dim=1)


def weighted_knn_probs(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int, temperature: float,
                       num_classes: int) -> Tensor:
    """Class probabilities (N_test, num_classes) from the k most cosine-similar training features, each neighbour
    voting for its class with weight exp(similarity / temperature), votes normalised to sum to 1."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
    sim = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    top, index = sim.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes).scatter_add_(1, train_y[index], (top / temperature).exp())
    return votes / votes.sum(1, keepdim=True)


def mean_per_video(videos: Sequence[str], targets: np.ndarray, probs: np.ndarray,
                   source: str) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """(video names, frame rows of each, video labels, video probabilities = mean of the frames'): a video's
    prediction is the argmax of its frames' mean probabilities. Raises if a video's frames disagree on the label."""
    names = sorted(set(videos))
    rows = [np.flatnonzero(np.asarray(videos) == name) for name in names]
    for name, r in zip(names, rows, strict=True):
        if len(set(targets[r].tolist())) > 1:
            raise ValueError(f"{source}: video {name} has frames of several labels")
    return names, rows, np.array([targets[r[0]] for r in rows]), np.stack([probs[r].mean(0) for r in rows])
