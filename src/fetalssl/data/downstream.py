"""Labelled standard-plane images for fine-tuning: patient-grouped splits and nested label fractions.

Batches are `(images float (B, C, H, W), labels long (B,))`. Images are read as grayscale uint8, augmented
with albumentations (given as instantiated `Compose` objects from conf/data/labelled.yaml), scaled to
[0, 1], normalised with the configured mean/std and replicated to `channels`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fetalssl.data.scan import ScanOptions, analyse_still, apply_to_frames, intensity_moments
from fetalssl.data.splits import (
    LABELS_CSV,
    SPLITS,
    LabelledImage,
    check_classes_present,
    check_given_splits,
    check_images,
    fold_splits,
    grouped_folds,
    grouped_split,
    infer_classes,
    nested_fraction,
    read_manifest,
)
from fetalssl.data.transforms import pad_to_square, to_normalised_tensor

log = logging.getLogger(__name__)

SUBSET_FILE = "train_subset.csv"
SUBSET_COLUMNS = ("image_path", "label", "patient_id")


def load_grayscale(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"{path}: cannot be read as an image")
    return image


def load_scan_image(path: Path, scan: ScanOptions) -> np.ndarray:
    """A labelled still as the model sees it: grayscale, with the scan options applied to its own layout."""
    image = load_grayscale(path)
    if not scan.changes_pixels:
        return image
    return apply_to_frames(image, analyse_still(image, None, scan.detector), scan)


def still_intensity_stats(paths: Sequence[Path], scan: ScanOptions) -> tuple[float, float]:
    """(mean, std) of x/255 over the live image (sector minus overlays) of these stills, as processed."""
    totals = np.zeros(3)
    for path in paths:
        image = load_grayscale(path)
        layout = analyse_still(image, None, scan.detector)
        totals += intensity_moments(apply_to_frames(image, layout, scan)[None], layout)
    if totals[0] == 0:
        raise ValueError("no live-image pixels in the training images to compute the normalisation from")
    mean = totals[1] / totals[0]
    return float(mean), float(np.sqrt(max(totals[2] / totals[0] - mean * mean, 0.0)))


class LabelledImageDataset(Dataset):
    """Item ``i`` or ``(i, epoch)``: (normalised image, class index). The transform is seeded per item from
    ``(seed, epoch, i)``, so augmented images do not depend on the worker count or on albumentations' own
    generator (which global seeding does not reach); a plain ``i`` means epoch 0."""

    def __init__(self, rows: Sequence[LabelledImage], classes: Sequence[str], transform: A.Compose,
                 channels: int, mean: float | Sequence[float], std: float | Sequence[float], scan: ScanOptions,
                 pad_square: bool, image_size: int, seed: int):
        self.rows = list(rows)
        self.pad_square = pad_square
        self.scan = scan
        self.seed = seed
        self.class_to_index = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.channels = channels
        self.mean = mean
        self.std = std
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_paths(self) -> list[str]:
        """Manifest paths (relative to the CSV / class-folder root), in loader order for unshuffled loaders."""
        return [r.image_path for r in self.rows]

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.class_to_index[r.label] for r in self.rows], dtype=np.int64)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        row = self.rows[index]
        self.transform.set_random_seed(int(np.random.default_rng([self.seed, epoch, index]).integers(2**31)))
        image = load_scan_image(row.path, self.scan)
        image = self.transform(image=pad_to_square(image) if self.pad_square else image)["image"]
        if image.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"{row.path}: transform produced {image.shape[:2]}, expected image_size "
                             f"{self.image_size}; check the transforms in conf/data/labelled.yaml")
        return to_model_input(image, self.channels, self.mean, self.std), self.class_to_index[row.label]


def per_channel_or_one(value: float | Sequence[float] | None) -> float | list[float] | None:
    """A normalisation value as plain Python: one number for every channel, or a list of one per channel."""
    if value is None or isinstance(value, int | float):
        return value if value is None else float(value)
    return [float(v) for v in value]


def to_model_input(image: np.ndarray, channels: int, mean: float | Sequence[float],
                   std: float | Sequence[float]) -> torch.Tensor:
    """uint8 grayscale (H, W) -> float (channels, H, W): the pretraining frames' scaling with one mean/std for every
    channel (normalised once, then replicated: the cheaper order), or per-channel values (an OpenCLIP tower's
    RGB statistics) applied to the replicated channels."""
    if np.ndim(mean) == 0:
        return to_normalised_tensor(image[..., None], mean, std).repeat(channels, 1, 1)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"per-channel mean {list(mean)} / std {list(std)} do not match channels={channels}")
    return to_normalised_tensor(np.repeat(image[..., None], channels, axis=-1), mean, std)


class EpochShuffle(Sampler[tuple[int, int]]):
    """Training order: a permutation drawn from ``(seed, epoch)``, yielding ``(index, epoch)`` so the dataset seeds
    each item's augmentation from it. The epoch advances with every pass; it travels with the index, so it
    reaches persistent workers too."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return iter([(int(i), epoch) for i in order])


