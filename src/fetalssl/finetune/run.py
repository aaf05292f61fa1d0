"""One fine-tuning run: data, backbone init, mode, training with model selection, test, and the run's files.

Config keys read (see conf/finetune.yaml): seed, data (conf/data/labelled.yaml), backbone (conf/backbone),
init (conf/init), finetune_mode (conf/finetune_mode), feature_cache_dir, classifier {class_weighted,
optimizer, warmup_fraction}, monitor, monitor_mode, trainer, and optionally callbacks / logger (as for pretraining).

Files written to `output_dir`: train_subset.csv, checkpoints/best.ckpt (weights of the best `monitor` epoch),
predictions.csv (test) and val_predictions.csv, confusion_matrix.{csv,png} (test), metrics.json (with a
"test_video" section, frame probabilities averaged per video, when the labels CSV has a `video` column).
metrics.json is written with status "failed" and the error when anything raises, then the error propagates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fetalssl.data.downstream import DownstreamDataModule
from fetalssl.evaluation import weighted_knn_probs
from fetalssl.finetune import hog
from fetalssl.finetune.calibration import calibration_report, plot_reliability
from fetalssl.finetune.classifier import PlaneClassifier
from fetalssl.finetune.features import CachedFeatureDataModule, cached_extract_features, weights_digest
from fetalssl.finetune.init import (
    build_backbone,
    input_overrides,
    open_clip_model,
    pretraining_normalization,
    recorded_method,
    resolve_init_weights,
)
from fetalssl.finetune.metrics import (
    metrics_from_predictions,
    video_labels,
    video_metrics_from_predictions,
    write_confusion_matrix,
    write_predictions,
)
from fetalssl.finetune.pretrain_sweep import grid_keys as pretraining_grid_keys
from fetalssl.finetune.pretrain_sweep import pretraining_record
from fetalssl.finetune.saliency import write_saliency
from fetalssl.io import atomic_write, save_json
from fetalssl.models.open_clip_tower import (
    ImageTower,
    class_text_embeddings,
    read_prompts,
    tokenizer_for,
    zeroshot_probs,
)
from fetalssl.runtime import build_trainer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTION_FILES = {"test": "predictions.csv", "val": "val_predictions.csv"}
# Where a run's outputs go and which trackers see them; left out of config_key so reruns share a key.
RUN_LOCATION_KEYS = ("paths", "hydra", "logger")


INIT_FILE_KEYS = ("checkpoint", "config", "pretrained_path")


def _resolved_or_none(node: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(node, key, throw_on_missing=False)
    except OmegaConfBaseException:  # an interpolation into a config without that key: nothing to resolve
        return None


def config_key(cfg: DictConfig) -> str:
    """sha256 of the config as written (interpolations unresolved), output locations left out, plus the init's
    weight and model files resolved: they may come from paths.* (paths.fetalclip), so other files give another
    key."""
    container = OmegaConf.to_container(cfg, resolve=False)
    for key in RUN_LOCATION_KEYS:
        container.pop(key, None)
    container["init_files"] = {key: _resolved_or_none(cfg.init, key) for key in INIT_FILE_KEYS}
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()


def init_method(init_cfg: DictConfig) -> str | None:
    """Pretraining method behind an ssl init (from the config or the checkpoint's run); for open_clip / timm_file
    init.label, else the model config's file name / the architecture ("open_clip:FetalCLIP" in the report); None
    for the other baselines."""
    if init_cfg.name == "open_clip":
        return init_cfg.label or Path(init_cfg.config).stem
    if init_cfg.name == "timm_file":
        return init_cfg.label or init_cfg.architecture
    if init_cfg.name != "ssl":
        return None
    if init_cfg.get("method"):
        return init_cfg.method
    if init_cfg.get("pretrain_run") or init_cfg.get("checkpoint"):
        return recorded_method(resolve_init_weights(init_cfg).parent)
    return None


def pretraining_of(init_cfg: DictConfig) -> dict[str, Any] | None:
    """The pretraining run's record when the init is a run of a pretraining sweep (init.pretrain_run)."""
    if init_cfg.name != "ssl" or not init_cfg.get("pretrain_run"):
        return None
    return pretraining_record(resolve_init_weights(init_cfg).parent)


def normalization_label(mean, std) -> str:
    """"measured", "0.5/0.25", or per channel "0.4,0.4,0.4/0.2,0.2,0.2"."""
    if mean is None:
        return "measured"
    if isinstance(mean, int | float):
        return f"{mean:g}/{std:g}"
    return ",".join(f"{m:g}" for m in mean) + "/" + ",".join(f"{v:g}" for v in std)


def backbone_name(cfg: DictConfig) -> str:
    """The architecture a run fine-tunes: conf/backbone's, or the one its init brings."""
    if cfg.init.name == "open_clip":
        return f"open_clip:{Path(cfg.init.config).stem}"
    return cfg.init.architecture if cfg.init.name == "timm_file" else cfg.backbone.name


def grid_point(cfg: DictConfig) -> dict[str, Any]:
    """The run's place in a sweep; `fold` (cross-validation round, None without folds) is averaged over like the
    seed; every other setting a sweep may vary is a key too, so that the report never merges two runs that
    differ: the scan options (`scan`, `scan_detector`), the normalisation, the number of folds, the k-NN vote
    (in the mode's name), and for a run of a pretraining sweep that run's `pretrain.<key>` settings."""
    pretraining = pretraining_of(cfg.init)
    scan = instantiate(cfg.data.scan)
    mode = cfg.finetune_mode
    dictated = input_overrides(cfg.init)
    return {"init": cfg.init.name, "method": init_method(cfg.init), "fraction": float(cfg.data.fraction),
            "finetune_mode": f"knn(k={mode.k},T={mode.temperature:g})" if mode.name == "knn" else mode.name,
            "seed": int(cfg.seed), "backbone": backbone_name(cfg),
            "fold": None if cfg.data.folds is None else int(cfg.data.fold), "folds": cfg.data.folds,
            "scan": scan.label, "scan_detector": scan.detector_key(),
            "normalization": "init" if dictated else normalization_label(cfg.data.mean, cfg.data.std),
            "pad_to_square": bool(dictated.get("pad_to_square", cfg.data.pad_to_square)),
            **(pretraining_grid_keys(pretraining) if pretraining else {})}


def _predict(trainer: L.Trainer, model: PlaneClassifier, loader, ckpt_path: str) -> torch.Tensor:
    return torch.cat(trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path)).float().cpu()


