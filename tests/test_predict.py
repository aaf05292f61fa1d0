"""Plane finder: smoothing, abstention, best frames, atomic per-input outputs and the planes it finds."""

import csv
import json
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import data_groups, init_config
from fetalssl.cli import predict as predict_cli
from fetalssl.demo.generate import DemoDataSpec, generate_demo_data, write_video
from fetalssl.demo.render import PLANES, render_sweep, sample_patient_anatomy
from fetalssl.finetune.classifier import PlaneClassifier
from fetalssl.predict.model import RUN_CHECKPOINT, RUN_CONFIG, load_run
from fetalssl.predict.predictor import load_predictor
from fetalssl.predict.scan import SUMMARY_FILE, FinderSettings, output_folder, run_finder
from fetalssl.predict.timeline import OTHER, best_frames, frame_labels, smooth

CONF = Path(__file__).resolve().parents[1] / "src" / "fetalssl" / "conf"
SETTINGS = FinderSettings(batch_size=8, smooth_window=3, abstain_threshold=None, found_threshold=0.5, truth_suffix=".csv",
                           progress_every_seconds=30)


def make_run_dir(root: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A fine-tune run dir (config + best.ckpt) holding an untrained resnet18 with a sharpened head and
    non-trivial BatchNorm statistics, so probabilities are far from uniform without any training."""
    cfg = OmegaConf.create({**data_groups(), "data": OmegaConf.load(CONF / "data" / "labelled.yaml"),
                            "backbone": OmegaConf.load(CONF / "backbone" / "resnet18.yaml"),
                            "init": init_config("random"),
                            "finetune_mode": OmegaConf.load(CONF / "finetune_mode" / "full.yaml")})
    cfg.data.update(root="unused", image_size=image_size, classes=list(PLANES))
    torch.manual_seed(seed)
    backbone = instantiate(cfg.backbone)
    model = PlaneClassifier(backbone, backbone.num_features, list(cfg.data.classes), "all", 1e-3, 1e-3,
                            partial(torch.optim.AdamW, weight_decay=0.0), 0.0, 0.0, False, None, None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        model.head[-1].weight.mul_(40)
    run = root / "run"
    (run / RUN_CHECKPOINT).parent.mkdir(parents=True)
    (run / RUN_CONFIG).parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, run / RUN_CHECKPOINT)
    OmegaConf.save(cfg, run / RUN_CONFIG)
    return run


def write_sweep(path: Path, n_frames: int = 24, size: int = 48, seed: int = 0) -> list[str]:
    """A synthetic cine (+ its frame,plane CSV, as the demo data has) -> the true plane per frame."""
    rng = np.random.default_rng(seed)
    sweep = render_sweep(sample_patient_anatomy(rng), n_frames=n_frames, size=size, fps=10, rng=rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, sweep.frames, fps=10)
    path.with_suffix(".csv").write_text("frame,plane\n" + "".join(f"{i},{p}\n" for i, p in enumerate(sweep.labels)))
    return sweep.labels


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


# ---- timeline maths --------------------------------------------------------------------------------------
def test_smoothing_is_a_centred_mean_with_truncated_windows_at_the_ends():
    p = np.zeros((5, 2), np.float32)
    p[:, 1] = 1.0
    p[2] = [1.0, 0.0]
    s = smooth(p, 3)
    np.testing.assert_allclose(s[:, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], atol=1e-6)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-6)  # still a distribution per frame
    edge = smooth(np.array([[1.0], [0.0], [0.0]], np.float32), 3)
    np.testing.assert_allclose(edge[:, 0], [0.5, 1 / 3, 0.0], atol=1e-6)  # mean of the frames that exist
    np.testing.assert_array_equal(smooth(p, 1), p)
    with pytest.raises(ValueError, match="odd"):
        smooth(p, 4)


def test_abstention_labels_unsure_frames_other_and_best_frames_peak_per_plane():
    classes = ["A", "B"]
    p = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.3, 0.7]], np.float32)
    assert frame_labels(p, classes, None) == ["A", "A", "B", "B"]
    assert frame_labels(p, classes, 0.6) == ["A", OTHER, "B", "B"]
    chosen = best_frames(p, classes, 0.85)
    assert [(b.plane, b.frame, b.found) for b in chosen] == [("A", 0, True), ("B", 2, False)]
    assert chosen[1].score == pytest.approx(0.8)
    assert all(type(b.found) is bool for b in chosen)  # goes into scan.json


# ---- outputs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("model"))


def test_checkpoint_predictor_matches_the_lightning_classifier(run_dir):
    model, meta = load_run(run_dir)
    state = torch.load(run_dir / RUN_CHECKPOINT, weights_only=True)["state_dict"]
    classifier = PlaneClassifier(instantiate(OmegaConf.load(run_dir / RUN_CONFIG).backbone, in_chans=3), 512,
                                 meta.classes, "all", 1e-3, 1e-3, partial(torch.optim.AdamW), 0.0, 0.0, False, None, None)
    classifier.load_state_dict(state)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = classifier.eval()(x).softmax(1)
    np.testing.assert_allclose(model(x).detach().numpy(), expected.numpy(), atol=1e-6)
    assert meta.classes == list(PLANES) and (meta.image_size, meta.channels) == (32, 3)


def test_a_run_dirs_predictor_gives_grad_cam_maps_of_the_asked_class_at_model_input_size(run_dir):
    predictor = load_predictor(run_dir)
    frames = np.random.default_rng(0).integers(0, 255, (3, 50, 60), dtype=np.uint8)
    shown, cams = predictor.saliency(frames, [0, 1, 2])
    assert shown.shape == cams.shape == (3, 32, 32) and shown.dtype == np.uint8
    assert cams.min() >= 0 and cams.max() <= 1
    again = predictor.saliency(frames[:1], [1])[1]
    assert not np.allclose(again[0], cams[0])  # the map depends on the class asked for


def test_folder_run_writes_every_output_and_reports_a_corrupt_file_without_partial_outputs(run_dir, tmp_path):
    videos = tmp_path / "videos"
    truth = write_sweep(videos / "P1" / "scan00.mp4")
    (videos / "P2").mkdir()
    (videos / "P2" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out = tmp_path / "out"
    results = run_finder(videos, out, load_predictor(run_dir), SETTINGS)

    by_name = {Path(r["input"]).name: r for r in results}
    assert by_name["broken.mp4"]["status"] == "failed" and "broken.mp4" in by_name["broken.mp4"]["error"]
    assert by_name["scan00.mp4"]["status"] == "ok"
    assert not (out / "P2").exists()  # nothing at all for the bad input, not even its folder
    assert not [p for p in out.rglob(".*")]  # no staging leftovers
    assert json.loads((out / SUMMARY_FILE).read_text())["results"] == sorted(results, key=lambda r: r["input"])

    folder = output_folder(videos / "P1" / "scan00.mp4", videos, out)
    assert folder == out / "P1" / "scan00_mp4"
    with (folder / "frames.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == list(range(len(truth)))
    assert float(rows[1]["time_s"]) == pytest.approx(0.1)
    assert [r["true_plane"] for r in rows] == truth
    smoothed = np.array([[float(r[f"prob_{c}"]) for c in PLANES] for r in rows])
    np.testing.assert_allclose(smoothed.sum(axis=1), 1.0, atol=1e-4)
    assert [r["predicted"] for r in rows] == [PLANES[i] for i in smoothed.argmax(axis=1)]
    with (folder / "best_frames.csv").open() as f:
        best = list(csv.DictReader(f))
    assert [b["plane"] for b in best] == list(PLANES)
    for b in best:
        k = PLANES.index(b["plane"])
        assert smoothed[int(b["frame"]), k] == pytest.approx(smoothed[:, k].max(), abs=1e-6)
        assert float(b["score"]) == pytest.approx(smoothed[:, k].max(), abs=1e-6)
        assert (b["found"] == "True") == (float(b["score"]) >= SETTINGS.found_threshold)
        if b["found"] == "True":
            assert (folder / b["file"]).is_file() and f"_f{int(b['frame']):05d}_" in b["file"]
        else:
            assert b["file"] == ""
    # Grad-CAM over each found plane's best frame (a run dir's model has gradients)
    assert any(b["found"] == "True" for b in best)  # so the check below is not vacuous
    assert sorted(p.name for p in folder.glob("saliency_*.png")) == sorted(
        f"saliency_{b['plane']}_f{int(b['frame']):05d}.png" for b in best if b["found"] == "True")
    assert (folder / "timeline.png").stat().st_size > 10_000
    scan = json.loads((folder / "scan.json").read_text())
    on_plane = [i for i, t in enumerate(truth) if t in PLANES]
    expected = np.mean([rows[i]["predicted"] == truth[i] for i in on_plane])
    assert scan["truth"]["accuracy_on_plane"] == pytest.approx(expected)
    assert scan["truth"]["frames_off_plane"] == len(truth) - len(on_plane)


def test_cli_single_corrupt_input_exits_1_naming_the_file_and_leaves_no_outputs(run_dir, tmp_path, monkeypatch):
    bad = tmp_path / "scan.avi"
    bad.write_bytes(b"RIFF" + b"\x13" * 500)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["fetalssl-predict", f"model={run_dir}", f"input={bad}", f"out_dir={out}"])
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main()
    assert exit_info.value.code == 1
    assert sorted(files_under(out)) == ["predict.log", SUMMARY_FILE]  # the run's report, nothing for the input
    assert f"FAILED {bad}: VideoReadError" in (out / "predict.log").read_text()
    [result] = json.loads((out / SUMMARY_FILE).read_text())["results"]
    assert result["status"] == "failed" and str(bad) in result["error"]


def test_cli_rejects_a_model_that_is_neither_run_dir_nor_exported_file(tmp_path, monkeypatch):
    video = tmp_path / "v.mp4"
    write_sweep(video, n_frames=23, size=32)
    model = tmp_path / "weights.bin"
    model.write_bytes(b"x")
    monkeypatch.setattr(sys, "argv", ["fetalssl-predict", f"model={model}", f"input={video}",
                                      f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main()
    assert exit_info.value.code == 2


# ---- acceptance: the planes it finds after fine-tuning on demo stills -------------------------------------
def finetune_cfg_64px(root: Path, max_epochs: int):
    """The package YAMLs with a small-data setting: full fine-tuning of resnet18 at 64 px."""
    cfg = OmegaConf.create({
        "seed": 0,
        **data_groups(),
        "data": OmegaConf.load(CONF / "data" / "labelled.yaml"),
        "backbone": OmegaConf.load(CONF / "backbone" / "resnet18.yaml"),
        "init": init_config("random"),
        "finetune_mode": OmegaConf.load(CONF / "finetune_mode" / "full.yaml"),
        "calibration": {"n_bins": 10, "temperature_scaling": True},
        "saliency": {"images_per_kind": 2},
        "classifier": {"class_weighted": True, "warmup_fraction": 0.05,
                       "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01}},
        "monitor": "val/balanced_accuracy", "monitor_mode": "max",
        "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1, "max_epochs": max_epochs,
                    "logger": False, "enable_progress_bar": False, "enable_model_summary": False},
    })
    cfg.data.update(root=str(root), image_size=64, num_workers=0, batch_size=32, val_fraction=0.2,
                    test_fraction=0.2)
    cfg.finetune_mode.update(head_lr=3e-3, backbone_lr=1e-3)
    return cfg


@pytest.mark.slow
def test_best_frame_of_each_plane_lies_in_its_true_segment_after_finetuning_on_demo_stills(tmp_path):
    from fetalssl.finetune.run import run_finetune

    data = tmp_path / "demo"
    generate_demo_data(data, DemoDataSpec(video_patients=2, videos_per_patient=1, frames=60, size=64, fps=10,
                                          still_patients=12, stills=150, still_size=64, overlap=0, seed=0,
                                          avi_every=0, frame_counter=False, doppler_clips=0,
                                          split_screen_clips=0), overwrite=False)
    run = tmp_path / "run"
    cfg = finetune_cfg_64px(data, max_epochs=8)
    run_finetune(cfg, run)
    (run / RUN_CONFIG).parent.mkdir()
    OmegaConf.save(cfg, run / RUN_CONFIG)  # what Hydra writes for fetalssl-finetune

    results = run_finder(data / "videos", tmp_path / "out", load_predictor(run),
                         FinderSettings(batch_size=32, smooth_window=5, abstain_threshold=None, found_threshold=0.5,
                                        truth_suffix=".csv", progress_every_seconds=30))
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    for result in results:
        inside = result["truth"]["best_frame_in_true_segment"]
        assert sum(inside.values()) >= 4, (result["input"], inside)


def test_clips_shorter_than_the_window_and_stills_are_classified_and_every_input_is_summarised(run_dir, tmp_path):
    inputs = tmp_path / "inputs"
    rng = np.random.default_rng(0)
    inputs.mkdir()
    write_video(inputs / "three.mp4", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), fps=10)
    cv2.imwrite(str(inputs / "screenshot.png"), rng.integers(0, 255, (80, 96), dtype=np.uint8))
    (inputs / "fake.jpg").write_text("not an image")
    out = tmp_path / "out"
    settings = FinderSettings(batch_size=8, smooth_window=9, abstain_threshold=None, found_threshold=0.5,
                              truth_suffix=".csv", progress_every_seconds=30)
    results = {Path(r["input"]).name: r for r in run_finder(inputs, out, load_predictor(run_dir), settings)}
    assert {n: r["status"] for n, r in results.items()} == {"three.mp4": "ok", "screenshot.png": "ok",
                                                             "fake.jpg": "failed"}
    with (out / "three_mp4" / "frames.csv").open() as f:
        rows = list(csv.DictReader(f))
    raw = np.array([[float(r[f"raw_{c}"]) for c in PLANES] for r in rows])
    smoothed = np.array([[float(r[f"prob_{c}"]) for c in PLANES] for r in rows])
    np.testing.assert_allclose(smoothed, np.tile(raw.mean(0), (3, 1)), atol=1e-5)  # window 9 > 3 frames: all
    scan = json.loads((out / "screenshot_png" / "scan.json").read_text())
    assert scan["n_frames"] == 1 and scan["fps"] is None and (out / "screenshot_png" / "timeline.png").is_file()

    # A second run into the same out_dir adds to the summary instead of replacing it.
    more = tmp_path / "more"
    more.mkdir()
    write_video(more / "later.mp4", rng.integers(0, 255, (12, 64, 64), dtype=np.uint8), fps=10)
    run_finder(more, out, load_predictor(run_dir), settings)
    summary = {Path(r["input"]).name: r["status"] for r in json.loads((out / SUMMARY_FILE).read_text())["results"]}
    assert summary == {"three.mp4": "ok", "screenshot.png": "ok", "fake.jpg": "failed", "later.mp4": "ok"}


def test_a_plane_is_found_only_when_its_best_score_reaches_the_threshold():
    p = np.array([[0.9, 0.001, 0.099], [0.8, 0.002, 0.198]], np.float32)
    found = {b.plane: b.found for b in best_frames(p, ["A", "B", "C"], found_threshold=0.5)}
    assert found == {"A": True, "B": False, "C": False}  # 0.001 is no plane
    settings = FinderSettings(batch_size=1, smooth_window=1, abstain_threshold=0.95, found_threshold=0.5,
                              truth_suffix=None, progress_every_seconds=30)
    assert settings.found_at == 0.95  # abstaining at 0.95 also withholds "found" below it


def test_smoothing_cuts_the_window_to_the_frames_that_exist():
    p = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_allclose(smooth(p, 3), [[1, 2], [2, 3], [4, 5], [5, 6]])
    np.testing.assert_allclose(smooth(p[:2], 7), [[1, 2], [1, 2]])
