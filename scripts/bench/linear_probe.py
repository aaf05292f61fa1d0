"""Benchmark the linear probe: cached features (finetune_mode.cache_features=true: one backbone pass per image)
vs looping the frozen backbone over the images every epoch. Same config, seed and epochs; each in its own
subprocess (peak RSS: VmHWM). Prints wall time, time ratio (target >= 20x) and test macro-F1 of both
(target: equal within 1 point). By default the looped probe trains on un-augmented images, as the cached one
does, so both train the same head; --augment keeps data.train_transform for the loop (then F1 may differ).

Two cached cases: the first run of a sweep embeds the images (empty feature_cache_dir); every later run of the
sweep that shares the frozen backbone (other fractions and seeds of an SSL init) reads the features from the
disk cache. Both are timed, once per epoch count in --epochs (the looped cost grows with epochs, the cached
one hardly).

    .venv/bin/python scripts/bench/linear_probe.py experiment=pocus_finetune paths.output_root=OUT \\
        data_fraction=pct100 --epochs 30 100
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

from hydra import compose, initialize_config_module
from peak_memory import peak_rss_mib  # scripts/bench/, on sys.path when run as a script

from fetalssl.finetune.run import run_finetune


def measure(overrides: list[str], out: str) -> dict:
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        cfg = compose("finetune", overrides=[*overrides, f"paths.output_dir={out}"])
    start = time.perf_counter()
    result = run_finetune(cfg, out)
    return {"seconds": time.perf_counter() - start, "macro_f1": result["test"]["macro_f1"],
            "video_macro_f1": result.get("test_video", {}).get("macro_f1"),
            "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/finetune.yaml")
    parser.add_argument("--epochs", type=int, nargs="+", default=[30], help="trainer.max_epochs values to time")
    parser.add_argument("--augment", action="store_true", help="looped probe keeps the training augmentation")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: JSON list of overrides + output dir
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["overrides"], spec["out"])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            base = [*args.overrides, "finetune_mode=linear", f"trainer.max_epochs={epochs}",
                    f"feature_cache_dir={tmp}/cache_{epochs}"]
            cached = [*base, "finetune_mode.cache_features=true"]
            variants = {"cached, first run": cached, "cached, later run": cached,
                        "backbone every epoch": [*base, "finetune_mode.cache_features=false",
                                                 *([] if args.augment else
                                                   ["data.train_transform=${data.eval_transform}"])]}
            results = {}
            for name, overrides in variants.items():
                spec = json.dumps({"overrides": overrides, "out": str(Path(tmp) / f"{epochs}_{len(results)}")})
                child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", spec],
                                       capture_output=True, text=True)
                if child.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
                results[name] = r = json.loads(child.stdout.strip().splitlines()[-1])
                print(f"{epochs:3d} epochs  {name:<22} {r['seconds']:7.1f} s  test macro-F1 {r['macro_f1']:.4f}  "
                      f"video macro-F1 {r['video_macro_f1']}  peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
            looped = results["backbone every epoch"]
            for name in ("cached, first run", "cached, later run"):
                cached_run = results[name]
                print(f"{epochs:3d} epochs  {name}: time ratio (loop / cached) "
                      f"{looped['seconds'] / cached_run['seconds']:.1f}x (target >= 20x); macro-F1 difference "
                      f"{100 * (cached_run['macro_f1'] - looped['macro_f1']):+.2f} pt (target within 1 pt)")


if __name__ == "__main__":
    main()