NORMALIZATION_FILE = "normalization.json"
RELIABILITY_FILE = "reliability.png"
EMBEDDINGS_FILE = "test_embeddings.npz"  # frozen-backbone runs: the init's features of the test images  # the mean/std a run used (read by fetalssl-predict and -export)


def labelled_images(cfg: DictConfig, output_dir: Path) -> DownstreamDataModule:
    """The run's labelled data, set up. With normalization=measured (data.mean null) and an SSL init from a
    fetalssl-train run, the values that run normalised with are used, so the backbone sees the statistics it was
    pretrained on; other inits measure their training images. A fixed normalisation that differs from the SSL
    run's is used as asked, with a warning. An OpenCLIP init dictates its input size, RGB mean/std and padding
    (finetune.init.input_overrides). What was used goes to normalization.json."""
    overrides, source = {}, None
    dictated = input_overrides(cfg.init)
    if dictated:
        changed = {k: (cfg.data[k], v) for k, v in dictated.items() if cfg.data[k] != v}
        log.info("init=%s dictates the input: %s", cfg.init.name, dictated)
        cfg = OmegaConf.merge(cfg, {"data": dictated})  # before instantiating: the transforms' sizes follow
        if changed:
            log.info("data config values replaced (was, now): %s", changed)
        source = f"init {cfg.init.name} ({cfg.init.config})"
    pretrained = pretraining_normalization(resolve_init_weights(cfg.init)) if cfg.init.name == "ssl" else None
    if cfg.data.mean is None and pretrained is not None:
        overrides, source = {"mean": pretrained[0], "std": pretrained[1]}, f"pretraining run ({pretrained[2]})"
    elif pretrained is not None and (cfg.data.mean, cfg.data.std) != pretrained[:2]:
        log.warning("init weights were pretrained on inputs normalised with mean %s, std %s (%s), but this run "
                    "normalises with %s, %s; normalization=measured uses the pretraining's", *pretrained,
                    cfg.data.mean, cfg.data.std)
    images = instantiate(cfg.data, output_dir=output_dir, **overrides)
    images.setup("fit")
    save_json({"mean": images.mean, "std": images.std, "source": source or images.normalization_source,
               "image_size": images.image_size, "channels": images.channels, "pad_to_square": images.pad_to_square},
              output_dir / NORMALIZATION_FILE)
    return images


