"""Fine-tuning: frozen/partial/full modes, cached-feature probe, init resolution and the run's files."""

import csv
import hashlib
import json
import os
import time
from functools import partial
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch.utils.data import DataLoader, TensorDataset

from conftest import data_groups, init_config
from fetalssl.data.splits import ManifestError
from fetalssl.finetune.classifier import PlaneClassifier
from fetalssl.finetune.features import CachedFeatureDataModule
from fetalssl.finetune.init import build_backbone, find_ssl_checkpoint
from fetalssl.finetune.metrics import metrics_from_predictions
from fetalssl.finetune.modes import last_stage_name, set_trainable
from fetalssl.finetune.run import run_finetune
from fetalssl.predict.model import load_run

CONF = Path(__file__).resolve().parents[1] / "src" / "fetalssl" / "conf"
CLASSES = ["4CH", "LVOT", "RVOT", "3VV", "3VT"]
SIZE = 32


def make_images(root: Path, n_patients: int = 6, per_class: int = 2) -> Path:
    """A labels.csv over small grey images whose brightness pattern depends on the class (learnable)."""
    rng = np.random.default_rng(0)
    lines = ["image_path,label,patient_id"]
    for p in range(n_patients):
        for c, label in enumerate(CLASSES):
            for k in range(per_class):
                rel = f"frames/{label}/p{p}_{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                image = rng.integers(0, 60, (40, 40)).astype(np.uint8)
                image[:, 8 * c:8 * c + 8] += 150
                cv2.imwrite(str(root / rel), image)
                lines.append(f"{rel},{label},p{p}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def finetune_cfg(source: Path, mode: str = "linear", **trainer):
    """The config run_finetune expects, from the package YAMLs with tiny-data settings."""
    cfg = OmegaConf.create({
        "seed": 0,
        **data_groups(),
        "data": OmegaConf.load(CONF / "data" / "labelled.yaml"),
        "backbone": {"_target_": "fetalssl.models.backbones.create_backbone", "name": "resnet18",
                     "in_chans": "${data.channels}", "pretrained_path": None, "zero_init_last": False, "trust_pickle": False},
        "init": init_config("random"),
        "finetune_mode": OmegaConf.load(CONF / "finetune_mode" / f"{mode}.yaml"),
        "feature_cache_dir": None,
        "calibration": {"n_bins": 10, "temperature_scaling": True},
        "saliency": {"images_per_kind": 2},
        "classifier": {"class_weighted": True, "warmup_fraction": 0.1,
                       "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01}},
        "monitor": "val/balanced_accuracy",
        "monitor_mode": "max",
        "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1, "max_epochs": 2,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    **trainer},
    })
    cfg.data.update(root=str(source), image_size=SIZE, num_workers=0, batch_size=16, val_fraction=0.2,
                    test_fraction=0.2, classes=CLASSES)
    return cfg


def tiny_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def random_batches(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % 5),
                      batch_size=8)


def classifier(trainable: str, backbone=None, **kwargs) -> PlaneClassifier:
    backbone = backbone or timm.create_model("resnet18", num_classes=0, pretrained=False)
    args = dict(num_features=getattr(backbone, "num_features", None), classes=CLASSES, trainable=trainable, head_lr=1e-2,
                backbone_lr=1e-2, optimizer=partial(torch.optim.AdamW, weight_decay=0.01), warmup_fraction=0.0, head_dropout=0.0, feature_norm=False,
                class_weights=None, init_weights=None)
    return PlaneClassifier(backbone, **{**args, **kwargs})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- modes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature_norm", [False, True])
def test_linear_mode_leaves_every_backbone_parameter_and_buffer_bit_identical(feature_norm):
    model = classifier("none", feature_norm=feature_norm)
    before, head_before = snapshot(model.backbone), snapshot(model.head)
    tiny_trainer(max_epochs=2).fit(model, random_batches(), random_batches(seed=1))
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, BN running stats, batch counters
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert not torch.equal(head_before["1.weight"], model.head[-1].weight)
    model.train()
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    assert model.head.training


def test_full_mode_trains_backbone_weights_and_batchnorm_statistics():
    model = classifier("all")
    before = snapshot(model.backbone)
    tiny_trainer(max_epochs=1).fit(model, random_batches())
    after = model.backbone.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_partial_mode_trains_only_the_last_stage():
    model = classifier("last_stage")
    before = snapshot(model.backbone)
    tiny_trainer(max_epochs=1).fit(model, random_batches())
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert "layer4.0.conv1.weight" in changed and "layer4.0.bn1.running_mean" in changed
    assert set(model.trained_backbone_parameters) == {n for n, _ in model.backbone.named_parameters()
                                                      if n.startswith("layer4.")}


def test_last_stage_found_generically_and_later_norms_trained():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=32, depth=2)
    assert last_stage_name(vit) == "blocks.1"
    trained = set_trainable(vit, "last_stage")
    assert trained[0].startswith("blocks.1.") and "norm.weight" in trained
    assert not any(n.startswith(("blocks.0.", "patch_embed.", "cls_token", "pos_embed")) for n in trained)


