"""normalization=measured: pretraining measures its training videos, fine-tuning takes the SSL run's values or
measures its own training images, and what was used reaches normalization.json, metrics.json and the plane finder;
the grid records the scan options and the fold."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import data_groups, scan_options
from fetalssl.data.cache import intensity_stats
from fetalssl.data.pretrain import TRAINING_DATA_FILE
from fetalssl.finetune.run import NORMALIZATION_FILE, grid_point, labelled_images
from fetalssl.predict.model import meta_from_run_config
from test_downstream import CLASSES, make_images
from test_finetune import finetune_cfg
from test_pretrain_data import make_dm, video_root  # noqa: F401  (video_root is a fixture)


def test_pretraining_measures_the_training_videos_only_and_records_it(video_root, tmp_path):  # noqa: F811
    dm = make_dm(video_root, tmp_path, mean=None, std=None, output_dir=tmp_path / "run")
    train = dm.train_set.videos
    train_patients = {v.patient_id for v in train}
    assert train_patients and {v.patient_id for v in dm.val_set.videos}.isdisjoint(train_patients)
    # the live image of the training videos' cached frames (scan=keep: the whole frame is live here)
    pixels = np.concatenate([np.asarray(v.frames()[v.cache_index(0):]).ravel() for v in train]) / 255.0
    assert (dm.mean, dm.std) == pytest.approx(intensity_stats(train))
    assert dm.mean == pytest.approx(pixels.mean(), abs=0.02) and dm.std == pytest.approx(pixels.std(), abs=0.02)
    everything = intensity_stats([*train, *dm.val_set.videos])
    assert everything != pytest.approx((dm.mean, dm.std), abs=1e-4)  # the val patients would change it
    shipped = torch.full((1, 1, 2, 2), 128, dtype=torch.uint8)  # the views are normalised with them (on the device)
    expected = torch.full((1, dm.channels, 2, 2), (128 / 255 - dm.mean) / dm.std)
    torch.testing.assert_close(dm.on_after_batch_transfer({"view1": shipped}, 0)["view1"], expected)
    record = json.loads((tmp_path / "run" / TRAINING_DATA_FILE).read_text())
    assert record["normalization"]["mean"] == dm.mean and "training videos" in record["normalization"]["source"]


def measured_cfg(source, **init):
    cfg = finetune_cfg(source)
    cfg.update(data_groups(normalization="measured"))
    cfg.init.update(init)
    return cfg


def test_finetuning_measures_its_training_subset_and_predict_reads_what_it_used(tmp_path):
    value = {f"p{p}": 40 + 15 * p for p in range(10)}  # each patient one grey level: the mean names the images
    source = make_images(tmp_path, 10, 2, value_of=lambda p, label: value[f"p{p}"])
    cfg = measured_cfg(source)
    cfg.data.fraction = 0.5
    images = labelled_images(cfg, tmp_path / "run")
    train = images.rows("train")
    expected = np.mean([value[r.patient_id] for r in train]) / 255
    assert images.mean == pytest.approx(expected) and images.std > 0
    cfg.data.fraction = 1.0
    whole = labelled_images(cfg, tmp_path / "whole")  # the same split, every training image
    assert len(whole.rows("train")) > len(train)
    assert whole.mean == pytest.approx(np.mean([value[r.patient_id] for r in whole.rows("train")]) / 255)
    assert whole.mean != pytest.approx(images.mean)  # the subset alone was measured
    written = json.loads((tmp_path / "run" / NORMALIZATION_FILE).read_text())
    assert written["mean"] == pytest.approx(expected) and "training images" in written["source"]
    meta = meta_from_run_config(cfg, CLASSES, tmp_path / "run")
    assert (meta.mean, meta.std) == (written["mean"], written["std"])
    assert meta.scan == {k: v for k, v in scan_options("keep").record().items()}


def test_an_ssl_init_brings_its_pretraining_normalisation(tmp_path):
    source = make_images(tmp_path, 10, 2)
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), pretrain / "backbone.pt")
    (pretrain / TRAINING_DATA_FILE).write_text(json.dumps({"normalization": {"mean": 0.123, "std": 0.0456}}))
    cfg = measured_cfg(source, name="ssl", checkpoint=str(pretrain / "backbone.pt"))
    images = labelled_images(cfg, tmp_path / "run")
    assert (images.mean, images.std) == (0.123, 0.0456)
    assert str(pretrain) in json.loads((tmp_path / "run" / NORMALIZATION_FILE).read_text())["source"]
    fixed = finetune_cfg(source)  # normalization=fixed: the YAML's values, whatever the init
    assert (labelled_images(fixed, tmp_path / "fixed").mean, fixed.data.std) == (0.5, 0.25)


def test_grid_names_the_scan_options_and_the_fold(tmp_path):
    cfg = finetune_cfg(tmp_path)
    assert grid_point(cfg)["scan"] == "keep" and grid_point(cfg)["fold"] is None
    cfg.update(data_groups(scan="sector"))
    cfg.data.folds, cfg.data.fold = 5, 3
    point = grid_point(cfg)
    assert point["fold"] == 3
    assert point["scan"] == "crop+zero_outside+inpaint_overlays+skip_doppler+skip_split"
    cfg.scan.overlays = "zero"  # a changed option is a different grid point, never a silent duplicate
    assert grid_point(cfg)["scan"] == "crop+zero_outside+zero_overlays+skip_doppler+skip_split"
    detector = grid_point(cfg)["scan_detector"]
    cfg.scan.detector.motion_threshold = 5.0  # so is a changed detector threshold
    assert grid_point(cfg)["scan_detector"] != detector
    assert grid_point(cfg)["normalization"] == "0.5/0.25"
    assert OmegaConf.select(cfg, "data.scan.overlays") == "zero"
