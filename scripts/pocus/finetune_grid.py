"""Run a fine-tuning grid in one process through fetalssl's own configs and run_finetune (no Hydra launcher).

Each grid point composes conf/finetune.yaml with the fixed overrides plus its own choices, exactly as
`fetalssl-finetune -m` would, and writes <out>/<choice=value,...>/ (metrics.json etc.; path values left out of the name); points already done
with the same config are skipped, failures are logged and the grid goes on. One process means one import of
torch/Lightning for the whole grid, which matters on a 2-core machine.

    python scripts/pocus/finetune_grid.py OUT/finetune_grid/lin3 experiment=pocus_finetune \
        paths.output_root=OUT finetune_mode=linear finetune_mode.cache_features=true \
        --grid init=random data_fraction=pct1,pct10,pct100 seed=0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
from pathlib import Path

from hydra import compose, initialize_config_module

from fetalssl.finetune import features
from fetalssl.finetune.run import run_unless_finished

log = logging.getLogger("finetune_grid")


def grid_points(grid: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']]."""
    axes = []
    for item in grid:
        key, values = item.split("=", 1)
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def reuse_frozen_features() -> None:
    """Memoise features.extract_features on (backbone weights, images): a frozen backbone embeds the same
    un-augmented images identically, so SSL inits share val/test (and train) features across fractions and
    seeds, and a random init across fractions of one seed. Same numbers, a fraction of the CPU time."""
    extract, memo = features.extract_features, {}

    def memoised(backbone, loader, device):
        digest = hashlib.sha1()
        for name, tensor in backbone.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = (digest.hexdigest(), tuple(loader.dataset.image_paths))
        if key not in memo:
            memo[key] = extract(backbone, loader, device)
        return memo[key]

    features.extract_features = memoised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("overrides", nargs="*", help="fixed Hydra overrides")
    parser.add_argument("--grid", nargs="+", required=True, help="key=v1,v2 axes (cartesian product)")
    parser.add_argument("--reuse-features", action="store_true", help="see reuse_frozen_features")
    args = parser.parse_args()
    if args.reuse_features:
        reuse_frozen_features()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    failed = 0
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        for point in grid_points(args.grid):
            # Paths (values holding "/") stay out of the directory name, like Hydra's exclude_keys.
            run_dir = args.out / ",".join(p for p in point if "/" not in p)
            cfg = compose("finetune", overrides=[*args.overrides, *point, f"paths.output_dir='{run_dir}'"])
            try:
                run_unless_finished(cfg, run_dir)
            except Exception:
                failed += 1
                log.exception("%s failed; the grid goes on", run_dir)
    log.info("grid finished, %d failed", failed)


if __name__ == "__main__":
    main()