def test_head_dropout_only_for_full_mode():
    with pytest.raises(ValueError, match="only used with full"):
        classifier("none", head_dropout=0.5)
    assert classifier("all", head_dropout=0.5).dropout.p == 0.5


def test_lr_schedule_warms_up_then_decays_per_step():
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = classifier("all", backbone=tiny, num_features=4, head_lr=1e-2, backbone_lr=1e-3, warmup_fraction=0.25)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    tiny_trainer(max_epochs=4, callbacks=[Record()]).fit(model, random_batches())  # 8 steps
    head, backbone = np.array(lrs)[:, 0], np.array(lrs)[:, -1]
    assert np.allclose(head[:2], [0.5e-2, 1e-2])  # 2 warm-up steps
    assert np.all(np.diff(head[2:]) < 0) and head[-1] < 0.1e-2  # cosine from the peak towards 0
    assert np.allclose(backbone / head, 0.1)


# ---- cached features ------------------------------------------------------------------------------------
def test_cached_features_give_the_same_head_update_as_the_image_loop(tmp_path):
    cfg = finetune_cfg(make_images(tmp_path))
    assert cfg.finetune_mode.cache_features is False  # default off
    from hydra.utils import instantiate

    images = instantiate(cfg.data, train_transform=instantiate(cfg.data.eval_transform), batch_size=1000)
    images.setup()
    backbone, _ = build_backbone(cfg.backbone, cfg.init)
    loop = classifier("none", backbone=backbone)
    cached = classifier("none", backbone=torch.nn.Identity(), num_features=backbone.num_features)
    cached.head.load_state_dict(loop.head.state_dict())
    features = CachedFeatureDataModule.from_images(backbone, images, torch.device("cpu"))
    assert len(features.features["train"][0]) == len(images.rows("train"))
    initial = loop.head[-1].weight.detach().clone()
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(loop, images.train_dataloader())
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(cached, features.train_dataloader())
    # Adam's first step moves every weight by ~lr (1e-2); the two paths agree 1000x more closely than that. The
    # features differ only by float rounding between two backbone passes (seen once at 1e-6).
    assert (loop.head[-1].weight - initial).abs().max() > 1e-3
    torch.testing.assert_close(cached.head[-1].weight, loop.head[-1].weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.head[-1].bias, loop.head[-1].bias, atol=1e-5, rtol=1e-4)


