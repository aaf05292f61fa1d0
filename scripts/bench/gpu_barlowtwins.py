"""GPU benchmark (not run on the 2-core CPU machine): BarlowTwins ResNet-50 at 224 px, bf16-mixed, channels_last.

Prints images/s of the fetalssl training step on in-memory batches, of the same step fed by the real frame-pair
loader (POCUS training videos by default), their ratio (target >= 0.90), and the hand-written-loop ratio
(target >= 0.95), with peak host RSS per mode. Needs `fetalssl-extract-frames paths.output_root=OUT` first.

    .venv/bin/python scripts/bench/gpu_barlowtwins.py OUT [--batch-size 256] [--workers 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TRAINING_BENCH = Path(__file__).resolve().parent / "training.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_root", help="paths.output_root holding pocus_prepared/ (frame cache goes there)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    overrides = [
        "experiment=pocus", f"paths.output_root={args.output_root}", "method=barlowtwins", "backbone=resnet50",
        "trainer=gpu", "trainer.precision=bf16-mixed", "channels_last=true", "data.image_size=224",
        "data.short_side=256", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        # enough pairs per epoch that every timed step is in the first epoch (no worker re-fork in the timing)
        f"data.samples_per_video={max(64, 2 * args.steps * args.batch_size // 60)}",
    ]
    subprocess.run([sys.executable, str(TRAINING_BENCH), *overrides, "--steps", str(args.steps),
                    "--warmup", str(args.warmup)], check=True)


if __name__ == "__main__":
    main()
