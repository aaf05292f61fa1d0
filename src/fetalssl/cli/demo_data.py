"""`fetalssl-demo-data OUT`: write a small synthetic fetal echo data set (videos + labelled stills)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fetalssl.demo.generate import DemoDataSpec, generate_demo_data
from fetalssl.demo.render import MIN_SWEEP_FRAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fetalssl-demo-data",
        description="Generate synthetic fetal echocardiography sweeps (videos/<patient>/<scan>.mp4|.avi + "
        "per-frame plane csv) and labelled standard-plane stills (frames/<label>/*.png, labels.csv).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", type=Path, help="output directory (must be empty or absent unless --overwrite)")
    p.add_argument("--patients", type=int, default=8, help="patients with videos")
    p.add_argument("--videos-per-patient", type=int, default=2)
    p.add_argument("--frames", type=int, default=100, help=f"frames per video (>= {MIN_SWEEP_FRAMES})")
    p.add_argument("--size", type=int, default=128, help="video frame side in px (even)")
    p.add_argument("--fps", type=float, default=20.0)
    p.add_argument("--avi-every", type=int, default=4, help="every n-th video is written as .avi (0: none)")
    p.add_argument("--still-patients", type=int, default=40, help="patients with labelled stills")
    p.add_argument("--stills", type=int, default=300, help="labelled stills in total (balanced over planes)")
    p.add_argument("--still-size", type=int, default=128, help="still image side in px")
    p.add_argument("--overlap", type=int, default=2, help="still patients that are also video patients")
    p.add_argument("--frame-counter", action="store_true", help="burn a changing frame number into every sweep")
    p.add_argument("--doppler-clips", type=int, default=0, help="extra colour Doppler clips")
    p.add_argument("--split-screen-clips", type=int, default=0, help="extra split-screen clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = DemoDataSpec(
            video_patients=args.patients,
            videos_per_patient=args.videos_per_patient,
            frames=args.frames,
            size=args.size,
            fps=args.fps,
            still_patients=args.still_patients,
            stills=args.stills,
            still_size=args.still_size,
            overlap=args.overlap,
            seed=args.seed,
            avi_every=args.avi_every,
            frame_counter=args.frame_counter,
            doppler_clips=args.doppler_clips,
            split_screen_clips=args.split_screen_clips,
        )
        summary = generate_demo_data(args.out, spec, args.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"fetalssl-demo-data: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(summary.videos)} videos, {sum(summary.stills_per_class.values())} stills -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