# ---- whole run ------------------------------------------------------------------------------------------
def _read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("cache_features", [False, True])
def test_run_writes_files_and_metrics_match_sklearn(tmp_path, cache_features):
    cfg = finetune_cfg(make_images(tmp_path / "data"))
    cfg.data.fraction = 0.5
    cfg.finetune_mode.cache_features = cache_features
    out = tmp_path / "run"
    result = run_finetune(cfg, out)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "ok" and saved == json.loads(json.dumps(result))
    assert saved["grid"] == {"init": "random", "method": None, "fraction": 0.5, "finetune_mode": "linear",
                             "seed": 0, "backbone": "resnet18", "fold": None, "folds": None, "scan": "keep",
                             "scan_detector": instantiate(cfg.data.scan).detector_key(), "normalization": "0.5/0.25",
                             "pad_to_square": False}
    rows = _read_predictions(out / "predictions.csv")
    assert list(rows[0]) == ["image_path", "patient_id", "video", "label", "pred", *(f"prob_{c}" for c in CLASSES)]
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-4 and row["pred"] == CLASSES[int(np.argmax(probs))]
    y_true, y_pred = [r["label"] for r in rows], [r["pred"] for r in rows]
    test = saved["test"]
    assert test["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-6)
    assert test["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)), abs=1e-6)
    per_class = f1_score(y_true, y_pred, average=None, labels=CLASSES)
    assert [test["per_class_f1"][c] for c in CLASSES] == pytest.approx(list(per_class), abs=1e-6)
    # what was logged during trainer.test equals what the saved predictions give
    for name in ("macro_f1", "balanced_accuracy", "accuracy"):
        assert saved["logged_test"][f"test/{name}"] == pytest.approx(test[name], abs=1e-6)
    val_rows = _read_predictions(out / "val_predictions.csv")
    assert saved["val"]["macro_f1"] == pytest.approx(
        f1_score([r["label"] for r in val_rows], [r["pred"] for r in val_rows], average="macro"), abs=1e-6)

    # training set = requested fraction of every class (half-up, >= 1), as written to train_subset.csv
    subset = _read_predictions(out / "train_subset.csv")
    assert len(subset) == saved["train_size"] == sum(saved["train_class_counts"].values())
    test_patients = {r["image_path"].split("/")[-1].split("_")[0] for r in rows}
    assert all(r["patient_id"] == r["image_path"].split("/")[-1].split("_")[0] for r in rows)
    val_patients = {r["image_path"].split("/")[-1].split("_")[0] for r in val_rows}
    n_train_per_class = 2 * (6 - len(test_patients) - len(val_patients))
    assert saved["train_class_counts"] == {c: max(1, int(np.floor(0.5 * n_train_per_class + 0.5)))
                                           for c in CLASSES}
    matrix = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 6))
    assert matrix.sum() == len(rows) and np.trace(matrix) == sum(t == p for t, p in zip(y_true, y_pred, strict=True))
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert (out / "checkpoints" / "best.ckpt").is_file()
    # calibration of the test predictions as written, the temperature fitted on the val predictions
    from fetalssl.finetune.calibration import expected_calibration_error, fit_temperature

    def probs_and_targets(file_rows):
        probs = torch.tensor([[float(r[f"prob_{c}"]) for c in CLASSES] for r in file_rows], dtype=torch.float64)
        return probs, torch.tensor([CLASSES.index(r["label"]) for r in file_rows])

    calibration = saved["calibration"]
    assert calibration["ece"] == pytest.approx(expected_calibration_error(*probs_and_targets(rows), 10), abs=1e-5)
    assert calibration["temperature"] == pytest.approx(fit_temperature(*probs_and_targets(val_rows)), rel=1e-3)
    assert sum(b["count"] for b in calibration["bins"]) == len(rows)
    assert (out / "reliability.png").stat().st_size > 0
    # Grad-CAM of the first correct and wrong test images, as predictions.csv has them
    shown = saved["saliency"]
    by_path = {r["image_path"]: r for r in rows}
    correct = [r for r in rows if r["label"] == r["pred"]]
    wrong = [r for r in rows if r["label"] != r["pred"]]
    assert [s["image_path"] for s in shown] == [r["image_path"] for r in correct[:2] + wrong[:2]]
    assert all(s["pred"] == by_path[s["image_path"]]["pred"] and s["correct"] == (s["label"] == s["pred"])
               for s in shown)
    assert (out / "saliency.png").stat().st_size > 0
    if cache_features:  # the frozen init's test features, in predictions.csv's order, for the report's maps
        with np.load(out / "test_embeddings.npz") as embeddings:
            assert embeddings["features"].shape == (len(rows), 512)
            assert list(embeddings["labels"]) == y_true
            assert list(embeddings["patients"]) == [r["patient_id"] for r in rows]
    else:
        assert not (out / "test_embeddings.npz").exists()


