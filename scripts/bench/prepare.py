"""Parallel prepare (issue 17): time and peak memory of decoding N tiny generated videos into the frame cache with
1 and with W worker processes, for several N, each in a fresh child process and a fresh cache.

    .venv/bin/python scripts/bench/prepare.py OUT --videos 100 1000 3000 --workers 1 2

Prints, per (N, W): seconds, ms per video, the main process's peak RSS and the children's (RUSAGE_CHILDREN), and the
speed-up of each W over W=1 at the same N. The videos (64x48, 30 frames, mp4) are written once into OUT/videos_<N>;
every timed run starts after os.sync(), so no earlier write is flushed inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_videos(folder: Path, n: int) -> None:
    import av

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"p{i // 2:04d}" / f"v{i % 2}.mp4"
        if path.is_file():
            continue
        path.parent.mkdir(exist_ok=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for _ in range(30):
                frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def one(folder: Path, cache: Path, workers: int) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import fetalssl
    from fetalssl.data.cache import build_cache
    from fetalssl.data.index import index_videos
    from fetalssl.data.scan import ScanOptions

    scan: ScanOptions = instantiate(OmegaConf.load(Path(fetalssl.__file__).parent / "conf" / "scan" / "keep.yaml"))
    records = index_videos(str(folder), None, "^([^/]+)/")
    start = time.perf_counter()
    summary = build_cache(records, cache, short_side=48, stride=1, rgb=False, min_decoded_fraction=0.9, scan=scan,
                          workers=workers)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"videos": len(records), "built": summary.built, "workers": workers, "seconds": seconds,
            "ms_per_video": 1000 * seconds / len(records), "peak_rss_mib": own, "peak_child_rss_mib": children}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--videos", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # child: folder cache workers
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), Path(args.one[1]), int(args.one[2]))))
        return
    rows = []
    for n in args.videos:
        folder = args.out / f"videos_{n}"
        write_videos(folder, n)
        for workers in args.workers:
            cache = args.out / f"cache_{n}_{workers}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            os.sync()  # the videos just written and the cache just removed must not be flushed inside the timing
            child = subprocess.run([sys.executable, __file__, str(args.out), "--one", str(folder), str(cache),
                                    str(workers)], capture_output=True, text=True, check=True)
            rows.append(row := json.loads(child.stdout.strip().splitlines()[-1]))
            base = next(r for r in rows if r["videos"] == row["videos"] and r["workers"] == args.workers[0])
            print(f"{n:5d} videos, {workers} workers: {row['seconds']:7.1f} s, {row['ms_per_video']:6.1f} ms/video, "
                  f"speed-up {base['seconds'] / row['seconds']:.2f}x, peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"(workers {row['peak_child_rss_mib']:.0f} MiB)", flush=True)


if __name__ == "__main__":
    main()
