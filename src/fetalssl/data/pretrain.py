"""Pretraining data: pairs of augmented frames from ultrasound videos, read from the frame cache.

Reproducibility: sample i of epoch e is a pure function of (seed, e, i): the pair sampler and both
albumentations pipelines are seeded from np.random.default_rng([seed, e, i]). Hence the samples do not depend on
num_workers. The training sampler hands out (epoch, i) keys, so the epoch travels with each index: loader workers
persist across epochs (no fork and no reopened memmaps per epoch) and still draw the new epoch's pairs.

Feeding a GPU: views leave the workers as uint8 in the frame's own channels (a gray frame is augmented as one
channel) and become float, normalised and ``channels`` wide after the transfer to the device
(``VideoFramePairDataModule.on_after_batch_transfer``): 12x fewer bytes through shared memory, pinning and the
host-to-device copy than float RGB, and a third of the augmentation work. BENCHMARKS.md section 8 has the figures.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from fetalssl.data.cache import (
    CachedVideo,
    CacheSummary,
    available_cores,
    build_cache,
    intensity_stats,
    load_cache,
)
from fetalssl.data.index import VideoRecord, index_videos
from fetalssl.data.pairs import PairSpec, compose_view
from fetalssl.data.scan import ScanOptions
from fetalssl.data.transforms import normalise_uint8, to_uint8_tensor, with_channels
from fetalssl.io import save_json

log = logging.getLogger(__name__)

TRAINING_DATA_FILE = "pretraining_data.json"  # what a run really trained on: patients, videos, frames
CACHE_RGB = False  # frames are cached grayscale; 3-channel inputs replicate gray after augmentation


def prepare(cfg_data: Mapping[str, Any]) -> CacheSummary:
    """Index the videos of the `data` config group (conf/data/videos.yaml) and decode every one not already in
    the frame cache (what `fetalssl-prepare` runs)."""
    records = index_videos(cfg_data["root"], cfg_data["manifest"], cfg_data["patient_pattern"])
    return build_cache(records, cfg_data["cache_dir"], short_side=cfg_data["short_side"], stride=cfg_data["stride"],
                       rgb=CACHE_RGB, min_decoded_fraction=cfg_data["min_decoded_fraction"],
                       scan=instantiate(cfg_data["scan"]), progress_every_seconds=cfg_data["progress_every_seconds"],
                       workers=cfg_data["prepare_workers"] or available_cores())


def patient_subset(videos: Sequence[CachedVideo], fraction: float, seed: int) -> list[CachedVideo]:
    """The videos of a seeded share of the patients (at least one). One permutation per seed, whatever the
    fraction, so shares are nested: the 25 % patients are among the 50 % ones."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.patient_fraction={fraction}: must be in (0, 1]")
    patients = sorted({v.patient_id for v in videos})
    keep = max(1, math.floor(fraction * len(patients) + 0.5))
    chosen = {patients[i] for i in np.random.default_rng([seed, 2]).permutation(len(patients))[:keep]}
    return [v for v in videos if v.patient_id in chosen]


FRAME_SELECTIONS = ("window", "even")


def frame_subset(video: CachedVideo, frames: int | None, selection: str, rng: np.random.Generator) -> CachedVideo:
    """At most `frames` distinct frames of a video: a contiguous window at a seeded position ("window"), or
    frames evenly spaced over the whole video ("even", fewer frames per second). None: all frames."""
    if selection not in FRAME_SELECTIONS:
        raise ValueError(f"data.frame_selection={selection!r}: must be one of {FRAME_SELECTIONS}")
    if frames is None or frames >= video.n_frames:
        return video
    if frames < 1:
        raise ValueError(f"data.frames_per_video={frames}: must be >= 1 or null")
    if selection == "window":
        return replace(video, n_frames=frames, first=int(rng.integers(video.n_frames - frames + 1)))
    step = video.n_frames // frames
    return replace(video, n_frames=frames, first=(video.n_frames - 1 - step * (frames - 1)) // 2, step=step,
                   stride=video.stride * step)