def test_cached_linear_probe_run_learns_the_toy_task(tmp_path):
    cfg = finetune_cfg(make_images(tmp_path / "data", n_patients=5), max_epochs=20)
    cfg.finetune_mode.update(head_lr=3e-2, cache_features=True)
    result = run_finetune(cfg, tmp_path / "run")
    assert result["test"]["balanced_accuracy"] > 0.8  # chance is 0.2: labels, images and predictions line up


@pytest.mark.slow
def test_full_mode_run_learns_the_toy_task(tmp_path):
    cfg = finetune_cfg(make_images(tmp_path / "data", n_patients=5), mode="full", max_epochs=4)
    cfg.finetune_mode.update(head_lr=1e-3, backbone_lr=1e-3)
    cfg.data.batch_size = 8
    result = run_finetune(cfg, tmp_path / "run")
    assert result["test"]["balanced_accuracy"] > 0.8


def test_failed_run_writes_failed_metrics_and_raises(tmp_path):
    source = make_images(tmp_path / "data")
    (source.parent / "frames" / "4CH" / "p0_0.png").unlink()
    with pytest.raises(ManifestError, match="row 2"):
        run_finetune(finetune_cfg(source), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "failed" and "p0_0.png does not exist" in saved["error"]
    assert saved["grid"]["finetune_mode"] == "linear" and len(saved["config_key"]) == 64


def test_metrics_from_predictions_match_sklearn_with_absent_predictions(tmp_path):
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 5, 40)
    y_pred = np.where(rng.random(40) < 0.6, y_true, rng.integers(0, 3, 40))  # classes 3, 4 rarely predicted
    path = tmp_path / "p.csv"
    path.write_text("image_path,label,pred\n" + "".join(f"x{i},{CLASSES[t]},{CLASSES[p]}\n"
                                                        for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True))))
    summary, matrix = metrics_from_predictions(path, CLASSES)
    assert summary["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert summary["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-6)
    assert matrix[2, 1] == np.sum((y_true == 2) & (y_pred == 1))


# ---- init -----------------------------------------------------------------------------------------------
def _pretrain_run(root: Path, method: str, with_hydra: bool = True) -> Path:
    root.mkdir(parents=True)
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)
    torch.save(model.state_dict(), root / "backbone.pt")
    if with_hydra:
        (root / ".hydra").mkdir()
        (root / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"method": method, "backbone": "resnet18"}}}}))
    return root / "backbone.pt"


def test_ssl_checkpoint_found_by_method(tmp_path):
    barlow = _pretrain_run(tmp_path / "pretrain" / "x" / "run1", "barlowtwins")
    simclr = _pretrain_run(tmp_path / "pretrain" / "simclr" / "run2", "simclr", with_hydra=False)
    assert find_ssl_checkpoint(tmp_path, "barlowtwins", "error") == barlow
    assert find_ssl_checkpoint(tmp_path, "simclr", "error") == simclr
    with pytest.raises(FileNotFoundError, match="no backbone.pt of method 'byol'"):
        find_ssl_checkpoint(tmp_path, "byol", "error")
    newer = _pretrain_run(tmp_path / "pretrain" / "x" / "run3", "barlowtwins")
    os.utime(barlow, (time.time() - 100, time.time() - 100))
    with pytest.raises(ValueError, match="2 runs of method 'barlowtwins'"):
        find_ssl_checkpoint(tmp_path, "barlowtwins", "error")
    assert find_ssl_checkpoint(tmp_path, "barlowtwins", "latest") == newer


