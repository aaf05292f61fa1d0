"""Video indexing and the pretraining DataModule: patient split, batches, determinism across workers/epochs."""

import logging
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.data import _set_sampler_epoch
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

import fetalssl.runtime  # noqa: F401  (the resolvers the console scripts register)
from conftest import data_groups, scan_options
from fetalssl.data.index import find_videos, index_videos, read_manifest
from fetalssl.data.pairs import SameFramePairs, TemporalPairs
from fetalssl.data.pretrain import VideoFramePairDataModule, prepare, split_by_patient
from test_video import write_video

CONF = Path(__file__).parents[1] / "src" / "fetalssl" / "conf"
PATTERN = "^([^/]+)/"
# patient -> scans; frame counts differ so videos are distinguishable
LAYOUT = {
    "p01": ["s1.mp4", "s2.avi"],
    "p02": ["s1.mp4"],
    "p03": ["s1.avi"],
    "p04": ["s1.mp4"],
    "p05": ["s1.mp4"],
}


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "videos"
    for i, (patient, scans) in enumerate(LAYOUT.items()):
        for j, scan in enumerate(scans):
            path = write_video(root / patient / scan, n_frames=24 + 3 * i + j, size=(40, 48))
            path.with_suffix(".csv").write_text("frame,plane\n0,4CH\n")  # per-video labels: not a video
    return root


def preset(name, image_size=16):
    cfg = OmegaConf.create(
        {"data": {"image_size": image_size}, "a": OmegaConf.load(CONF / "augment" / f"{name}.yaml")}
    )
    return instantiate(cfg.a)


def identity_views(size=16):
    def make():
        return A.Compose([A.Resize(size, size)])

    return {"view1": make(), "view2": make()}


def make_dm(root, tmp_path, pair_sampler=None, views=None, **overrides):
    args = dict(
        root=str(root),
        manifest=None,
        cache_dir=str(tmp_path / "cache"),
        patient_pattern=PATTERN,
        short_side=32,
        stride=1,
        min_decoded_fraction=0.9,
        progress_every_seconds=30,
        prepare_workers=1,
        image_size=16,
        channels=3,
        mean=0.5,
        std=0.25,
        scan=scan_options("keep"),
        batch_size=4,
        num_workers=0,
        prefetch_factor=2,
        samples_per_video=6,
        max_open_memmaps=2,  # fewer than the videos: the LRU closes and reopens them
        patient_fraction=1.0,
        frames_per_video=None,
        frame_selection="window",
        pairs_per_epoch=None,
        val_fraction=0.4,
        seed=0,
        pair_sampler=pair_sampler or SameFramePairs(),
        views=views or identity_views(),
    )
    args.update(overrides)
    dm = VideoFramePairDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_find_videos_ignores_other_files_and_reads_patients(video_root):
    records = find_videos(video_root, PATTERN)
    assert [r.path.relative_to(video_root).as_posix() for r in records] == [
        f"{p}/{s}" for p, scans in LAYOUT.items() for s in sorted(scans)
    ]
    assert [r.patient_id for r in records] == [p for p, scans in LAYOUT.items() for _ in scans]
    with pytest.raises(ValueError, match="patient_pattern"):
        find_videos(video_root, r"^patient-(\d+)/")


def test_manifest_paths_relative_to_csv(video_root, tmp_path):
    manifest = video_root.parent / "list.csv"
    manifest.write_text("path,patient_id,label\nvideos/p02/s1.mp4,42,x\nvideos/p01/s2.avi,7,y\n")
    records = index_videos(None, manifest, PATTERN)
    assert [(r.path, r.patient_id) for r in records] == [
        (video_root / "p02/s1.mp4", "42"),
        (video_root / "p01/s2.avi", "7"),
    ]
    no_ids = tmp_path / "no_ids.csv"
    no_ids.write_text("path\nA/x.mp4\nB/y.mp4\n")
    assert [r.patient_id for r in read_manifest(no_ids, PATTERN)] == ["A", "B"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match="path"):
        read_manifest(bad, PATTERN)


