"""Benchmark the linear probe: cached features (finetune_mode.cache_features=true: one backbone pass per image)
vs looping the frozen backbone over the images every epoch. Same config, seed and epochs; each in its own
subprocess (peak RSS via getrusage). Prints wall time, time ratio (target >= 20x) and test macro-F1 of both
(target: equal within 1 point). By default the looped probe trains on un-augmented images, as the cached one
does, so both train the same head; --augment keeps data.train_transform for the loop (then F1 may differ).

    .venv/bin/python scripts/bench/linear_probe.py experiment=pocus_finetune paths.output_root=/work/runs7 \\
        data_fraction=pct10 trainer.max_epochs=20
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from fetalssl.finetune.run import run_finetune


def measure(overrides: list[str], out: str) -> dict:
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        cfg = compose("finetune", overrides=[*overrides, f"paths.output_dir={out}"])
    start = time.perf_counter()
    result = run_finetune(cfg, out)
    return {"seconds": time.perf_counter() - start, "macro_f1": result["test"]["macro_f1"],
            "video_macro_f1": result.get("test_video", {}).get("macro_f1"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/finetune.yaml")
    parser.add_argument("--augment", action="store_true", help="looped probe keeps the training augmentation")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: JSON list of overrides + output dir
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["overrides"], spec["out"])))
        return
    base = [*args.overrides, "finetune_mode=linear"]
    variants = {"cached features": [*base, "finetune_mode.cache_features=true"],
                "backbone every epoch": [*base, "finetune_mode.cache_features=false",
                                         *([] if args.augment else ["data.train_transform=${data.eval_transform}"])]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(variants.items()):
            spec = json.dumps({"overrides": overrides, "out": str(Path(tmp) / str(i))})
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", spec],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
            results[name] = r = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{name:<22} {r['seconds']:7.1f} s  test macro-F1 {r['macro_f1']:.4f}  "
                  f"video macro-F1 {r['video_macro_f1']}  peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
    cached, looped = results["cached features"], results["backbone every epoch"]
    print(f"time ratio (loop / cached): {looped['seconds'] / cached['seconds']:.1f}x (target >= 20x); "
          f"macro-F1 difference: {100 * (cached['macro_f1'] - looped['macro_f1']):+.2f} pt (target within 1 pt)")


if __name__ == "__main__":
    main()