def test_ssl_init_loads_the_pretrained_weights(tmp_path):
    path = _pretrain_run(tmp_path / "pretrain" / "barlowtwins" / "r", "barlowtwins")
    state = torch.load(path)
    backbone_cfg = OmegaConf.create({"_target_": "fetalssl.models.backbones.create_backbone", "name": "resnet18",
                                     "in_chans": 3, "pretrained_path": None, "zero_init_last": False, "trust_pickle": False})
    init = init_config("ssl")
    init.update(ssl_dir=str(tmp_path), method="barlowtwins")
    backbone, record = build_backbone(backbone_cfg, init)
    loaded = backbone.state_dict()
    assert record == {"init": "ssl", "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    init.update(ssl_dir=None, method=None)
    with pytest.raises(ValueError, match="needs init.checkpoint"):
        build_backbone(backbone_cfg, init)
    imagenet = init_config("imagenet")
    imagenet.pretrained_path = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        build_backbone(backbone_cfg, imagenet)


def test_random_init_keeps_last_bn_weight_at_one():
    backbone_cfg = OmegaConf.create({"_target_": "fetalssl.models.backbones.create_backbone", "name": "resnet18",
                                     "in_chans": 1, "pretrained_path": None, "zero_init_last": True, "trust_pickle": False})
    backbone, record = build_backbone(backbone_cfg, init_config("random"))
    assert record is None
    assert torch.all(backbone.layer1[0].bn2.weight == 1)  # init/random.yaml overrides the backbone's choice


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 50, 100])
def test_data_fraction_configs(percent):
    text = (CONF / "data_fraction" / f"pct{percent}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert OmegaConf.create(text).data.fraction == pytest.approx(percent / 100)


def test_feature_cache_on_disk_is_reused_and_keyed_by_weights_and_images(tmp_path, monkeypatch, caplog):
    """Second build with the same backbone and images reads the disk cache (no backbone pass) and gets
    identical features; other weights or a rewritten image give a new entry, never stale features."""
    from hydra.utils import instantiate

    from fetalssl.finetune import features as feature_module

    labels_csv = make_images(tmp_path / "data")
    dm = instantiate(finetune_cfg(labels_csv).data, output_dir=None)
    backbone = timm.create_model("resnet18", num_classes=0, pretrained=False)
    cache = tmp_path / "cache"
    first = CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"), cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 3  # train, val, test

    passes = []
    real_extract = feature_module.extract_features
    monkeypatch.setattr(feature_module, "extract_features", lambda *a: passes.append(1) or real_extract(*a))
    again = CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"), cache_dir=cache)
    assert passes == []
    for split in first.features:
        assert torch.equal(again.features[split][0], first.features[split][0])
        assert torch.equal(again.features[split][1], first.features[split][1])

    with torch.no_grad():
        backbone.conv1.weight.mul_(2)
    CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"), cache_dir=cache)
    assert len(passes) == 3 and len(list(cache.glob("*.pt"))) == 6

    test_image = dm.rows("test")[0].path
    image = cv2.imread(str(test_image), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(test_image), 255 - image)
    os.utime(test_image, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime changes even on coarse clocks
    changed = CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"), cache_dir=cache)
    assert len(passes) == 4  # only the test split is embedded again
    assert not torch.equal(changed.features["test"][0][0], again.features["test"][0][0])

    for path in cache.glob("*.pt"):
        path.write_bytes(b"not a torch file")
    with caplog.at_level("WARNING"):
        CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"), cache_dir=cache)
    assert len(passes) == 7 and "Cannot read cached features" in caplog.text


def test_caching_features_leaves_the_global_rng_untouched(tmp_path):
    """The head's initialisation and batch order must not depend on whether features were cached."""
    from hydra.utils import instantiate

    from fetalssl.finetune.features import CachedFeatureDataModule

    images = make_images(tmp_path / "data")
    dm = instantiate(finetune_cfg(images).data, output_dir=None)
    backbone = timm.create_model("resnet18", num_classes=0, pretrained=False)
    torch.manual_seed(0)
    CachedFeatureDataModule.from_images(backbone, dm, torch.device("cpu"))
    after_caching = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_caching, torch.rand(3))


def test_run_records_its_init_weights_and_predict_uses_exactly_that_file(tmp_path):
    weights = _pretrain_run(tmp_path / "pretrain" / "barlowtwins" / "r", "barlowtwins")
    cfg = finetune_cfg(make_images(tmp_path / "data"))
    cfg.finetune_mode.cache_features = True  # head-only checkpoint: predict must rebuild the backbone
    cfg.init = init_config("ssl")
    cfg.init.update(ssl_dir=str(tmp_path / "pretrain"), method="barlowtwins")
    out = tmp_path / "run"
    result = run_finetune(cfg, out)
    record = {"init": "ssl", "path": str(weights.resolve()), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert json.loads((out / "metrics.json").read_text())["init_weights"] == record
    assert torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["init_weights"] == record
    (out / ".hydra").mkdir()
    # A newer run of the same method appears under ssl_dir: a new ssl_dir search would pick it, predict must not.
    newer = _pretrain_run(tmp_path / "pretrain" / "barlowtwins" / "s", "barlowtwins")
    cfg.init.on_multiple = "latest"
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    model, _ = load_run(out)
    expected = torch.load(weights, weights_only=True)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(torch.load(newer, weights_only=True)["conv1.weight"], expected["conv1.weight"])
    x = torch.randn(3, 3, SIZE, SIZE)
    assert model(x).shape == (3, 5) and result["status"] == "ok"

    changed = {k: v + 1 if v.is_floating_point() else v for k, v in expected.items()}
    torch.save(changed, weights)
    now = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"changed since the run.*{record['sha256']}.*{now}"):
        load_run(out)


def _full_run(tmp_path, name, seed, num_workers):
    cfg = finetune_cfg(tmp_path / "data" / "labels.csv", "full")
    cfg.seed = seed
    cfg.data.update(num_workers=num_workers, seed="${seed}", fraction_seed="${seed}")
    result = run_finetune(cfg, tmp_path / name)
    weights = torch.load(tmp_path / name / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    return result, weights


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_same_command_same_weights_and_metrics_with_any_worker_count_and_another_seed_differs(tmp_path):
    make_images(tmp_path / "data")
    # Full fine-tuning with the YAML's training augmentation (random crop, affine, brightness): every source.
    runs = {(seed, workers): _full_run(tmp_path, f"s{seed}w{workers}", seed, workers)
            for seed, workers in [(0, 0), (0, 2), (1, 0)]}
    ref, ref_w = _full_run(tmp_path, "again", 0, 0)
    for key in [(0, 0), (0, 2)]:
        result, weights = runs[key]
        assert result["logged_test"] == ref["logged_test"], key
        assert result["val"] == ref["val"] and result["test"] == ref["test"], key
        assert all(torch.equal(weights[k], ref_w[k]) for k in ref_w), key
    other, other_w = runs[(1, 0)]
    assert any(not torch.equal(other_w[k], ref_w[k]) for k in ref_w if ref_w[k].is_floating_point())


def test_training_augmentation_is_seeded_per_image_and_epoch(tmp_path):
    dm = instantiate(finetune_cfg(make_images(tmp_path / "data")).data, output_dir=None)
    dm.setup()
    train = dm.dataset("train", augment=True)
    assert torch.equal(train[(3, 1)][0], train[(3, 1)][0])  # same image, same epoch: same augmentation
    assert not torch.equal(train[(3, 1)][0], train[(3, 2)][0])  # a new epoch draws a new one
    sampler = dm.loader("train", train=True).sampler
    first, second = list(sampler), list(sampler)  # Lightning iterates the one train loader once per epoch
    assert [e for _, e in first] == [0] * len(first) and [e for _, e in second] == [1] * len(second)
    assert sorted(i for i, _ in first) == list(range(len(train))) and first != second


def test_class_weights_scale_each_images_gradient_by_n_over_n_c():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    model = classifier("none", class_weights=weights)
    logits = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 1, 4, 2, 0])
    model._loss(logits, y).backward()
    expected = weights[y, None] * (logits.softmax(1) - F.one_hot(y, 5)) / weights[y].sum()
    torch.testing.assert_close(logits.grad, expected.detach())


