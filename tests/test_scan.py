"""Scan layout: detectors against the synthetic generator's true masks, the options, and the cache using them."""

import csv
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from conftest import run_cli, scan_options
from fetalssl.data.cache import build_cache, intensity_stats, load_cache
from fetalssl.data.index import VideoRecord
from fetalssl.data.scan import analyse_clip, analyse_still, apply_to_frames, intensity_moments
from fetalssl.data.video import read_frames, to_gray
from fetalssl.demo.generate import write_video
from fetalssl.demo.render import PLAIN_SWEEP, SweepKind, render_sweep, sample_patient_anatomy

DETECTOR = scan_options("keep").detector
COUNTER = SweepKind(frame_counter=True, doppler=False, split_screen=False)


def sweep(seed: int, kind: SweepKind = PLAIN_SWEEP, size: int = 128, n_frames: int = 40):
    rng = np.random.default_rng(seed)
    return render_sweep(sample_patient_anatomy(rng), n_frames=n_frames, size=size, fps=20, rng=rng, kind=kind)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def recall_precision(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits = (found & truth).sum()
    return hits / truth.sum(), hits / max(1, found.sum())


def through_codec(tmp_path, frames: np.ndarray, name: str = "clip.mp4") -> np.ndarray:
    path = tmp_path / name
    write_video(path, frames, fps=20)
    return read_frames(path, rgb=True)[0]


@pytest.mark.parametrize("kind", [PLAIN_SWEEP, COUNTER], ids=["plain", "frame_counter"])
def test_sector_and_overlays_match_the_generators_masks_before_and_after_the_codec(tmp_path, kind):
    scores = {"raw": [], "codec": []}
    for seed in range(6):
        truth = sweep(seed, kind)
        for name, frames in (("raw", truth.frames), ("codec", to_gray(through_codec(tmp_path, truth.frames)))):
            layout = analyse_clip(frames, None, DETECTOR)
            scores[name].append((iou(layout.sector, truth.sector), *recall_precision(layout.overlay, truth.overlay)))
            assert not layout.split_screen and not layout.from_still and not layout.doppler_frames.any()
    for name, rows in scores.items():
        rows = np.array(rows)
        mean_iou, mean_recall, mean_precision = rows.mean(0)
        assert mean_iou >= 0.95 and rows[:, 0].min() >= 0.9, (name, rows[:, 0])
        assert mean_recall >= 0.9 and mean_precision >= 0.9, (name, rows[:, 1:])


def test_the_moving_frame_counter_is_an_overlay_not_part_of_the_sector():
    truth = sweep(0, COUNTER)
    counter_only = truth.overlay & ~sweep(0).overlay  # the digits' pixels (same seed: same everything else)
    layout = analyse_clip(truth.frames, None, DETECTOR)
    assert counter_only.sum() > 10
    assert not (layout.sector & counter_only).any()
    assert recall_precision(layout.overlay, counter_only)[0] >= 0.9


def test_doppler_frames_are_found_from_chroma_and_grey_clips_have_none(tmp_path):
    doppler = sweep(1, SweepKind(frame_counter=False, doppler=True, split_screen=False))
    colour = through_codec(tmp_path, doppler.frames)
    layout = analyse_clip(to_gray(colour), colour, DETECTOR)
    assert layout.doppler_frames.all() and layout.is_doppler_clip
    grey = through_codec(tmp_path, sweep(1).frames, "grey.mp4")  # decoded as RGB, but without chroma
    assert not analyse_clip(to_gray(grey), grey, DETECTOR).doppler_frames.any()


def test_split_screen_is_found_and_both_panes_are_the_sector():
    for seed in range(3):
        truth = sweep(seed, SweepKind(frame_counter=False, doppler=False, split_screen=True))
        layout = analyse_clip(truth.frames, None, DETECTOR)
        assert layout.split_screen
        assert iou(layout.sector, truth.sector) >= 0.88
        half = truth.frames.shape[2] // 2
        assert layout.sector[:, :half].sum() == pytest.approx(layout.sector[:, half:].sum(), rel=0.1)


def test_a_single_frame_gets_its_sector_from_its_content():
    truth = sweep(2)
    still = analyse_still(truth.frames[10], None, DETECTOR)
    assert still.from_still and iou(still.sector, truth.sector) >= 0.85
    one_frame = analyse_clip(truth.frames[:1], None, DETECTOR)
    assert one_frame.from_still
    assert np.array_equal(one_frame.sector, analyse_still(truth.frames[0], None, DETECTOR).sector)


def test_options_fill_overlays_zero_the_outside_and_crop_to_the_sector():
    truth = sweep(3)
    layout = analyse_clip(truth.frames, None, DETECTOR)
    sector = scan_options("sector")
    out = apply_to_frames(truth.frames, layout, sector)
    r0, r1, c0, c1 = layout.bbox
    assert out.shape == (len(truth.frames), r1 - r0, c1 - c0)
    inside = layout.sector[r0:r1, c0:c1]
    assert (out[:, ~inside] == 0).all()  # outside the sector: black
    kept = apply_to_frames(truth.frames, layout, scan_options("keep"))
    assert kept is truth.frames or np.array_equal(kept, truth.frames)
    zeroed = apply_to_frames(truth.frames, layout, replace(sector, overlays="zero", crop_to_sector=False))
    overlay_in_sector = layout.overlay & layout.sector
    assert overlay_in_sector.any() and (zeroed[:, overlay_in_sector] == 0).all()
    inpainted = apply_to_frames(truth.frames, layout, replace(sector, crop_to_sector=False))
    # Inpainted overlay pixels take the surrounding image's values: far below the burned-in white.
    assert inpainted[:, overlay_in_sector].mean() < 0.6 * truth.frames[:, overlay_in_sector].mean()
    assert np.array_equal(inpainted[:, layout.sector & ~layout.overlay], truth.frames[:, layout.sector & ~layout.overlay])


def test_intensity_moments_add_up_to_the_live_images_mean_and_std():
    truth = sweep(4)
    layout = analyse_clip(truth.frames, None, DETECTOR)
    out = apply_to_frames(truth.frames, layout, scan_options("sector"))
    n, total, squares = intensity_moments(out, layout)
    r0, r1, c0, c1 = layout.bbox
    live = out[:, (layout.sector & ~layout.overlay)[r0:r1, c0:c1]] / 255.0
    assert n == live.size and total / n == pytest.approx(live.mean()) and squares / n == pytest.approx((live**2).mean())


# ---- the frame cache with scan options --------------------------------------------------------------------


@pytest.fixture
def scan_videos(tmp_path):
    """A plain sweep, a Doppler clip and a split-screen clip on disk (with their true masks)."""
    clips = {"plain": sweep(0, COUNTER, size=64), "doppler": sweep(1, replace(COUNTER, doppler=True), size=64),
             "split": sweep(2, replace(COUNTER, split_screen=True), size=64)}
    records = []
    for name, clip in clips.items():
        path = tmp_path / "videos" / f"p_{name}" / f"{name}.mp4"
        path.parent.mkdir(parents=True)
        write_video(path, clip.frames, fps=20)
        records.append(VideoRecord(path, f"p_{name}"))
    return records, clips


def test_cache_skips_doppler_and_split_clips_under_sector_and_records_every_layout(tmp_path, scan_videos,
                                                                                  monkeypatch):
    from fetalssl.data import cache as cache_module

    records, clips = scan_videos
    sector = scan_options("sector")
    summary = build_cache(records, tmp_path / "cache", 64, 1, False, min_decoded_fraction=0.9, scan=sector)
    assert [v.source.stem for v in summary.videos] == ["plain"]
    reasons = {p.stem: r for p, r in summary.skipped}
    assert "colour Doppler" in reasons["doppler"] and "split-screen" in reasons["split"]
    assert summary.scans[records[1].path]["doppler_frames"] == 40 and summary.scans[records[2].path]["split_screen"]
    video = summary.videos[0]
    assert min(video.frames().shape[1:]) == 64  # cropped to the sector, then back to the short side
    assert iou(video.layout().sector, clips["plain"].sector) >= 0.9
    kept = build_cache(records, tmp_path / "cache", 64, 1, False, min_decoded_fraction=0.9, scan=scan_options("keep"))
    assert kept.built == 3 and not kept.skipped  # other options: new entries; keep skips nothing
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_module, "read_gray_and_colour", no_decoding)
    again = build_cache(records, tmp_path / "cache", 64, 1, False, min_decoded_fraction=0.9, scan=sector)
    assert again.built == 0 and again.reused == 1  # the sector entries are reused
    assert {p.stem: r for p, r in again.skipped} == reasons  # the skipped clips too, with their reasons


