"""init=hog: logistic regression on HOG features, the classical baseline every learned init must beat.

Reads exactly the images a network run would (DownstreamDataModule: same patient split, same nested training
fraction for the seed), describes each un-augmented image with skimage's HOG, standardises the features on the
training subset and fits a multinomial logistic regression. Writes the same files as a network run
(predictions.csv, val_predictions.csv, confusion matrix, train_subset.csv) so metrics are computed by the same
code; model selection has nothing to select (no epochs), so val is reported only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from skimage.feature import hog
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fetalssl.data.downstream import DownstreamDataModule

log = logging.getLogger(__name__)


def hog_features(images: DownstreamDataModule, split: str, init_cfg: DictConfig) -> np.ndarray:
    """(N, D) HOG descriptors of one split's un-augmented images (first channel: the replicated grayscale)."""
    rows = []
    for x, _ in images.dataset(split, augment=False):
        rows.append(hog(x[0].numpy(), orientations=init_cfg.orientations,
                        pixels_per_cell=(init_cfg.pixels_per_cell,) * 2,
                        cells_per_block=(init_cfg.cells_per_block,) * 2, feature_vector=True))
    return np.stack(rows).astype(np.float32)


def fit_and_predict(cfg: DictConfig, output_dir: Path) -> tuple[DownstreamDataModule, dict[str, torch.Tensor]]:
    """Fit on the training subset; class probabilities (N, K) for val and test, in dataset order."""
    images = instantiate(cfg.data, output_dir=output_dir)
    images.setup("fit")  # HOG has no pretraining run: a measured normalisation is its training images'
    train = images.dataset("train")
    model = make_pipeline(StandardScaler(), LogisticRegression(
        C=cfg.init.C, max_iter=cfg.init.max_iter, random_state=cfg.seed,
        class_weight="balanced" if cfg.classifier.class_weighted else None))
    model.fit(hog_features(images, "train", cfg.init), train.labels)
    log.info("HOG + logistic regression fitted on %d images", len(train))
    probs = {}
    for split in ("test", "val"):
        known = model.predict_proba(hog_features(images, split, cfg.init))
        # A class absent from a tiny training subset has no column: give it probability 0.
        full = np.zeros((len(known), len(images.classes)), dtype=np.float32)
        full[:, model.classes_] = known
        probs[split] = torch.from_numpy(full)
    return images, probs