class SplitDataModule(L.LightningDataModule):
    """Lightning's dataloader hooks over one `loader(split, train)`: training batches are shuffled (and
    augmented where that applies); val, test and predict read their split in order."""

    def loader(self, split: str, train: bool = False) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")


class DownstreamDataModule(SplitDataModule):
    """Labelled images from a CSV or class folders, split by patient, with a nested training fraction.

    Everything (reading, validation, splitting, subset selection) happens in the first `setup()` call, so all
    input errors surface before training. `output_dir`, when given, receives train_subset.csv.
    """

    def __init__(self, root: str, classes: Sequence[str] | None, patient_id: str, patient_pattern: str | None,
                 image_extensions: Sequence[str], min_image_side: int, val_fraction: float, test_fraction: float,
                 split_seed: int, folds: int | None, fold: int | None,
                 fraction: float, fraction_seed: int, image_size: int, channels: int,
                 mean: float | Sequence[float] | None, std: float | Sequence[float] | None, scan: ScanOptions,
                 pad_to_square: bool, train_transform: A.Compose, eval_transform: A.Compose, batch_size: int, num_workers: int,
                 seed: int, output_dir: str | Path | None = None):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: must be 1 or 3")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError(f"classes {list(classes)} has duplicates")
        self.root = Path(root)
        self.classes = None if classes is None else list(classes)  # None: inferred from the labels in setup()
        self.patient_id = patient_id
        self.patient_pattern = patient_pattern
        self.min_image_side = min_image_side
        self.image_extensions = list(image_extensions)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        if folds is not None and fold is None:
            raise ValueError(f"data.folds={folds}: set data.fold to the round to run (0..{folds - 1})")
        self.folds = folds
        self.fold = fold
        self.fraction = fraction
        self.fraction_seed = fraction_seed
        self.image_size = image_size
        self.channels = channels
        if (mean is None) != (std is None):
            raise ValueError(f"data.mean={mean}, data.std={std}: give both, or neither (normalization=measured)")
        self.mean, self.std = per_channel_or_one(mean), per_channel_or_one(std)
        self.normalization_source = "config" if mean is not None else None
        self.scan = scan
        self.pad_to_square = pad_to_square
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.split_rows: dict[str, list[LabelledImage]] | None = None

    # ---- manifest, splits, subset ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.split_rows is not None:
            return
        rows = read_manifest(self.root, self.classes, self.patient_id, self.patient_pattern, self.image_extensions)
        if self.classes is None:
            self.classes = infer_classes(rows, self.root)
        check_images(rows, self.min_image_side)
        # Sorted so the split and subset depend on the data only, not on CSV row or directory listing order.
        rows.sort(key=lambda r: r.image_path)
        if self.folds is not None:
            rows = self._fold_split(rows)
        elif any(r.split is not None for r in rows):
            check_given_splits(rows)
            log.info("Using the splits given in %s", self.root)
        else:
            rows = self._split(rows)
        check_classes_present(rows, self.classes)
        by_split = {s: [r for r in rows if r.split == s] for s in SPLITS}
        train = by_split["train"]
        keep = nested_fraction(self._label_indices(train), self.fraction, self.fraction_seed)
        by_split["train"] = [train[i] for i in keep]
        self.split_rows = by_split
        if self.mean is None:
            self.mean, self.std = still_intensity_stats([r.path for r in by_split["train"]], self.scan)
            self.normalization_source = f"measured over the live image of {len(keep)} training images"
            log.info("normalisation: mean %.4f, std %.4f (%s)", self.mean, self.std, self.normalization_source)
        log.info("Split sizes: %s; training on %d of %d (fraction %s, seed %d)",
                 {s: len(v) for s, v in by_split.items()}, len(keep), len(train), self.fraction,
                 self.fraction_seed)
        if self.output_dir is not None:
            self.write_subset(self.output_dir / SUBSET_FILE)

    def _label_indices(self, rows: Sequence[LabelledImage]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in rows], dtype=np.int64)

    def _split(self, rows: list[LabelledImage]) -> list[LabelledImage]:
        splits = grouped_split(self._label_indices(rows), [r.patient_id for r in rows], self.val_fraction,
                               self.test_fraction, self.split_seed)
        return self._with_splits(rows, splits)

    def _fold_split(self, rows: list[LabelledImage]) -> list[LabelledImage]:
        """Cross-validation round `fold` of `folds`: the manifest's `fold` column when it has one (written by
        fetalssl-extract-frames, so pretraining manifests per fold match), else patient-grouped,
        label-stratified folds seeded by split_seed. A given `split` column is not used."""
        if any(r.split is not None for r in rows):
            log.info("data.folds=%d: the split column of %s is not used", self.folds, self.root)
        if any(r.fold is not None for r in rows):
            check_given_splits(rows, attribute="fold")
            folds = np.array([r.fold for r in rows])
            outside = sorted(set(folds.tolist()) - set(range(self.folds)))
            if outside:
                raise ValueError(f"{self.root}: fold column holds {outside}, outside 0..{self.folds - 1} "
                                 f"(data.folds={self.folds})")
        else:
            folds = grouped_folds(self._label_indices(rows), [r.patient_id for r in rows], self.folds,
                                  self.split_seed)
        log.info("cross-validation: fold %d of %d is test, fold %d val", self.fold, self.folds,
                 (self.fold + 1) % self.folds)
        return self._with_splits(rows, fold_splits(folds, self.fold, self.folds))

    @staticmethod
    def _with_splits(rows: Sequence[LabelledImage], splits: Sequence[str]) -> list[LabelledImage]:
        return [replace(r, split=str(s)) for r, s in zip(rows, splits, strict=True)]

    def labels_csv(self) -> Path | None:
        """The labels CSV read (a CSV given as root, or root/labels.csv); None for class folders."""
        if (self.root / LABELS_CSV).is_file():
            return self.root / LABELS_CSV
        return self.root if self.root.is_file() else None

    def rows(self, split: str) -> list[LabelledImage]:
        """Rows of a split; "train" is the fraction subset actually trained on."""
        if self.split_rows is None:
            raise RuntimeError("call setup() first")
        return self.split_rows[split]

    def write_subset(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SUBSET_COLUMNS)
            writer.writerows((r.image_path, r.label, r.patient_id) for r in self.rows("train"))

    def class_counts(self) -> np.ndarray:
        """Images per class in the training subset, in `classes` order."""
        return np.bincount(self._label_indices(self.rows("train")), minlength=len(self.classes))

    def class_weights(self) -> torch.Tensor:
        """N / N_c per class (N: training images, N_c: those of class c)."""
        counts = self.class_counts()
        return torch.tensor(counts.sum() / counts, dtype=torch.float32)

    # ---- datasets and loaders ----------------------------------------------------------------------
    def dataset(self, split: str, augment: bool = False) -> LabelledImageDataset:
        transform = self.train_transform if augment else self.eval_transform
        return LabelledImageDataset(self.rows(split), self.classes, transform, self.channels, self.mean,
                                    self.std, self.scan, self.pad_to_square, self.image_size, self.seed)

    def loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self.dataset(split, augment=train)
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=EpochShuffle(len(dataset), self.seed) if train else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


def split_tensors(datamodule: DownstreamDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of one split, un-augmented, as (images (N,C,H,W), labels (N,)): the pretraining probe's input."""
    datamodule.setup()
    images, labels = zip(*datamodule.dataset(split, augment=False), strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