def split_by_patient(
    videos: Sequence[CachedVideo], val_fraction: float, seed: int
) -> tuple[list[CachedVideo], list[CachedVideo]]:
    """Seeded patient-grouped split: a patient's videos are all train or all val.

    round(val_fraction * n_patients) val patients, at least 1 when val_fraction > 0 and there are >= 2 patients,
    never all of them.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = sorted({v.patient_id for v in videos})
    n_val = 0
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(1, round(val_fraction * len(patients))), len(patients) - 1)
    elif val_fraction > 0:
        log.warning("only one patient (%s): no validation split", patients[0])
    order = np.random.default_rng(seed).permutation(len(patients))
    val_patients = {patients[i] for i in order[:n_val]}
    train = [v for v in videos if v.patient_id not in val_patients]
    val = [v for v in videos if v.patient_id in val_patients]
    return train, val


class FramePairDataset(Dataset):
    """Map-style: item i (epoch 0) or (epoch, i) is a pair from video i % n_videos; {"view1", "view2"} uint8 tensors
    (C, H, W) with C = 1 for gray frames (and for ``channels`` 1), else 3; multi-crop presets add "locals"."""

    def __init__(
        self,
        videos: Sequence[CachedVideo],
        pair_sampler,
        views: Mapping[str, A.Compose],
        channels: int,
        image_size: int,
        samples_per_video: int,
        seed: int,
        max_open_memmaps: int,
        pairs_per_epoch: int | None,
    ):
        if not videos:
            raise ValueError("FramePairDataset needs at least one video")
        self.videos = list(videos)
        self.pair_sampler = pair_sampler
        self.views = views
        self.channels = channels
        self.image_size = image_size
        self.samples_per_video = samples_per_video
        self.seed = seed
        self.max_open_memmaps = max_open_memmaps
        if pairs_per_epoch is not None and pairs_per_epoch < 1:
            raise ValueError(f"data.pairs_per_epoch={pairs_per_epoch}: must be >= 1 or null")
        self.pairs_per_epoch = pairs_per_epoch
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # memmaps are reopened in each worker

    def __len__(self) -> int:
        # A fixed budget makes runs on more or fewer videos see (and cost) the same number of pairs.
        return self.pairs_per_epoch or len(self.videos) * self.samples_per_video

    def _frames(self, video_index: int) -> np.ndarray:
        if video_index in self._open:
            self._open.move_to_end(video_index)
        else:
            self._open[video_index] = self.videos[video_index].frames()
            if len(self._open) > self.max_open_memmaps:
                self._open.popitem(last=False)
        return self._open[video_index]

    def pair_spec(self, index: int, rng: np.random.Generator) -> PairSpec:
        video = self.videos[index % len(self.videos)]
        return self.pair_sampler(rng, video.n_frames, video.fps, video.stride)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        rng = np.random.default_rng([self.seed, epoch, index])
        spec = self.pair_spec(index, rng)
        video = self.videos[index % len(self.videos)]
        video_frames = self._frames(index % len(self.videos))
        frames = {i: np.asarray(video_frames[video.cache_index(i)]) for i in spec.frame_indices()}
        sample = {name: self._view(frames, view_spec, self.views[name], rng, name, self.image_size)
                  for name, view_spec in (("view1", spec.view1), ("view2", spec.view2))}
        if "locals" in self.views:  # drawn after the global views, which are therefore those of two-view presets
            local_specs = self.views["local_frames"](rng, spec, len(self.views["locals"]), video.n_frames,
                                                     video.fps, video.stride)
            for i in {i for view in local_specs for i, _ in view} - frames.keys():
                frames[i] = np.asarray(video_frames[video.cache_index(i)])
            sample["locals"] = [self._view(frames, view_spec, augment, rng, f"local crop {i}", None)
                                for i, (view_spec, augment) in enumerate(zip(local_specs, self.views["locals"],
                                                                              strict=True))]
        return sample

    def _view(self, frames: dict[int, np.ndarray], view_spec, augment: A.Compose, rng: np.random.Generator,
              name: str, size: int | None) -> torch.Tensor:
        image = compose_view(frames, view_spec)
        # A gray frame is augmented as one channel: every preset gives the RGB pipeline's image (bit for bit on
        # the frames of tests/test_transforms.py; OpenCV's 1- and 3-channel paths may round a pixel differently
        # elsewhere), at a third of the pixel work; replicated to `channels` on the device.
        image = with_channels(image, 1 if image.ndim == 2 or self.channels == 1 else 3)
        augment.set_random_seed(int(rng.integers(2**31)))
        image = augment(image=image)["image"]
        expected = (size, size) if size is not None else (image.shape[0], image.shape[0])
        if image.shape[:2] != expected:
            raise ValueError(
                f"augmentation {name} returned {image.shape[:2]}, expected {expected}: the preset must end with a "
                "square resize/crop (${data.image_size} for the two global views)"
            )
        return to_uint8_tensor(image)


class EpochSampler(Sampler[tuple[int, int]]):
    """Seeded shuffle per epoch, handing out (epoch, index) keys: the dataset draws that epoch's pairs and
    augmentations in whichever (persistent) worker gets the key."""

    def __init__(self, dataset: FramePairDataset, shuffle: bool, seed: int):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # fixed when iteration starts, like the order
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)).tolist()
                 if self.shuffle else range(len(self.dataset)))
        return ((epoch, index) for index in order)


class InterleavedShard(DistributedSampler):
    """Rank ``rank``'s share of an EpochSampler's order: positions rank, rank + W, rank + 2W, ... (drop_last).

    So batch k of W ranks x B holds exactly the samples of batch k of one process x W*B, and the order does not
    depend on the world size. Every rank gets the same number of samples, so gathering ranks never wait on each
    other. ``set_epoch`` goes straight to the EpochSampler (and so to the keys it hands out) on
    every Lightning version: Lightning's DistributedSamplerWrapper only forwards it from 2.6.1 on, and would
    re-permute the order with shuffle=True for training. Being a DistributedSampler, Lightning leaves it alone.
    """

    def __init__(self, sampler: EpochSampler, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.sampler = sampler
        self.dataset = sampler.dataset
        self.shuffle = False  # the order is the EpochSampler's (itself seeded and shuffled)
        self.drop_last = True
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_samples = len(sampler) // num_replicas
        self.total_size = self.num_samples * num_replicas

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.sampler)[: self.total_size]
        return iter(order[self.rank :: self.num_replicas])


class ResumableDataLoader(DataLoader):
    """Training loader that resumes mid-epoch.

    ``progress`` records the sampler's epoch and how many batches of it were handed out; the datamodule stores it
    in every checkpoint and passes it to ``resume`` (under DDP the count is per rank: each rank skips that many of
    its own shard's batches). Not Lightning's stateful-dataloader protocol: Lightning skips that restore when
    configure_optimizers built the train loader early (trainer.estimated_stepping_batches does). The next pass over that epoch then skips those batches as index lists: nothing is loaded twice.
    Lightning fetches training batches without prefetching when the loader has a length, so "handed out" equals
    "trained on". Iteration starts lazily, at the first batch: on resume Lightning creates the iterator before
    ``set_epoch``, and the sampler's order (and so the epoch of its keys) must already be the resumed one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = 0
        self._handed_out = 0
        self._resume_at: dict[str, int] | None = None

    def progress(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._handed_out}

    def resume(self, progress: Mapping[str, int]) -> None:
        self._resume_at = dict(progress)

    @property
    def _index_sampler(self):
        # torch's DataLoader draws batch indices from this property (private, stable since torch 1.2); its iterator
        # keeps the object across epochs when workers persist, so it must be iterable again, not an iterator
        return _BatchesFrom(self)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # the whole epoch, as Lightning counts a resumed epoch's batches from 0

    def __iter__(self) -> Iterator:
        resume, self._resume_at = self._resume_at, None
        self._epoch = self.sampler.epoch  # EpochSampler, or the InterleavedShard around it
        self._handed_out = resume["batches"] if resume and resume["epoch"] == self._epoch else 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch


class _BatchesFrom:
    """The loader's batches from the first one not yet handed out in this epoch (all of them unless resuming)."""

    def __init__(self, loader: ResumableDataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(self.loader.batch_sampler, self.loader._handed_out, None)

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)


class VideoFramePairDataModule(L.LightningDataModule):
    """Frame pairs from videos under `root` (or listed in `manifest`) for self-supervised pretraining.

    prepare_data decodes the videos once into the frame cache; setup splits videos by patient (val patients never
    in train) and builds the datasets. Val samples are the same every epoch so val/loss is comparable.

    Pretraining data budgets (for studies of data variety vs amount), applied to the training patients only:
    ``patient_fraction`` (seeded, nested share of the patients), ``frames_per_video`` with ``frame_selection``
    (at most that many distinct frames per video) and ``pairs_per_epoch`` (a fixed number of training pairs).
    What was used is logged and written to ``<output_dir>/pretraining_data.json``.
    """

    def __init__(
        self,
        root: str | None,
        manifest: str | None,
        cache_dir: str,
        patient_pattern: str,
        short_side: int,
        stride: int,
        min_decoded_fraction: float,
        progress_every_seconds: float,
        prepare_workers: int | None,
        image_size: int,
        channels: int,
        mean: float | None,
        std: float | None,
        scan: ScanOptions,
        batch_size: int,
        num_workers: int,
        prefetch_factor: int,
        samples_per_video: int,
        max_open_memmaps: int,
        patient_fraction: float,
        frames_per_video: int | None,
        frame_selection: str,
        pairs_per_epoch: int | None,
        val_fraction: float,
        seed: int,
        pair_sampler,
        views: Mapping[str, A.Compose],
        output_dir: str | Path | None = None,
    ):
        super().__init__()
        if root is None and manifest is None:
            raise ValueError("set data.root (a video folder) or data.manifest (a CSV)")
        if set(views) not in ({"view1", "view2"}, {"view1", "view2", "locals", "local_frames"}):
            raise ValueError(f"views must have keys view1 and view2 (and for multi-crop locals and local_frames), "
                             f"got {sorted(views)}")
        self.root = root
        self.manifest = manifest
        self.cache_dir = Path(cache_dir)
        self.patient_pattern = patient_pattern
        self.short_side = short_side
        self.stride = stride
        self.min_decoded_fraction = min_decoded_fraction
        self.progress_every_seconds = progress_every_seconds
        self.prepare_workers = prepare_workers or available_cores()
        self.image_size = image_size
        self.channels = channels
        if (mean is None) != (std is None):
            raise ValueError(f"data.mean={mean}, data.std={std}: give both, or neither (normalization=measured)")
        if np.ndim(mean) != 0 or np.ndim(std) != 0:
            raise ValueError(f"data.mean={mean}, data.std={std}: pretraining frames are gray, so one value each "
                             "(the same in every channel)")
        self.mean = mean
        self.std = std
        self.normalization_source = "config" if mean is not None else None
        self.scan = scan
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.samples_per_video = samples_per_video
        self.max_open_memmaps = max_open_memmaps
        self.patient_fraction = patient_fraction
        self.frames_per_video = frames_per_video
        self.frame_selection = frame_selection
        self.pairs_per_epoch = pairs_per_epoch
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.val_fraction = val_fraction
        self.seed = seed
        self.pair_sampler = pair_sampler
        self.views = views
        self.train_set: FramePairDataset | None = None
        self.val_set: FramePairDataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_train_at: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where the training loader stands in its epoch (saved in every checkpoint)."""
        return {"train_loader": self._train_loader.progress()} if self._train_loader is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Lightning restores the datamodule before or after (depending on the strategy) the train loader exists.
        progress = state.get("train_loader")
        if progress is not None and self._train_loader is not None:
            self._train_loader.resume(progress)
        else:
            self._resume_train_at = progress

    def _records(self) -> list[VideoRecord]:
        return index_videos(self.root, self.manifest, self.patient_pattern)

    def prepare_data(self) -> None:
        build_cache(self._records(), self.cache_dir, self.short_side, self.stride, CACHE_RGB,
                    min_decoded_fraction=self.min_decoded_fraction, scan=self.scan,
                    progress_every_seconds=self.progress_every_seconds, workers=self.prepare_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        videos = load_cache(self._records(), self.cache_dir, self.short_side, self.stride, CACHE_RGB, self.scan)
        train, val = split_by_patient(videos, self.val_fraction, self.seed)
        train = patient_subset(train, self.patient_fraction, self.seed)
        if self.mean is None:
            # Over the training videos' whole cached frames (before frames_per_video), never the val patients'.
            self.mean, self.std = intensity_stats(train)
            self.normalization_source = f"measured over the live image of {len(train)} training videos"
            log.info("normalisation: mean %.4f, std %.4f (%s)", self.mean, self.std, self.normalization_source)
        train = [frame_subset(v, self.frames_per_video, self.frame_selection, np.random.default_rng([self.seed, 3, i]))
                 for i, v in enumerate(train)]
        log.info(
            "pretraining videos: %d train (%d patients), %d val (%d patients)",
            len(train),
            len({v.patient_id for v in train}),
            len(val),
            len({v.patient_id for v in val}),
        )
        self.train_set = self._dataset(train, self.seed, self.pairs_per_epoch)
        # A different seed stream for val, fixed across epochs.
        self.val_set = self._dataset(val, self.seed + 1, None) if val else None
        self._record_training_data(train)

    def _record_training_data(self, train: Sequence[CachedVideo]) -> None:
        record = {
            "patients": sorted({v.patient_id for v in train}),
            "videos": [{"source": str(v.source), "patient_id": v.patient_id, "frames": v.n_frames,
                        "first_cached_frame": v.first, "cached_frame_step": v.step} for v in train],
            "pairs_per_epoch": len(self.train_set),
            "settings": {"patient_fraction": self.patient_fraction, "frames_per_video": self.frames_per_video,
                         "frame_selection": self.frame_selection, "pairs_per_epoch": self.pairs_per_epoch},
            "normalization": {"mean": self.mean, "std": self.std, "source": self.normalization_source},
            "scan": self.scan.record(),
        }
        log.info("pretraining on %d patients, %d videos, %d distinct frames, %d pairs per epoch",
                 len(record["patients"]), len(train), sum(v.n_frames for v in train), len(self.train_set))
        if self.output_dir is not None:
            save_json(record, self.output_dir / TRAINING_DATA_FILE)

    def _dataset(self, videos: Sequence[CachedVideo], seed: int, pairs_per_epoch: int | None) -> FramePairDataset:
        return FramePairDataset(
            videos,
            self.pair_sampler,
            self.views,
            self.channels,
            self.image_size,
            self.samples_per_video,
            seed,
            self.max_open_memmaps,
            pairs_per_epoch,
        )

    def _loader(
        self, dataset: FramePairDataset, sampler: Sampler, drop_last: bool, persistent: bool,
        loader_cls: type = DataLoader,
    ) -> DataLoader:
        workers = self.num_workers > 0
        return loader_cls(
            dataset=dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent and workers,
            prefetch_factor=self.prefetch_factor if workers else None,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 views on the device -> float (x / 255 - mean) / std, ``channels`` wide, as the methods expect."""
        def normalise(images: torch.Tensor) -> torch.Tensor:
            return normalise_uint8(images, self.mean, self.std, self.channels)

        batch = {name: [normalise(t) for t in views] if isinstance(views, list) else normalise(views)
                 for name, views in batch.items()}
        # Lightning casts inputs for a "-true" precision (bf16-true, 16-true) before the transfer, when they were
        # still uint8: the float views get that cast here
        return batch if self.trainer is None else self.trainer.precision_plugin.convert_input(batch)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() first")
        # drop_last: batch statistics (BatchNorm, cross-correlation) need full batches, and losses that gather
        # across ranks need equal ones. Under DDP each rank gets a 1/world_size shard (InterleavedShard).
        world_size = self.trainer.world_size if self.trainer is not None else 1
        drop_last = len(self.train_set) // world_size >= self.batch_size
        sampler = EpochSampler(self.train_set, True, self.seed)
        if world_size > 1:
            kwargs = self.trainer.distributed_sampler_kwargs
            sampler = InterleavedShard(sampler, num_replicas=kwargs["num_replicas"], rank=kwargs["rank"])
        # persistent: the epoch travels in the sampler's keys, so workers need not be forked again for each epoch
        self._train_loader = self._loader(self.train_set, sampler, drop_last, persistent=True,
                                          loader_cls=ResumableDataLoader)
        if self._resume_train_at is not None:
            self._train_loader.resume(self._resume_train_at)
            self._resume_train_at = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        # SequentialSampler has no set_epoch: val pairs stay those of epoch 0 so val/loss is comparable.
        batches_full = len(self.val_set) >= self.batch_size
        # not persistent: idle val workers would hold memory through every training epoch
        return self._loader(self.val_set, SequentialSampler(self.val_set), drop_last=batches_full, persistent=False)