def test_split_is_grouped_by_patient(video_root, tmp_path):
    dm = make_dm(video_root, tmp_path)
    train_patients = {v.patient_id for v in dm.train_set.videos}
    val_patients = {v.patient_id for v in dm.val_set.videos}
    assert not train_patients & val_patients and train_patients | val_patients == set(LAYOUT)
    assert len(val_patients) == 2  # round(0.4 * 5)
    assert len(dm.train_set) == 6 * len(dm.train_set.videos)
    videos = dm.train_set.videos + dm.val_set.videos
    for seed in range(20):  # never empty on either side, even with tiny fractions
        train, val = split_by_patient(videos, 0.01, seed)
        assert len({v.patient_id for v in val}) == 1 and train


@pytest.mark.filterwarnings("ignore:The image is already gray")  # ToGray on 1 channel is a no-op
@pytest.mark.parametrize("channels", [1, 3])
def test_batches_leave_the_loader_as_gray_uint8_and_reach_the_model_normalised(video_root, tmp_path, channels):
    dm = make_dm(video_root, tmp_path, views=preset("barlowtwins"), channels=channels)
    shipped = next(iter(dm.train_dataloader()))
    assert set(shipped) == {"view1", "view2"}
    assert all(v.shape == (4, 1, 16, 16) and v.dtype == torch.uint8 for v in shipped.values())  # gray cache
    batch = dm.on_after_batch_transfer(shipped, 0)  # what Lightning calls once the batch is on the device
    for name, view in batch.items():
        assert view.shape == (4, channels, 16, 16) and view.dtype == torch.float32
        assert view.min() >= -2.0 and view.max() <= 2.0  # (x - 0.5) / 0.25 on [0, 1]
        for c in range(channels):
            torch.testing.assert_close(view[:, c], (shipped[name][:, 0] / 255 - 0.5) / 0.25)
    assert not torch.equal(batch["view1"], batch["view2"])
    assert len(dm.train_dataloader()) == len(dm.train_set) // 4  # drop_last


def test_same_frame_views_identical_temporal_within_gap(video_root, tmp_path):
    dm = make_dm(video_root, tmp_path)
    for sample in (dm.train_set[i] for i in range(len(dm.train_set))):
        torch.testing.assert_close(sample["view1"], sample["view2"])
    dm = make_dm(video_root, tmp_path, pair_sampler=TemporalPairs(max_gap=2, unit="frames"))
    gaps = []
    for index in range(len(dm.train_set)):
        sample = dm.train_set[index]
        # identify the source frame of each view: the cached frame whose resized image matches it best
        cached = np.asarray(dm.train_set.videos[index % len(dm.train_set.videos)].frames(), np.float32)
        resized = torch.nn.functional.interpolate(torch.from_numpy(cached)[:, None], size=16, mode="area")[
            :, 0
        ]
        frames = [
            int(((resized - sample[v][0].float()) ** 2).mean(dim=(1, 2)).argmin())
            for v in ("view1", "view2")
        ]
        gaps.append(abs(frames[0] - frames[1]))
    assert max(gaps) == 2 and min(gaps) == 0