def _imbalanced(root: Path) -> Path:
    labels = make_images(root, per_class=3)
    lines = labels.read_text().splitlines()
    keep = [lines[0]] + [r for r in lines[1:] if r.split(",")[1] in ("4CH", "LVOT") or r.split("_")[-1][0] == "0"]
    labels.write_text("\n".join(keep) + "\n")
    return labels


@pytest.mark.parametrize("weighted", [True, False])
def test_class_weights_n_over_n_c_of_the_training_subset_reach_the_model(tmp_path, weighted):
    cfg = finetune_cfg(_imbalanced(tmp_path / "data"))
    cfg.classifier.class_weighted = weighted
    result = run_finetune(cfg, tmp_path / "run")
    counts = torch.tensor([result["train_class_counts"][c] for c in CLASSES], dtype=torch.float32)
    assert len(set(counts.tolist())) > 1  # imbalanced, so weighting matters
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    if weighted:
        torch.testing.assert_close(state["class_weights"], counts.sum() / counts)
    else:
        assert "class_weights" not in state


@pytest.mark.parametrize("monitor_mode", ["max", "min"])
def test_selection_tests_the_checkpoint_of_the_best_val_epoch(tmp_path, monitor_mode):
    cfg = finetune_cfg(make_images(tmp_path / "data"), "linear", max_epochs=5)
    cfg.finetune_mode.cache_features = True
    cfg.monitor, cfg.monitor_mode = "val/loss", monitor_mode  # val/loss moves every epoch (no ties)
    cfg.logger = {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path / "run"),
                          "name": "logs", "version": ""}}
    run_finetune(cfg, tmp_path / "run")
    rows = [r for r in csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()) if r.get("val/loss")]
    per_epoch = {int(r["epoch"]): float(r["val/loss"]) for r in rows}
    assert len(per_epoch) == 5 and len(set(per_epoch.values())) == 5
    pick = max if monitor_mode == "max" else min
    best_epoch = pick(per_epoch, key=per_epoch.get)
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == best_epoch


def test_a_linear_probe_checkpoint_holds_the_head_only_and_is_tested_with_its_init_backbone(tmp_path):
    weights = _pretrain_run(tmp_path / "pretrain" / "barlowtwins" / "r", "barlowtwins")
    cfg = finetune_cfg(make_images(tmp_path / "data"))  # linear, looped (not cached): the backbone is in the model
    cfg.init = init_config("ssl")
    cfg.init.checkpoint = str(weights)
    result = run_finetune(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").stat().st_size < weights.stat().st_size / 20
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    model, meta = load_run(tmp_path / "run")  # rebuilt from the recorded file: predicts as the run tested
    probs = _read_predictions(tmp_path / "run" / "predictions.csv")
    images = instantiate(cfg.data, output_dir=None)
    images.setup()
    x, _ = images.dataset("test")[0]
    with torch.no_grad():
        p = model(x[None])[0].numpy()
    np.testing.assert_allclose(p, [float(probs[0][f"prob_{c}"]) for c in meta.classes], atol=1e-5)
    assert result["status"] == "ok" and meta.classes == result["classes"] == CLASSES
