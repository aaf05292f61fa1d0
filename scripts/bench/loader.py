"""Loader cost per worker at the paper's setting (issue 17): what one DataLoader worker makes from the frame cache
at 224 px (cached short side 256), measured in one process with one torch and one OpenCV thread, as a worker
on its own core. Every part runs on the same cached frames, in one run:

  presets  pairs/s for every conf/augment preset x conf/pairs sampler, from a gray cache (what fetalssl builds)
           and from an RGB cache;
  ops      the share of each step of a Barlow Twins pair: frame read, view composition, each augmentation op,
           shipping as uint8, collation, and the normalisation that now runs after the transfer to the device;
  peer     lightly's SimCLRTransform / BYOLTransform vs the simclr / barlowtwins presets on the same frames
           (one frame per pair, no sampler, on either side), fetalssl as shipped and with the float RGB
           normalisation done on the CPU as lightly does;
  before   the pipeline before issue 17 (replicate gray to RGB first, float normalise in the worker) vs now,
           per worker, collation included;
  loader   the DataLoader end to end with 1..cores workers: pairs/s over two short epochs, the first batch of each
           epoch (worker start), persistent workers on/off, prefetch 2 vs 4, bytes per batch.

lightly is a peer, not a dependency: install it for this benchmark only (its transforms need only torchvision):

    .venv/bin/pip install --no-deps --target /tmp/lightly lightly==1.6.0
    PYTHONPATH=/tmp/lightly .venv/bin/python scripts/bench/loader.py ../shared/data/pocus/manifest.csv \\
        --out loader.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, default_collate

import fetalssl.runtime  # noqa: F401  (the resolvers the presets use, e.g. scaled_size)
from fetalssl.data.cache import available_cores, build_cache
from fetalssl.data.index import find_videos, read_manifest
from fetalssl.data.pairs import SameFramePairs, compose_view
from fetalssl.data.pretrain import EpochSampler, FramePairDataset
from fetalssl.data.transforms import normalise_uint8, to_normalised_tensor, to_uint8_tensor, with_channels

CONF = Path(__file__).resolve().parents[2] / "src" / "fetalssl" / "conf"
PRESETS = sorted(p.stem for p in (CONF / "augment").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONF / "pairs").glob("*.yaml"))
MEAN, STD = 0.5, 0.25  # conf/normalization/fixed.yaml; the values do not change the cost


def load(group: str, name: str, image_size: int):
    cfg = OmegaConf.create({"data": {"image_size": image_size}, "x": OmegaConf.load(CONF / group / f"{name}.yaml")})
    return instantiate(cfg.x)


def rate(step: Callable[[int], object], n: int, repeats: int) -> float:
    """Median items/s of `repeats` timed runs of n calls (after n // 5 warm-up calls)."""
    for i in range(n // 5):
        step(i)
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            step(n * (r + 1) + i)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def dataset(videos, sampler, views, args, cls=FramePairDataset) -> FramePairDataset:
    return cls(videos, sampler, views, 3, args.image_size, 10**6, args.seed, 256, None)


class BeforeIssue17(FramePairDataset):
    """The view as it was made before issue 17: gray replicated to RGB first, float-normalised in the worker."""

    def _view(self, frames, view_spec, augment, rng, name, size):
        image = with_channels(compose_view(frames, view_spec), self.channels)
        augment.set_random_seed(int(rng.integers(2**31)))
        return to_normalised_tensor(augment(image=image)["image"], MEAN, STD)


def presets_table(caches, args) -> list[dict]:
    rows = []
    for cache_name, videos in caches.items():
        for preset in PRESETS:
            views = load("augment", preset, args.image_size)
            for sampler_name in SAMPLERS:
                data = dataset(videos, load("pairs", sampler_name, args.image_size), views, args)
                rows.append({"cache": cache_name, "augment": preset, "pairs": sampler_name,
                             "pairs_per_s": rate(lambda i, d=data: d[i], args.pairs, args.repeats)})
                print(f"  {cache_name:4} {preset:12} {sampler_name:10} {rows[-1]['pairs_per_s']:8.1f} pairs/s")
    return rows


def op_shares(videos, args) -> list[dict]:
    """Seconds per pair of each step of a Barlow Twins pair from the gray cache (temporal pairs)."""
    views = load("augment", "barlowtwins", args.image_size)
    data = dataset(videos, load("pairs", "temporal", args.image_size), views, args)
    costs: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        costs[name] = costs.get(name, 0.0) + time.perf_counter() - start
        return out

    for index in range(args.pairs):
        rng = np.random.default_rng([args.seed, 0, index])
        spec = data.pair_spec(index, rng)
        video = data.videos[index % len(data.videos)]
        cached = data._frames(index % len(data.videos))
        frames = timed("read frames (memmap)", lambda c=cached, v=video, p=spec: {
            i: np.asarray(c[v.cache_index(i)]) for i in p.frame_indices()})
        for name, view_spec in (("view1", spec.view1), ("view2", spec.view2)):
            image = timed("compose view", compose_view, frames, view_spec)
            image = timed("channels", with_channels, image, 1)
            for op in views[name].transforms:
                image = timed(type(op).__name__, lambda o=op, x=image: o(image=x)["image"])
            timed("to uint8 tensor", to_uint8_tensor, image)
    batch = [data[i] for i in range(args.batch_size)]
    collated = timed("collate (per pair)", lambda: [default_collate(batch) for _ in range(5)])[-1]
    costs["collate (per pair)"] /= 5 * args.batch_size / args.pairs
    timed("normalise on the device (here: CPU)", lambda: [{k: normalise_uint8(v, MEAN, STD, 3)
                                                           for k, v in collated.items()} for _ in range(5)])
    costs["normalise on the device (here: CPU)"] /= 5 * args.batch_size / args.pairs
    total = sum(v for k, v in costs.items() if "device" not in k)
    rows = [{"step": k, "us_per_pair": 1e6 * v / args.pairs, "share_of_worker": None if "device" in k else v / total}
            for k, v in costs.items()]
    for row in rows:
        share = "" if row["share_of_worker"] is None else f"{100 * row['share_of_worker']:5.1f} %"
        print(f"  {row['step']:38} {row['us_per_pair']:8.1f} us/pair {share}")
    return rows


def peer(videos, args) -> list[dict]:
    """Two views of one frame: lightly (PIL + torchvision, float RGB out) vs the fetalssl presets."""
    try:
        from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform
    except ImportError:
        print("  lightly not importable: peer comparison skipped (see the docstring)")
        return []
    gray = [np.asarray(v.frames()[k]) for v in videos for k in range(0, v.n_frames, max(1, v.n_frames // 8))]
    pil = [Image.fromarray(f).convert("RGB") for f in gray]
    size = args.image_size
    rows = []
    for ours, lightly in (("simclr", SimCLRTransform(input_size=size)),
                          ("barlowtwins", BYOLTransform(BYOLView1Transform(input_size=size),
                                                        BYOLView2Transform(input_size=size)))):
        views = load("augment", ours, args.image_size)
        data = dataset(videos, SameFramePairs(), views, args)
        data_cpu_float = dataset(videos, SameFramePairs(), views, args, cls=BeforeIssue17)
        lightly_rate = rate(lambda i, t=lightly: t(pil[i % len(pil)]), args.pairs, args.repeats)
        shipped = rate(lambda i, d=data: d[i], args.pairs, args.repeats)
        float_rgb = rate(lambda i, d=data: {k: normalise_uint8(v, MEAN, STD, 3) for k, v in d[i].items()},
                         args.pairs, args.repeats)
        before = rate(lambda i, d=data_cpu_float: d[i], args.pairs, args.repeats)
        rows.append({"lightly": type(lightly).__name__, "fetalssl": ours, "lightly_pairs_per_s": lightly_rate,
                     "fetalssl_uint8_gray_pairs_per_s": shipped, "fetalssl_float_rgb_pairs_per_s": float_rgb,
                     "fetalssl_before_issue17_pairs_per_s": before})
        print(f"  {ours}: lightly {lightly_rate:.1f}, fetalssl shipped {shipped:.1f} "
              f"({shipped / lightly_rate:.2f}x), float RGB on CPU {float_rgb:.1f} ({float_rgb / lightly_rate:.2f}x)")
    return rows


def before_after(videos, args) -> list[dict]:
    """Per worker, collation included: the Barlow Twins pipeline before issue 17 vs now (same keys)."""
    views = load("augment", "barlowtwins", args.image_size)
    sampler = load("pairs", "temporal", args.image_size)
    rows = []
    for name, cls in (("before (RGB, float in the worker)", BeforeIssue17), ("now (gray uint8)", FramePairDataset)):
        data = dataset(videos, sampler, views, args, cls=cls)

        def batch_step(i, d=data):
            default_collate([d[args.batch_size * i + j] for j in range(args.batch_size)])

        batches = max(2, args.pairs // args.batch_size)
        pairs_per_s = rate(batch_step, batches, args.repeats) * args.batch_size
        sample = data[0]
        rows.append({"pipeline": name, "pairs_per_s": pairs_per_s,
                     "bytes_per_pair": sum(t.numel() * t.element_size() for t in sample.values())})
        print(f"  {name}: {pairs_per_s:.1f} pairs/s, {rows[-1]['bytes_per_pair']} bytes per pair")
    return rows


def end_to_end(videos, args) -> list[dict]:
    views = load("augment", "barlowtwins", args.image_size)
    sampler = load("pairs", "temporal", args.image_size)
    pairs = args.loader_batches * args.batch_size
    data = FramePairDataset(videos, sampler, views, 3, args.image_size, 10**6, args.seed, 256, pairs)
    rows = []
    for workers in range(1, available_cores() + 1):
        for persistent, prefetch, cv2_threads in ((False, 2, 1), (True, 2, 1), (True, 4, 1), (True, 2, -1)):
            epoch_sampler = EpochSampler(data, True, args.seed)
            loader = DataLoader(data, args.batch_size, sampler=epoch_sampler, num_workers=workers, drop_last=True,
                                persistent_workers=persistent, prefetch_factor=prefetch,
                                worker_init_fn=lambda _, n=cv2_threads: cv2.setNumThreads(n))  # -1: OpenCV's default
            first, totals = [], []
            for epoch in range(1 + args.repeats):  # epoch 0 starts the workers; the later ones are the steady state
                epoch_sampler.set_epoch(epoch)
                start = time.perf_counter()
                for i, _ in enumerate(loader):
                    if i == 0:
                        first.append(time.perf_counter() - start)
                totals.append(time.perf_counter() - start)
            row = {"workers": workers, "persistent_workers": persistent, "prefetch_factor": prefetch,
                   "opencv_threads_per_worker": "default (cores)" if cv2_threads < 0 else cv2_threads,
                   "first_batch_s_epoch0": first[0], "first_batch_s_later": statistics.median(first[1:]),
                   "pairs_per_s_later_epochs": statistics.median(pairs / t for t in totals[1:])}
            rows.append(row)
            print(f"  workers {workers} persistent {persistent!s:5} prefetch {prefetch} cv2 {cv2_threads:2}: "
                  f"{row['pairs_per_s_later_epochs']:.1f} pairs/s (median of epochs 1-{args.repeats}), first batch "
                  f"{first[0]:.2f} s in epoch 0, {row['first_batch_s_later']:.2f} s later")
            del loader
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="video folder (videos/<patient>/...) or manifest CSV")
    parser.add_argument("--out", type=Path, required=True, help="JSON file written")
    parser.add_argument("--max-videos", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=200, help="pairs per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-batches", type=int, default=20, help="batches per epoch of the loader part")
    parser.add_argument("--parts", nargs="+", default=["presets", "ops", "peer", "before", "loader"])
    parser.add_argument("--work", type=Path, help="frame caches go here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # one loader worker: torch and OpenCV on one core, as in a DataLoader worker
    cv2.setNumThreads(1)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    records = (read_manifest(args.source, "^([^/]+)/") if args.source.suffix == ".csv"
               else find_videos(args.source, "^([^/]+)/"))[: args.max_videos]
    keep = instantiate(OmegaConf.load(CONF / "scan" / "keep.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        caches = {}
        for name, rgb in (("gray", False), ("rgb", True)):
            summary = build_cache(records, work / f"cache_{name}", args.short_side, 1, rgb=rgb,
                                  min_decoded_fraction=0.9, scan=keep, workers=available_cores())
            caches[name] = summary.videos
        frames = sum(v.n_frames for v in caches["gray"])
        print(f"{len(caches['gray'])} videos, {frames} frames cached at short side {args.short_side}")
        result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": available_cores(),
                              "torch": torch.__version__, "load_average": os.getloadavg()},
                  "settings": {k: str(v) for k, v in vars(args).items()},
                  "data": {"videos": len(caches["gray"]), "frames": frames}}
        parts = {"presets": lambda: presets_table(caches, args), "ops": lambda: op_shares(caches["gray"], args),
                 "peer": lambda: peer(caches["gray"], args), "before": lambda: before_after(caches["gray"], args),
                 "loader": lambda: end_to_end(caches["gray"], args)}
        for part in args.parts:
            print(f"{part}:")
            result[part] = parts[part]()
        result["machine"]["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