def test_workers_give_identical_samples_and_epochs_differ(video_root, tmp_path):
    loader0 = make_dm(video_root, tmp_path, views=preset("simclr"), num_workers=0).train_dataloader()
    dm2 = make_dm(video_root, tmp_path, views=preset("simclr"), num_workers=2, prefetch_factor=3)
    loader2 = dm2.train_dataloader()
    assert loader2.persistent_workers and loader2.prefetch_factor == 3  # workers outlive the epoch: keys carry it
    epoch0 = batches(loader0)
    for a, b in zip(epoch0, batches(loader2), strict=True):
        torch.testing.assert_close(a, b)
    for loader in (loader0, loader2):
        _set_sampler_epoch(loader, 1)  # what Lightning does before each epoch
    epoch1 = batches(loader0)
    for a, b in zip(epoch1, batches(loader2), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(epoch0[0]["view1"], epoch1[0]["view1"])
    # val pairs do not follow the training epoch: val/loss stays comparable
    val_loader = dm2.val_dataloader()
    assert not val_loader.persistent_workers  # idle between val epochs: its workers do not hold memory
    val_epoch0 = batches(val_loader)
    _set_sampler_epoch(val_loader, 4)  # Lightning's call on every loader before an epoch
    torch.testing.assert_close(val_epoch0, batches(val_loader))


def test_epoch_reaches_dataset_through_the_ddp_shard_on_any_lightning(video_root, tmp_path):
    # The datamodule's own DDP path (world size 2), not Lightning's wrapper, so no Lightning version can break it.
    shards = []
    for rank in (0, 1):
        dm = make_dm(video_root, tmp_path)
        dm.trainer = SimpleNamespace(world_size=2, distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        shard = dm.train_dataloader().sampler
        assert isinstance(shard, DistributedSampler)  # so Lightning never wraps it again
        shard.set_epoch(5)
        keys = list(shard)
        assert shard.epoch == 5 and {epoch for epoch, _ in keys} == {5}  # the keys carry the epoch to the workers
        shards.append([index for _, index in keys])
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == len(dm.train_set) // 2 * 2
    # epoch 5's order, interleaved: rank r holds positions r, r + 2, ...
    order = np.random.default_rng([dm.seed, 5]).permutation(len(dm.train_set)).tolist()
    assert shards[0] == order[0::2][: len(shards[0])] and shards[1] == order[1::2][: len(shards[1])]


def test_config_instantiates_and_bad_videos_are_skipped(video_root, tmp_path, caplog):
    bad_root = tmp_path / "videos"
    for patient in ("p01", "p02"):
        write_video(bad_root / patient / "ok.mp4", n_frames=12, size=(40, 48))
    (bad_root / "p02" / "broken.mp4").write_bytes(b"\x00" * 1000)
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "paths": {"output_root": str(tmp_path / "out")},
            **data_groups(),
            "data": OmegaConf.load(CONF / "data" / "videos.yaml"),
            "pairs": OmegaConf.load(CONF / "pairs" / "temporal.yaml"),
            "augment": OmegaConf.load(CONF / "augment" / "ultrasound.yaml"),
        }
    )
    cfg.data.root = str(bad_root)
    cfg.data.batch_size = 2
    cfg.data.num_workers = 0
    with caplog.at_level(logging.WARNING):
        summary = prepare(cfg.data)
    assert summary.videos_read == 2 and [p.name for p, _ in summary.skipped] == ["broken.mp4"]
    assert (tmp_path / "out" / "frame_cache" / "index.json").exists()  # under the output root by default
    assert sorted(p.name for p in bad_root.rglob("*")) == ["broken.mp4", "ok.mp4", "ok.mp4", "p01", "p02"]  # data untouched
    dm = instantiate(cfg.data, pair_sampler=instantiate(cfg.pairs), views=instantiate(cfg.augment))
    assert dm.seed == 3 and dm.channels == 3
    dm.prepare_data()
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["view1"].shape == (2, 3, 128, 128)
    assert {v.patient_id for v in dm.val_set.videos} and len(dm.train_set.videos) == 1