def test_drop_frames_keeps_the_grey_frames_of_a_partly_doppler_clip(tmp_path):
    grey, doppler = sweep(5, size=64), sweep(5, SweepKind(False, True, False), size=64)
    frames = np.concatenate([np.repeat(grey.frames[:30, ..., None], 3, -1), doppler.frames[30:]])
    path = tmp_path / "v" / "mixed.mp4"
    path.parent.mkdir()
    write_video(path, frames, fps=20)
    options = replace(scan_options("keep"), doppler="drop_frames")
    summary = build_cache([VideoRecord(path, "p")], tmp_path / "cache", 64, 1, False, 0.9, scan=options)
    assert summary.videos[0].n_frames == 30 and summary.scans[path]["frames_kept"] == 30


def test_cache_normalisation_is_the_live_images_mean_and_std(tmp_path, scan_videos):
    records, _ = scan_videos
    sector = scan_options("sector")
    build_cache(records, tmp_path / "cache", 64, 1, False, min_decoded_fraction=0.9, scan=sector)
    videos = load_cache(records, tmp_path / "cache", 64, 1, False, sector)
    frames = read_frames(records[0].path, short_side=64)[0]
    layout = analyse_clip(frames, None, sector.detector)
    out = apply_to_frames(frames, layout, sector)
    r0, r1, c0, c1 = layout.bbox
    live = out[:, (layout.sector & ~layout.overlay)[r0:r1, c0:c1]] / 255.0
    mean, std = intensity_stats(videos)
    assert mean == pytest.approx(live.mean(), abs=1e-6) and std == pytest.approx(live.std(), abs=1e-6)


