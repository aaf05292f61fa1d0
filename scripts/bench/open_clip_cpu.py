"""A FetalCLIP-sized OpenCLIP model (ViT-L/14 at 224 px, open_clip's own ViT-L-14 config, random weights: the
cost does not depend on the values) through the published-baselines modes on a CPU: the cached linear probe
(first run embeds every image once), then k-NN and zero-shot reading the feature cache. Each run in its own
subprocess (peak RSS: VmHWM). Prints seconds, images embedded per second and peak memory per run.

    .venv/bin/python scripts/bench/open_clip_cpu.py --out /tmp/open_clip_bench --stills 100
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from peak_memory import peak_rss_mib  # scripts/bench/, on sys.path when run as a script

from fetalssl.finetune.run import run_finetune

MODES = ["linear_cached", "knn", "zeroshot"]


def measure(overrides: list[str], out: str) -> dict:
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        cfg = compose("finetune", overrides=[*overrides, f"paths.output_dir={out}"])
    start = time.perf_counter()
    result = run_finetune(cfg, out)
    return {"seconds": time.perf_counter() - start, "macro_f1": result["test"]["macro_f1"],
            "peak_rss_mib": peak_rss_mib()}


def make_model(folder: Path) -> tuple[Path, Path]:
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "ViT-L-14-bench.json"
    shutil.copy(Path(open_clip.__file__).parent / "model_configs" / "ViT-L-14.json", config)
    weights = folder / "weights.pt"
    if not weights.is_file():
        open_clip.add_model_config(config)
        torch.save(open_clip.create_model(config.stem, pretrained=None).state_dict(), weights)
    return config, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="scratch folder: data, model, runs (required)")
    parser.add_argument("--stills", type=int, default=100, help="labelled demo stills (all three splits embedded)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: JSON list of overrides + output dir
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(spec["overrides"], spec["out"])))
        return
    if args.out is None:
        parser.error("--out is required")
    data = args.out / "data"
    if not (data / "labels.csv").is_file():
        subprocess.run([str(Path(sys.executable).parent / "fetalssl-demo-data"), str(data), "--patients", "2",
                        "--videos-per-patient", "1", "--frames", "30", "--size", "64", "--still-patients", "10", "--stills",
                        str(args.stills), "--still-size", "256"], check=True, capture_output=True)
    config, weights = make_model(args.out / "model")
    cache = args.out / "feature_cache"
    shutil.rmtree(cache, ignore_errors=True)
    prompts = args.out / "prompts.json"
    prompts.write_text(json.dumps({c: [f"an ultrasound image of the {c} view"]
                                   for c in ("4CH", "LVOT", "RVOT", "3VV", "3VT")}))
    base = [f"data.root={data}", "init=open_clip", f"init.config={config}", f"init.checkpoint={weights}",
            f"init.prompts={prompts}", "init.pad_to_square=true", f"feature_cache_dir={cache}",
            "data.classes=[4CH,LVOT,RVOT,3VV,3VT]", "data.num_workers=0", "data.batch_size=16"]
    for i, mode in enumerate(MODES):
        spec = json.dumps({"overrides": [*base, f"finetune_mode={mode}"], "out": str(args.out / f"run{i}_{mode}")})
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", spec],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{child.stderr[-3000:]}")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{mode:<14} {r['seconds']:7.1f} s  {args.stills / r['seconds']:6.2f} images/s overall  "
              f"peak RSS {r['peak_rss_mib']:6.0f} MiB  (feature cache {'empty' if i == 0 else 'filled'})",
              flush=True)


if __name__ == "__main__":
    main()