def _train_and_evaluate(cfg: DictConfig, output_dir: Path, grid: dict[str, Any]) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    images = labelled_images(cfg, output_dir)
    backbone, init_weights = build_backbone(cfg.backbone, cfg.init)
    mode = cfg.finetune_mode
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor=cfg.monitor,
                                 mode=cfg.monitor_mode, save_top_k=1, save_weights_only=True)
    trainer = build_trainer(cfg, extra_callbacks=[checkpoint], grid=grid)
    if trainer.world_size > 1:
        raise ValueError("fine-tuning runs on one device (predictions.csv needs every image once, in order); "
                         f"got world_size={trainer.world_size}")

    data: L.LightningDataModule = images
    num_features = backbone.num_features
    image_backbone = backbone  # what Grad-CAM runs through, also when the training loop sees cached features
    if mode.cache_features:
        if mode.trainable != "none":
            raise ValueError(f"finetune_mode.cache_features needs a frozen backbone, not trainable={mode.trainable}")
        data = CachedFeatureDataModule.from_images(backbone, images, trainer.strategy.root_device,
                                                   cache_dir=cfg.feature_cache_dir)
        save_test_embeddings(images, data.features["test"][0], output_dir)
        backbone = nn.Identity()
    model = PlaneClassifier(
        backbone=backbone, num_features=num_features, classes=images.classes, trainable=mode.trainable,
        head_lr=mode.head_lr, backbone_lr=mode.backbone_lr, optimizer=instantiate(cfg.classifier.optimizer),
        warmup_fraction=cfg.classifier.warmup_fraction, head_dropout=mode.head_dropout, feature_norm=mode.feature_norm,
        class_weights=images.class_weights() if cfg.classifier.class_weighted else None, init_weights=init_weights)

    trainer.fit(model, datamodule=data)
    best = checkpoint.best_model_path
    log.info("best %s %.4f (%s)", cfg.monitor, checkpoint.best_model_score, Path(best).name)
    logged_test = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)[0]
    probs = {split: _predict(trainer, model, data.loader(split), best) for split in PREDICTION_FILES}
    result = _write_outputs(images, probs, output_dir, cfg.calibration)
    if cfg.saliency.images_per_kind:
        result["saliency"] = write_saliency(images, image_backbone, model.head, probs["test"],
                                            cfg.saliency.images_per_kind, output_dir)
    result["logged_test"] = {k: float(v) for k, v in logged_test.items()}
    result["best_checkpoint"] = best
    result["init_weights"] = init_weights
    result["pretrain"] = pretraining_of(cfg.init)
    return result


def save_test_embeddings(images: DownstreamDataModule, features: torch.Tensor, output_dir: Path) -> None:
    """The frozen init's features of the test images, in predictions.csv's order, with class and patient: what
    fetalssl-report --embeddings draws."""
    dataset = images.dataset("test")
    atomic_write(output_dir / EMBEDDINGS_FILE, lambda f: np.savez_compressed(
        f, features=features.float().numpy(), labels=np.asarray([images.classes[i] for i in dataset.labels]),
        patients=np.asarray([row.patient_id for row in dataset.rows])))


def _write_outputs(images: DownstreamDataModule, probs: dict[str, torch.Tensor], output_dir: Path,
                   calibration: DictConfig) -> dict[str, Any]:
    """predictions / confusion / reliability files and the metrics.json sections, from class probabilities per
    split."""
    result: dict[str, Any] = {}
    labels_csv = images.labels_csv()
    video_of = video_labels(labels_csv) if labels_csv is not None else None
    for split, filename in PREDICTION_FILES.items():
        dataset = images.dataset(split)
        write_predictions(output_dir / filename, dataset.rows, torch.from_numpy(dataset.labels), probs[split],
                          images.classes, video_of)
        result[split], matrix = metrics_from_predictions(output_dir / filename, images.classes)
        if split == "test":
            write_confusion_matrix(matrix, images.classes, output_dir / "confusion_matrix.csv",
                                   output_dir / "confusion_matrix.png")
    if video_of is not None:
        result["test_video"] = video_metrics_from_predictions(output_dir / PREDICTION_FILES["test"], video_of,
                                                              images.classes)
    targets = {split: torch.from_numpy(images.dataset(split).labels).long() for split in ("val", "test")}
    result["calibration"] = calibration_report((probs["val"], targets["val"]), (probs["test"], targets["test"]),
                                               calibration.n_bins, calibration.temperature_scaling)
    plot_reliability(result["calibration"], output_dir / RELIABILITY_FILE)
    result["classes"] = list(images.classes)
    result["normalization"] = {"mean": images.mean, "std": images.std}
    result["input"] = {"image_size": images.image_size, "channels": images.channels,
                       "pad_to_square": images.pad_to_square}
    result["scan"] = images.scan.record()
    result["train_size"] = len(images.rows("train"))
    result["train_class_counts"] = dict(zip(images.classes, images.class_counts().tolist(), strict=True))
    return result