def test_a_one_frame_video_gets_a_sector_from_the_still_fallback(tmp_path):
    path = tmp_path / "v" / "one.mp4"
    path.parent.mkdir()
    write_video(path, sweep(6, size=64).frames[:1], fps=20)
    summary = build_cache([VideoRecord(path, "p")], tmp_path / "cache", 64, 1, False, 0.9, scan=scan_options("sector"))
    assert summary.scans[path]["sector_from"] == "still" and summary.videos[0].n_frames == 1


def test_prepare_writes_the_summary_contact_sheets_and_measured_normalisation(tmp_path):
    data = tmp_path / "demo"
    run_cli("fetalssl-demo-data", data, "--patients", 2, "--videos-per-patient", 1, "--frames", 30, "--size", 64,
            "--stills", 0, "--still-patients", 0, "--overlap", 0, "--frame-counter", "--doppler-clips", 1,
            "--split-screen-clips", 1)
    report = tmp_path / "report"
    run_cli("fetalssl-prepare", f"data.root={data / 'videos'}", f"paths.output_root={tmp_path}", "scan=sector",
            f"report.dir={report}", "data.short_side=64")
    with (report / "scan_summary.csv").open() as f:
        rows = {"/".join(r["source"].split("/")[-2:]): r for r in csv.DictReader(f)}
    assert {k: rows[k]["status"] for k in rows} == {"P0000/scan00.mp4": "kept", "P0001/scan00.mp4": "kept",
                                                    "P0000/doppler00.mp4": "skipped", "P0000/split00.mp4": "skipped"}
    assert "Doppler" in rows["P0000/doppler00.mp4"]["reason"] and rows["P0000/split00.mp4"]["split_screen"] == "True"
    summary = json.loads((report / "prepare_summary.json").read_text())
    assert summary["kept"] == 2 and summary["doppler_clips"] == 1 and summary["split_screen_clips"] == 1
    assert 0.05 < summary["normalization"]["mean"] < 0.6 and summary["scan"]["overlays"] == "inpaint"
    sheets = sorted((report / "contact_sheets").glob("*.png"))
    assert [s.name for s in sheets] == ["P0000.png", "P0001.png"]
    sheet = cv2.imread(str(sheets[0]))
    assert sheet.shape[0] == 96 + 14 and (sheet[..., 1] == 200).any()  # one video row; the green sector outline
    red = (sheet[..., 2] > 150) & (sheet[..., 1] < 100) & (sheet[..., 0] < 100)
    assert red.any()  # overlays tinted on the source frame (the cached frame beside it has them inpainted)


def test_predict_applies_the_runs_scan_options_to_a_still_a_one_frame_dicom_and_a_one_frame_video(tmp_path):
    """The plane finder's inputs get the fine-tuning images' scan handling: a sector from the still fallback."""
    from pydicom import dcmread, examples
    from pydicom.pixels import pixel_array
    from pydicom.uid import ExplicitVRLittleEndian

    from fetalssl.predict.model import ModelMeta

    sector = scan_options("sector")
    meta = ModelMeta(classes=["a"], image_size=32, channels=1, mean=0.5, std=0.25,
                     scan={**sector.record(), "detector": sector.detector.__dict__})
    truth = sweep(7, size=64)
    write_video(tmp_path / "one.mp4", truth.frames[:1], fps=20)
    cv2.imwrite(str(tmp_path / "still.png"), truth.frames[5])
    ds = dcmread(examples.ybr_color.filename)  # a real echo cine: its first frame as a 1-frame DICOM
    rgb = pixel_array(ds)[0]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation, ds.NumberOfFrames, ds.PlanarConfiguration = "RGB", 1, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    for name in ("one.mp4", "still.png", "one.dcm"):
        frames = read_frames(tmp_path / name)[0]
        [out] = meta.apply_scan(frames)
        layout = analyse_still(frames[0], None, sector.detector)
        r0, r1, c0, c1 = layout.bbox
        assert out.shape == (r1 - r0, c1 - c0) and out.shape != frames.shape[1:], name
        assert (out[~layout.sector[r0:r1, c0:c1]] == 0).all(), name  # zeroed outside, as in fine-tuning
    # Every frame of a clip is handled as a labelled still is in fine-tuning (load_scan_image): same pixels.
    from fetalssl.data.downstream import load_scan_image

    clip = sweep(8, size=64).frames[:3]
    for frame, out in zip(clip, meta.apply_scan(clip), strict=True):
        cv2.imwrite(str(tmp_path / "frame.png"), frame)
        assert np.array_equal(out, load_scan_image(tmp_path / "frame.png", sector))
