"""Benchmark the pretraining input pipeline: frame pairs/s decoded on the fly (decord, PyAV) vs the frame cache.

Every mode draws the same pairs (temporal sampler, same seed) and applies the same augmentation preset, in one
process (DataLoader workers multiply all rates about equally). The cache is built once, timed; then each mode
runs in its own subprocess, so its peak RSS (VmHWM; includes the ~0.3 GiB of the imports) is its own.
Example:

    .venv/bin/python scripts/bench/data_pipeline.py ../shared/data/pocus/manifest.csv --max-videos 40
    .venv/bin/python scripts/bench/data_pipeline.py .demo/videos --pairs 300
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from peak_memory import peak_rss_mib  # scripts/bench/, on sys.path when run as a script

from fetalssl.data.cache import build_cache
from fetalssl.data.index import find_videos, read_manifest
from fetalssl.data.pairs import TemporalPairs, compose_view
from fetalssl.data.pretrain import FramePairDataset
from fetalssl.data.transforms import to_uint8_tensor, with_channels
from fetalssl.data.video import open_video, resize_short_side

CONF = Path(__file__).resolve().parents[2] / "src" / "fetalssl" / "conf"
KEEP_PIXELS = instantiate(OmegaConf.load(CONF / "scan" / "keep.yaml"))  # the cache as it was measured: pixels unchanged


def load_views(preset: str, image_size: int):
    cfg = OmegaConf.create(
        {"data": {"image_size": image_size}, "augment": OmegaConf.load(CONF / "augment" / f"{preset}.yaml")}
    )
    return instantiate(cfg.augment)


def on_the_fly_rate(records, backend, sampler, views, args) -> float:
    """Pairs/s when each pair is decoded from the source video (one open reader per video, as a worker would)."""
    sources = [open_video(r.path, backend=backend) for r in records]
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    for i in range(args.pairs):
        source = sources[i % len(sources)]
        spec = sampler(rng, len(source), source.fps, 1)
        decoded = source.get(spec.frame_indices())
        frames = {
            k: resize_short_side(f, args.short_side)
            for k, f in zip(spec.frame_indices(), decoded, strict=True)
        }
        for name, view_spec in (("view1", spec.view1), ("view2", spec.view2)):
            # as FramePairDataset makes a view (one gray channel, shipped as uint8), so only the frames' source differs
            image = views[name](image=with_channels(compose_view(frames, view_spec), 1))["image"]
            to_uint8_tensor(image)
    return args.pairs / (time.perf_counter() - start)


def cache_rate(videos, sampler, views, args) -> float:
    dataset = FramePairDataset(videos, sampler, views, 3, args.image_size, 10**6, args.seed, 256, None)
    start = time.perf_counter()
    for i in range(args.pairs):
        dataset[(i % len(videos)) + len(videos) * (i // len(videos))]
    return args.pairs / (time.perf_counter() - start)


# mode -> reader backend; decord cannot open GIF: "auto" is the production path (decord, PyAV for what decord
# cannot read)
MODES = {"cache (np.memmap)": None, "on the fly, decord*": "auto", "on the fly, PyAV": "pyav"}


def measure(mode: str, args) -> dict:
    records, sampler, views = inputs(args)
    summary = build_cache(records, args.cache_dir, args.short_side, 1, rgb=False, min_decoded_fraction=0.9,
                          scan=KEEP_PIXELS)  # built by the parent: reused
    if MODES[mode] is None:
        rate = cache_rate(summary.videos, sampler, views, args)
    else:
        usable = [r for r in records if r.path in {v.source for v in summary.videos}]
        rate = on_the_fly_rate(usable, MODES[mode], sampler, views, args)
    return {"pairs_per_s": rate, "peak_rss_mib": peak_rss_mib()}


def inputs(args):
    if args.source.suffix == ".csv":
        records = read_manifest(args.source, "^([^/]+)/")
    else:
        records = find_videos(args.source, "^([^/]+)/")
    return (records[: args.max_videos], TemporalPairs(max_gap=args.max_gap, unit="seconds"),
            load_views(args.augment, args.image_size))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="video folder (videos/<patient>/...) or manifest CSV")
    parser.add_argument("--pairs", type=int, default=200, help="pairs timed per mode")
    parser.add_argument("--max-videos", type=int, default=None, help="use the first N videos only")
    parser.add_argument("--augment", default="barlowtwins")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--max-gap", type=float, default=0.5, help="temporal pair gap, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)  # child: one mode, JSON out
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return

    records, _, _ = inputs(args)
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        summary = build_cache(records, cache_dir, args.short_side, 1, rgb=False, min_decoded_fraction=0.9)
        build_s = time.perf_counter() - start
        for mode in MODES:
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--one", mode,
                                    "--cache-dir", cache_dir], capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{child.stderr[-3000:]}")
            rows[mode] = json.loads(child.stdout.strip().splitlines()[-1])

    print(
        f"\n{len(summary.videos)} videos, {summary.frames_cached} frames; augment={args.augment} {args.image_size}px, "
        f"temporal pairs +-{args.max_gap}s, short side {args.short_side}, {args.pairs} pairs per mode, 1 process"
    )
    print(
        f"cache build: {build_s:.1f} s ({summary.frames_cached / build_s:.0f} frames/s decode+resize+write)\n"
    )
    cache = rows["cache (np.memmap)"]["pairs_per_s"]
    print(f"{'mode':<22}{'pairs/s':>10}{'vs cache':>10}{'peak RSS MiB':>14}")
    for name, row in rows.items():
        print(f"{name:<22}{row['pairs_per_s']:>10.1f}{row['pairs_per_s'] / cache:>10.3f}{row['peak_rss_mib']:>14.0f}")
    print("* decord with the PyAV fallback for files decord cannot open (GIF)")


if __name__ == "__main__":
    main()
