"""Run the plane finder on one scan video or a folder of them; each input gets its own output folder.

Per input `<out_dir>/<name>_<ext>/` (mirroring sub-folders for a folder input):
    frames.csv        frame, time_s, raw_<class>..., prob_<class>... (smoothed), predicted[, true_plane]
    best_frames.csv   plane, frame, time_s, score, found, file
    best_<plane>_f<frame>_p<score>.png   the chosen frame, at source resolution
    timeline.png      smoothed probability of each plane vs time, chosen frames marked
    scan.json         the above in brief, plus per-frame accuracy when the true planes are known
A folder is built under a hidden staging name and renamed into place only when complete, so a corrupt input
leaves nothing behind. With the synthetic data (and any video with a `<video stem><truth_suffix>` file of
frame,plane rows), the true planes are read, shaded in the timeline and scored.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fetalssl.data.video import CONTAINER_EXTENSIONS, DICOM_EXTENSIONS, VideoReadError, is_dicom, read_frames
from fetalssl.io import save_json
from fetalssl.models.saliency import overlay
from fetalssl.predict.predictor import Predictor
from fetalssl.predict.timeline import OTHER, BestFrame, best_frames, frame_labels, smooth, timeline_figure
from fetalssl.progress import progress

log = logging.getLogger(__name__)

SUMMARY_FILE = "predict_summary.json"
VIDEO_EXTENSIONS = CONTAINER_EXTENSIONS | DICOM_EXTENSIONS
STILL_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}  # screenshots, exported frames
INPUT_EXTENSIONS = VIDEO_EXTENSIONS | STILL_EXTENSIONS


@dataclass(frozen=True)
class FinderSettings:
    batch_size: int
    smooth_window: int  # frames, odd; 1 = no smoothing
    abstain_threshold: float | None  # frames whose top smoothed probability is lower are labelled `other`
    found_threshold: float  # a plane whose best smoothed score is lower is reported as not found
    truth_suffix: str | None  # sibling file with the true plane per frame (frame,plane); None: never read
    progress_every_seconds: float  # inputs done: a bar in a terminal, else a log line this often

    @property
    def found_at(self) -> float:
        """A plane is found from this score on: found_threshold, or abstain_threshold if that is higher."""
        return max(self.found_threshold, self.abstain_threshold or 0.0)


def find_inputs(path: Path) -> list[Path]:
    """The file itself, or every video / DICOM / still image below a folder (extensionless files by DICOM
    magic)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input={path} does not exist")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (p.suffix.lower() in INPUT_EXTENSIONS or is_dicom(p)))
    if not found:
        raise FileNotFoundError(f"input={path}: no video, DICOM or image files in it (looked for "
                                f"{', '.join(sorted(INPUT_EXTENSIONS))} and DICOM magic)")
    return found


def output_folder(video: Path, input_root: Path, out_dir: Path) -> Path:
    """<out_dir>/<sub-folders>/<stem>_<ext>: the extension is kept so scan.mp4 and scan.avi do not collide."""
    relative = video.relative_to(input_root) if input_root.is_dir() else Path(video.name)
    name = relative.stem + (f"_{relative.suffix[1:].lower()}" if relative.suffix else "")
    return out_dir / relative.parent / name


def read_truth(video: Path, suffix: str | None, n_frames: int) -> list[str] | None:
    """True plane per frame from the sibling frame,plane CSV if there is a usable one; else None (logged)."""
    if suffix is None or not video.with_suffix(suffix).is_file():
        return None
    path = video.with_suffix(suffix)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"frame", "plane"} <= set(rows[0]):
        log.warning("%s: not a frame,plane file; true planes not used", path)
        return None
    if [int(r["frame"]) for r in rows] != list(range(n_frames)):
        log.warning("%s: frames do not match the %d decoded frames; true planes not used", path, n_frames)
        return None
    return [r["plane"] for r in rows]


def accuracy_against_truth(predicted: Sequence[str], truth: Sequence[str], classes: Sequence[str],
                           chosen: Sequence[BestFrame]) -> dict[str, Any]:
    """Per-frame accuracy on frames whose true label is a class (transition frames reported apart);
    an abstained frame (`other`) counts as wrong. Also: is each chosen best frame inside its plane's segment."""
    on_plane = [i for i, t in enumerate(truth) if t in classes]
    off_plane = [i for i, t in enumerate(truth) if t not in classes]
    correct = sum(predicted[i] == truth[i] for i in on_plane)
    return {
        "frames_on_plane": len(on_plane),
        "accuracy_on_plane": correct / len(on_plane) if on_plane else math.nan,
        "frames_off_plane": len(off_plane),  # e.g. `transition`: no correct class exists
        "off_plane_labelled_other": sum(predicted[i] == OTHER for i in off_plane),
        "best_frame_in_true_segment": {b.plane: truth[b.frame] == b.plane for b in chosen},
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path.name} as PNG")
    path.write_bytes(encoded.tobytes())