class RecordingModule(L.LightningModule):
    """Minimal module that records the first training batch of every epoch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.first_batches: list[torch.Tensor] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.first_batches.append(batch["view1"].clone())
        return (self.weight * batch["view1"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.val_batches.append(batch["view1"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_sees_new_pairs_each_epoch(video_root, tmp_path):
    dm = make_dm(video_root, tmp_path, views=preset("simclr"))
    module = RecordingModule()
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert len(module.first_batches) == 2 and not torch.equal(*module.first_batches)
    torch.testing.assert_close(*module.val_batches)


def _source_frames(dataset, index, images, size):
    """The cached frame each image (C, H, W) was made from: the best match of the resized cached frames."""
    cached = np.asarray(dataset.videos[index % len(dataset.videos)].frames(), np.float32)
    resized = torch.nn.functional.interpolate(torch.from_numpy(cached)[:, None], size=size, mode="area")[:, 0]
    return [int(((resized - image[0].float()) ** 2).mean(dim=(1, 2)).argmin()) for image in images]


def test_multi_crop_adds_local_views_from_the_global_views_frames_or_nearby_ones(video_root, tmp_path):
    from fetalssl.data.pairs import LocalFrames
    from fetalssl.data.transforms import multi_crop

    pairs = TemporalPairs(max_gap=2, unit="frames")
    two = make_dm(video_root, tmp_path, pair_sampler=pairs).train_set
    local = A.Compose([A.Resize(16, 16)])  # as the global views: a local crop of the same frame equals its view
    views = identity_views()
    same = make_dm(video_root, tmp_path, pair_sampler=pairs,
                   views=multi_crop(views["view1"], views["view2"], local, 3, LocalFrames(0, "frames"))).train_set
    near = make_dm(video_root, tmp_path, pair_sampler=pairs,
                   views=multi_crop(views["view1"], views["view2"], local, 3, LocalFrames(3, "frames"))).train_set
    gaps = []
    for index in range(len(two)):
        plain, crops, nearby = two[index], same[index], near[index]
        for view in ("view1", "view2"):  # adding local crops leaves the global views as they were
            assert torch.equal(crops[view], plain[view]) and torch.equal(nearby[view], plain[view])
        # local crop i comes from global view i % 2's frame, or (max_gap 3) from a frame within 3 of it
        assert [torch.equal(c, plain[v]) for c, v in zip(crops["locals"], ("view1", "view2", "view1"), strict=True)] \
            == [True] * 3
        globals_ = _source_frames(same, index, [plain["view1"], plain["view2"]], 16)
        for i, frame in enumerate(_source_frames(near, index, nearby["locals"], 16)):
            gaps.append(abs(frame - globals_[i % 2]))
        assert all(torch.equal(a, b) for a, b in zip(near[index]["locals"], nearby["locals"], strict=True))
    assert max(gaps) == 3 and min(gaps) == 0


def test_multi_crop_batches_through_workers_and_the_ddp_shard_like_pairs(video_root, tmp_path):
    views = preset("multicrop")
    assert len(views["locals"]) == 8
    loaders = [make_dm(video_root, tmp_path, views=views, num_workers=w).train_dataloader() for w in (0, 2)]
    first, second = (batches_with_locals(loader) for loader in loaders)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
    local_size = round(16 * 96 / 224)
    assert [t.shape for t in first[0]["locals"]] == [(4, 1, local_size, local_size)] * 8
    model_input = make_dm(video_root, tmp_path, views=views).on_after_batch_transfer(first[0], 0)
    assert [t.shape for t in model_input["locals"]] == [(4, 3, local_size, local_size)] * 8


def batches_with_locals(loader):
    return [{k: ([t.clone() for t in v] if isinstance(v, list) else v.clone()) for k, v in b.items()} for b in loader]


def test_views_take_a_true_half_precision_after_normalising_and_mean_std_are_one_value_each(video_root, tmp_path):
    from lightning.pytorch.plugins.precision import HalfPrecision

    dm = make_dm(video_root, tmp_path)
    shipped = {"view1": torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)}
    dm.trainer = SimpleNamespace(precision_plugin=HalfPrecision("bf16-true"))  # Lightning cast the uint8 before
    view = dm.on_after_batch_transfer(shipped, 0)["view1"]
    assert view.dtype == torch.bfloat16 and view.shape == (2, 3, 4, 4) and float(view[0, 0, 0, 0]) == 2.0
    with pytest.raises(ValueError, match="one value each"):
        make_dm(video_root, tmp_path, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def test_an_epoch_sampler_keeps_the_epoch_it_started_with():
    from fetalssl.data.pretrain import EpochSampler

    sampler = EpochSampler(list(range(6)), shuffle=True, seed=0)
    keys = iter(sampler)
    first = next(keys)
    sampler.set_epoch(1)  # e.g. called early for the next epoch: the running order stays epoch 0's
    assert {epoch for epoch, _ in [first, *keys]} == {0} and {epoch for epoch, _ in sampler} == {1}
