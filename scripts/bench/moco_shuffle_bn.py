"""Does Shuffle-BN change what MoCo learns on the demo data? Pretrain `experiment=demo method=moco` with and
without it over seeds, and print the online probe (logistic regression on frozen features of labelled val
stills) after the last epoch.

    python scripts/bench/moco_shuffle_bn.py OUT [--seeds 0 1 2] [--data OUT/data]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def final_probe(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    last = [r for r in rows if r.get("probe/macro_f1")][-1]
    return {k: float(last[k]) for k in ("probe/macro_f1", "probe/acc", "probe/knn_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    data = args.data or args.out / "data"
    if not (data / "labels.csv").is_file():
        subprocess.run([BIN / "fetalssl-demo-data", data], check=True)
    results: dict[str, list[dict[str, float]]] = {"true": [], "false": []}
    for seed in args.seeds:
        for shuffle in results:
            run_id = f"sbn_{shuffle}_s{seed}"
            subprocess.run([BIN / "fetalssl-train", "experiment=demo", "method=moco", f"method.shuffle_bn={shuffle}",
                            f"seed={seed}", f"data.root={data}", f"paths.output_root={args.out}", f"run_id={run_id}"],
                           check=True, capture_output=True)
            results[shuffle].append(final_probe(args.out / "pretrain" / "moco" / run_id))
            print(f"seed {seed} shuffle_bn={shuffle}: {results[shuffle][-1]}", flush=True)
    print("\n| shuffle_bn | probe macro-F1 | probe acc | kNN acc |\n|---|---:|---:|---:|")
    for shuffle, runs in results.items():
        cells = []
        for key in ("probe/macro_f1", "probe/acc", "probe/knn_acc"):
            values = [100 * r[key] for r in runs]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}")
        print(f"| {shuffle} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