def _publish(staging: Path, final: Path) -> None:
    """Swap the finished staging folder in; an older result for the same input is replaced."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def write_scan_outputs(folder: Path, video: Path, frames: np.ndarray, fps: float, raw: np.ndarray,
                       classes: Sequence[str], settings: FinderSettings) -> dict[str, Any]:
    smoothed = smooth(raw, settings.smooth_window)
    predicted = frame_labels(smoothed, classes, settings.abstain_threshold)
    chosen = best_frames(smoothed, classes, settings.found_at)
    truth = read_truth(video, settings.truth_suffix, len(frames))
    timed = math.isfinite(fps) and fps > 0  # DICOM without a frame rate: frame index only
    times = np.arange(len(frames)) / fps if timed else np.full(len(frames), math.nan)

    header = ["frame", "time_s", *(f"raw_{c}" for c in classes), *(f"prob_{c}" for c in classes), "predicted"]
    rows = [[i, f"{times[i]:.4f}", *(f"{p:.6f}" for p in raw[i]), *(f"{p:.6f}" for p in smoothed[i]),
             predicted[i]] + ([truth[i]] if truth else []) for i in range(len(frames))]
    _write_csv(folder / "frames.csv", header + (["true_plane"] if truth else []), rows)

    best_rows = []
    for best in chosen:
        file = f"best_{_safe(best.plane)}_f{best.frame:05d}_p{best.score:.3f}.png" if best.found else ""
        if file:
            _write_png(folder / file, frames[best.frame])
        best_rows.append([best.plane, best.frame, f"{times[best.frame]:.4f}", f"{best.score:.6f}",
                          best.found, file])
    _write_csv(folder / "best_frames.csv", ["plane", "frame", "time_s", "score", "found", "file"], best_rows)

    fig = timeline_figure(times if timed else np.arange(len(frames)), "time (s)" if timed else "frame",
                          smoothed, classes, chosen, settings.abstain_threshold, video.name, truth)
    fig.savefig(folder / "timeline.png", dpi=120)

    scan = {"input": str(video), "n_frames": len(frames), "fps": fps if timed else None,
            "settings": asdict(settings), "best_frames": [asdict(b) for b in chosen]}
    if truth:
        scan["truth"] = accuracy_against_truth(predicted, truth, classes, chosen)
    save_json(scan, folder / "scan.json")
    return scan


def write_best_frame_saliency(folder: Path, frames: np.ndarray, chosen: list[dict[str, Any]],
                              predictor: Predictor) -> None:
    """saliency_<plane>_f<frame>.png: Grad-CAM of each found plane on its best frame, over that frame as the model
    sees it; only for models loaded from a fine-tune run dir (TorchScript and ONNX carry no gradients)."""
    found = [b for b in chosen if b["found"]]
    if not found:
        return
    maps = predictor.saliency(frames[[b["frame"] for b in found]], [predictor.classes.index(b["plane"]) for b in found])
    if maps is None:
        return
    for best, image, cam in zip(found, *maps, strict=True):
        rgb = overlay(image, cam)
        _write_png(folder / f"saliency_{_safe(best['plane'])}_f{best['frame']:05d}.png", rgb[..., ::-1])  # BGR


def read_input(path: Path) -> tuple[np.ndarray, float]:
    """(uint8 grayscale frames (T, H, W), fps): a still image is one frame without a frame rate."""
    if path.suffix.lower() in STILL_EXTENSIONS:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise VideoReadError(f"{path}: cannot be decoded as an image")
        return image[None], math.nan
    return read_frames(path, rgb=False)  # raises VideoReadError naming the file


def process_video(video: Path, folder: Path, predictor: Predictor, settings: FinderSettings) -> dict[str, Any]:
    """Classify every frame of `video` (a clip of any length, or a still) and write its output folder; all or
    nothing."""
    frames, fps = read_input(video)
    raw = predictor.predict_frames(frames, settings.batch_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        scan = write_scan_outputs(staging, video, frames, fps, raw, predictor.classes, settings)
        write_best_frame_saliency(staging, frames, scan["best_frames"], predictor)
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: %d frames -> %s", video, len(frames), folder)
    return scan


def run_finder(input_path: Path, out_dir: Path, predictor: Predictor, settings: FinderSettings
               ) -> list[dict[str, Any]]:
    """Every input in turn; one that fails, for whatever reason, is reported (log + predict_summary.json) and the
    rest go on. The summary of an earlier run into the same out_dir is kept: its entries for other inputs stay,
    and an input processed again gets its new entry."""
    results = []
    inputs = find_inputs(input_path)
    for video in progress(inputs, len(inputs), "inputs", settings.progress_every_seconds):
        folder = output_folder(video, input_path, out_dir)
        try:
            scan = process_video(video, folder, predictor, settings)
        except Exception as e:  # one bad input must never cost the others their results or the summary
            log.error("%s: skipped, no outputs written: %s", video, e)
            results.append({"input": str(video), "status": "failed", "error": f"{type(e).__name__}: {e}",
                            "model": str(predictor.source)})
            continue
        results.append({"input": str(video), "status": "ok", "output": str(folder), "model": str(predictor.source),
                        **({"truth": scan["truth"]} if "truth" in scan else {})})
    save_json({"results": merged_summary(out_dir / SUMMARY_FILE, results)}, out_dir / SUMMARY_FILE)
    return results


def merged_summary(path: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier summary's entries (by input) updated with this run's, in input order."""
    try:
        earlier = {r["input"]: r for r in json.loads(path.read_text())["results"]}
    except FileNotFoundError:
        earlier = {}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("%s: unreadable earlier summary (%s); starting a new one", path, e)
        earlier = {}
    earlier.update({r["input"]: r for r in results})
    return [earlier[k] for k in sorted(earlier)]