def _knn_evaluate(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """finetune_mode=knn: weighted k-NN on the frozen backbone's cached features; nothing is trained."""
    L.seed_everything(cfg.seed, workers=True)  # a random init's weights
    images = labelled_images(cfg, output_dir)
    backbone, init_weights = build_backbone(cfg.backbone, cfg.init)
    features = CachedFeatureDataModule.from_images(backbone, images, torch.device("cpu"),
                                                   cache_dir=cfg.feature_cache_dir).features
    save_test_embeddings(images, features["test"][0], output_dir)
    train_x, train_y = features["train"]
    probs = {split: weighted_knn_probs(train_x, train_y, features[split][0], cfg.finetune_mode.k,
                                       cfg.finetune_mode.temperature, len(images.classes))
             for split in PREDICTION_FILES}
    return {**_write_outputs(images, probs, output_dir, cfg.calibration), "init_weights": init_weights,
            "pretrain": pretraining_of(cfg.init)}


def _zeroshot_evaluate(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """finetune_mode=zeroshot: an OpenCLIP model's image embeddings against its text embeddings of each class's
    prompts (init.prompts); no label of the training split is used."""
    if cfg.init.name != "open_clip":
        raise ValueError(f"finetune_mode=zeroshot needs init=open_clip (a text tower), not init={cfg.init.name}")
    if cfg.init.prompts is None:
        raise ValueError("finetune_mode=zeroshot needs init.prompts=<JSON mapping each class to its prompts>")
    images = labelled_images(cfg, output_dir)
    given = cfg.init.prompts
    prompts = read_prompts(given if isinstance(given, str) else OmegaConf.to_container(given), images.classes,
                           source=given if isinstance(given, str) else "init.prompts")
    clip, init_weights = open_clip_model(cfg.init)
    tower = ImageTower(clip)
    cache = None if cfg.feature_cache_dir is None else Path(cfg.feature_cache_dir)
    weights = weights_digest(tower) if cache is not None else None
    classes = class_text_embeddings(clip, tokenizer_for(cfg.init.config), prompts)
    scale = clip.logit_scale.exp().detach()
    probs = {}
    for split in PREDICTION_FILES:  # the training split is never embedded: zero-shot has no use for it
        features, _ = cached_extract_features(tower, images.loader(split), torch.device("cpu"), cache, weights)
        probs[split] = zeroshot_probs(features, classes, scale)
    return {**_write_outputs(images, probs, output_dir, cfg.calibration), "init_weights": init_weights, "prompts": prompts,
            "train_size": 0, "train_class_counts": dict.fromkeys(images.classes, 0)}


def _hog_baseline(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """init=hog: logistic regression on HOG features through the same data, files and metrics."""
    images, probs = hog.fit_and_predict(cfg, output_dir)
    return {**_write_outputs(images, probs, output_dir, cfg.calibration), "features": "hog"}


def run_finetune(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train, select on `cfg.monitor`, test, and write the run's files; returns the metrics.json content."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"status": "failed", "grid": {"fraction": cfg.data.fraction, "seed": cfg.seed},
                              "config_key": config_key(cfg)}
    try:
        result["grid"] = grid_point(cfg)  # reads init files: an error here is a failed run like any other
        if cfg.init.name == "hog":
            result.update(_hog_baseline(cfg, output_dir))
        elif cfg.finetune_mode.name == "knn":
            result.update(_knn_evaluate(cfg, output_dir))
        elif cfg.finetune_mode.name == "zeroshot":
            result.update(_zeroshot_evaluate(cfg, output_dir))
        else:  # the one that trains with Lightning, and so logs to the trackers
            result.update(_train_and_evaluate(cfg, output_dir, result["grid"]))
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        save_json(result, output_dir / METRICS_FILE)
        raise
    result["status"] = "ok"
    save_json(result, output_dir / METRICS_FILE)
    log.info("test macro-F1 %.3f, balanced accuracy %.3f, accuracy %.3f",
             *(result["test"][k] for k in ("macro_f1", "balanced_accuracy", "accuracy")))
    return result


def finished(output_dir: Path, cfg: DictConfig) -> bool:
    """A run counts as finished when its metrics.json says ok for exactly this config (see config_key)."""
    try:
        previous = json.loads((Path(output_dir) / METRICS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return previous.get("status") == "ok" and previous.get("config_key") == config_key(cfg)


def run_unless_finished(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """run_finetune, or None (logged) when output_dir already holds this config's successful run: what lets an
    interrupted sweep resume."""
    if finished(Path(output_dir), cfg):
        log.info("Skipping %s: completed with this config already", output_dir)
        return None
    return run_finetune(cfg, output_dir)
