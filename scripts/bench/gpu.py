"""One-command GPU benchmark (issue 17): for Barlow Twins and BYOL on ResNet-50 at 224 px, bf16 and channels_last,
with and without torch.compile, the images/s of the training step on in-memory batches (the model's bound) and
fed by the real frame-pair loader with one worker per CPU core but one (left to the training process), their ratio (target >= 0.9), and peak GPU and
host memory. Writes one JSON file. Videos: the built-in synthetic data (generated into the work folder), or
--data for real ones. Sized to finish in under 8 minutes on one H100.

    .venv/bin/python scripts/bench/gpu.py --out gpu.json [--data /data/videos] [--steps 30] [--batch-size 256]
    .venv/bin/python scripts/bench/gpu.py --smoke --out smoke.json     # on CPU, tiny: the script's own test

Each (method, compile, mode) point runs in its own process (training.py --one), so memory peaks are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fetalssl.data.cache import available_cores

BENCH = Path(__file__).resolve().parent
METHODS = ("barlowtwins", "byol")
MODES = ("lightning_memory", "lightning_loader")


def settings(args) -> tuple[list[str], list[bool]]:
    """Overrides common to every point, and the compile switches to try."""
    if args.smoke:
        return ["trainer=cpu", "backbone=resnet18", "data.image_size=32", "data.short_side=40", "data.batch_size=8",
                "data.num_workers=1", "channels_last=false", "method.projector.hidden_dims=[64]",
                "method.projector.out_dim=32", "data.samples_per_video=16", "probe=none"], [False]
    return ["trainer=gpu", "trainer.precision=bf16-mixed", "backbone=resnet50", "channels_last=true",
            "data.image_size=224", "data.short_side=256", f"data.batch_size={args.batch_size}",
            f"data.num_workers={max(1, available_cores() - 1)}", "probe=none",  # the job's cores, not the node's
            # enough pairs that every timed step is in the first epoch (the start of the workers is not timed)
            f"data.samples_per_video={max(64, 2 * args.steps * args.batch_size // 16)}"], [False, True]


def method_overrides(method: str, smoke: bool) -> list[str]:
    if smoke and method == "byol":
        return ["method.predictor.hidden_dims=[64]", "method.predictor.out_dim=32"]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--data", help="a video folder (default: synthetic demo videos made here)")
    parser.add_argument("--work", type=Path, help="frame cache and generated data (default: a temp folder)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the timing (compile warms up)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of every step of the script")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 4, 1
    work = args.work or Path(tempfile.mkdtemp(prefix="fetalssl_gpu_bench_"))
    data = args.data
    if data is None:
        data = work / "demo"
        if not (data / "labels.csv").is_file():
            subprocess.run([str(Path(sys.executable).parent / "fetalssl-demo-data"), str(data),
                            *(["--patients", "2", "--frames", "30", "--size", "64", "--stills", "20",
                               "--still-patients", "4"] if args.smoke else [])], check=True, capture_output=True)
        data = data / "videos"
    common, compiles = settings(args)
    common += [f"data.root={data}", f"data.cache_dir={work / 'cache'}", "data.val_fraction=0"]
    started = time.time()
    runs = []
    for method in METHODS:
        for compile_backbone in compiles:
            for mode in MODES:
                overrides = [*common, f"method={method}", *method_overrides(method, args.smoke),
                             f"compile={str(compile_backbone).lower()}"]
                child = subprocess.run([sys.executable, str(BENCH / "training.py"), *overrides, "--one", mode,
                                        "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                       capture_output=True, text=True)
                if child.returncode != 0:
                    raise SystemExit(f"{method} compile={compile_backbone} {mode} failed:\n{child.stderr[-3000:]}")
                result = json.loads(child.stdout.strip().splitlines()[-1])
                runs.append({"method_name": method, **result})
                print(f"{method:<12} compile={compile_backbone!s:<5} {mode:<17} {result['images_per_s']:9.1f} img/s "
                      f"GPU {result['peak_gpu_mib'] or 0:7.0f} MiB  RSS {result['peak_rss_mib']:6.0f} MiB", flush=True)
    ratios = {}
    for method in METHODS:
        for compile_backbone in compiles:
            point = {r["mode"]: r for r in runs if r["method_name"] == method and r["compile"] == compile_backbone}
            ratios[f"{method}/compile={compile_backbone}"] = (point["lightning_loader"]["images_per_s"]
                                                             / point["lightning_memory"]["images_per_s"])
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu",
              "cpu_count": os.cpu_count(), "available_cores": available_cores(), "python": platform.python_version(), "torch": torch.__version__,
              "smoke": args.smoke, "steps": args.steps, "warmup": args.warmup, "data": str(data),
              "seconds": round(time.time() - started, 1), "runs": runs,
              "loader_over_memory": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, ratio in ratios.items():
        print(f"{name}: real loader / in-memory = {ratio:.3f} (target >= 0.90)")
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
