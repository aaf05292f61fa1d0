"""fetalssl-export: a fine-tune run's classifier as TorchScript and ONNX, with its preprocessing metadata.

    fetalssl-export outputs/finetune/ssl/<run_id> [--out DIR]

Writes plane_classifier.ts / .onnx / .json (default DIR: <run dir>/export), then checks that both exported
models reproduce the checkpoint's probabilities within --tolerance. argparse rather than Hydra: one
positional and two options, and an export is not a run that needs its own config record.
Exit status: 0 ok, 1 export or check failed, 2 bad run dir.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fetalssl.predict.export import DEFAULT_TOLERANCE, export_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetalssl-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="fine-tune run dir (.hydra/config.yaml, checkpoints/best.ckpt)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/export)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed |p_exported - p_checkpoint| on a check batch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs every optimisation pass at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    out = args.out if args.out is not None else args.run_dir / "export"
    try:
        paths = export_run(args.run_dir, out, args.tolerance)
    except (FileNotFoundError, ValueError) as e:
        print(f"fetalssl-export: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"fetalssl-export: error: {e}", file=sys.stderr)
        return 1
    print("Wrote:\n" + "\n".join(f"  {kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
