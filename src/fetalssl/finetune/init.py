"""Backbone initialisation for fine-tuning: random, ImageNet (local file), a self-supervised checkpoint, any
timm weight file, or the image tower of an OpenCLIP model.

conf/init/<name>.yaml picks one; the architecture comes from conf/backbone (cfg.backbone) except for open_clip:
- random:    no weights; `zero_init_last` from the init config.
- imagenet:  timm weights from the local file `pretrained_path` (nothing is downloaded).
- ssl:       `checkpoint` (a backbone.pt state dict or a Lightning .ckpt of a pretraining method), the run of
             `method` found under `ssl_dir` by `find_ssl_checkpoint`, or run `pretrain_run` of the pretraining
             sweep `pretrain_sweep` (finetune/pretrain_sweep.py).
- timm_file: timm model `architecture` with the weights of `checkpoint` (keys under `key_prefix`), strict unless
             `strict` is false; the key report goes into the provenance record.
- open_clip: the image tower of the OpenCLIP model `config` with weights `checkpoint`
             (models/open_clip_tower.py); it also dictates the input size and normalisation (`input_overrides`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from fetalssl.data.pretrain import TRAINING_DATA_FILE
from fetalssl.io import file_sha256
from fetalssl.models.backbones import load_backbone_weights
from fetalssl.models.open_clip_tower import ImageTower, input_spec, load_clip

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"
INIT_CHOICES = ("random", "imagenet", "ssl", "timm_file", "open_clip")


def recorded_method(run_dir: Path) -> str | None:
    """The method a pretraining run was launched with: Hydra's record of the chosen config-group option."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    record = yaml.safe_load(hydra_yaml.read_text()) or {}
    choices = ((record.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return choices.get("method")


def pretraining_normalization(weights: Path) -> tuple[float, float, str] | None:
    """(mean, std, where it was read) of the inputs the pretraining run behind `weights` (its backbone.pt, or a
    checkpoint in its checkpoints/) trained on: its pretraining_data.json, else the data.mean/std of its
    .hydra/config.yaml (runs from before that record); None when `weights` is not from a fetalssl-train run."""
    run_dir = weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent
    record = run_dir / TRAINING_DATA_FILE
    if record.is_file():
        used = json.loads(record.read_text()).get("normalization") or {}
        if used.get("mean") is not None:
            return float(used["mean"]), float(used["std"]), str(record)
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
        if isinstance(data.get("mean"), int | float) and isinstance(data.get("std"), int | float):
            return float(data["mean"]), float(data["std"]), str(config)
    return None


def find_ssl_checkpoint(ssl_dir: str | Path, method: str, on_multiple: str) -> Path:
    """The backbone.pt of the pretraining run of `method` under `ssl_dir`.

    Rule: every `backbone.pt` below `ssl_dir` is a candidate; its run is the folder holding it. The run
    belongs to `method` if its `.hydra/hydra.yaml` records `method=<method>` (hydra.runtime.choices.method,
    what `fetalssl-train method=...` writes) or, for runs without a .hydra folder, if a folder between
    `ssl_dir` and the file is named `<method>` (e.g. <ssl_dir>/pretrain/<method>/<run_id>/backbone.pt).
    Exactly one match is used; several are an error unless `on_multiple: latest` (newest file wins).
    """
    ssl_dir = Path(ssl_dir)
    if not ssl_dir.is_dir():
        raise FileNotFoundError(f"init.ssl_dir={ssl_dir} is not a directory")
    if on_multiple not in ("error", "latest"):
        raise ValueError(f"init.on_multiple={on_multiple!r}: must be 'error' or 'latest'")
    found: dict[Path, str | None] = {}
    for path in sorted(ssl_dir.rglob(BACKBONE_FILE)):
        recorded = recorded_method(path.parent)
        found[path] = recorded if recorded is not None else (
            method if method in path.relative_to(ssl_dir).parts[:-1] else None)
    matches = [p for p, m in found.items() if m == method]
    if not matches:
        listing = "\n  ".join(f"{p} (method {m})" for p, m in found.items()) or "none"
        raise FileNotFoundError(f"no {BACKBONE_FILE} of method {method!r} under {ssl_dir}; found:\n  {listing}")
    if len(matches) > 1:
        if on_multiple == "error":
            raise ValueError(f"{len(matches)} runs of method {method!r} under {ssl_dir}: "
                             + ", ".join(map(str, matches))
                             + "; set init.checkpoint, narrow init.ssl_dir or set init.on_multiple=latest")
        matches.sort(key=lambda p: p.stat().st_mtime)
    log.info("init=ssl method=%s: using %s", method, matches[-1])
    return matches[-1]


def resolve_init_weights(init_cfg: DictConfig) -> Path | None:
    """Path of the weight file the init config asks for (None for random), checked to exist."""
    name = init_cfg.name
    if name == "random":
        return None
    if name in ("timm_file", "open_clip"):
        path = Path(init_cfg.checkpoint)
    elif name == "imagenet":
        path = Path(init_cfg.pretrained_path)
    elif name == "ssl":
        if init_cfg.pretrain_run is not None:
            if init_cfg.pretrain_sweep is None:
                raise ValueError(f"init.pretrain_run={init_cfg.pretrain_run} needs init.pretrain_sweep")
            path = Path(init_cfg.pretrain_sweep) / init_cfg.pretrain_run / BACKBONE_FILE
        elif init_cfg.pretrain_sweep is not None:
            raise ValueError(f"init.pretrain_sweep={init_cfg.pretrain_sweep}: run fetalssl-finetune with it, which "
                             "sweeps init.pretrain_run over its runs (or set init.pretrain_run=<run> yourself)")
        elif init_cfg.checkpoint is not None:
            path = Path(init_cfg.checkpoint)
        elif init_cfg.ssl_dir is not None and init_cfg.method is not None:
            path = find_ssl_checkpoint(init_cfg.ssl_dir, init_cfg.method, init_cfg.on_multiple)
        else:
            raise ValueError("init=ssl needs init.checkpoint, or init.ssl_dir together with init.method")
    else:
        raise ValueError(f"init.name={name!r}: must be one of {INIT_CHOICES}")
    if not path.is_file():
        raise FileNotFoundError(f"init={name}: weight file {path} does not exist")
    return path


def open_clip_model(init_cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """init=open_clip: the whole OpenCLIP model (both towers) and its provenance record (weights and config)."""
    weights = resolve_init_weights(init_cfg)
    config = Path(init_cfg.config)
    clip = load_clip(config, weights, init_cfg.trust_pickle)
    return clip, {"init": init_cfg.name, "path": str(weights.resolve()), "sha256": file_sha256(weights),
                  "config": str(config.resolve()), "config_sha256": file_sha256(config)}


def input_overrides(init_cfg: DictConfig) -> dict[str, Any]:
    """data.* values an init dictates: an OpenCLIP tower's input size, RGB mean/std and padding; none otherwise."""
    if init_cfg.name != "open_clip":
        return {}
    spec = input_spec(init_cfg.config)
    return {"image_size": spec.image_size, "channels": 3, "mean": list(spec.mean), "std": list(spec.std),
            "pad_to_square": bool(init_cfg.pad_to_square)}


def build_backbone(backbone_cfg: DictConfig, init_cfg: DictConfig) -> tuple[nn.Module, dict[str, Any] | None]:
    """Instantiate cfg.backbone (fetalssl.models.backbones.create_backbone) with the init's weights, or the
    OpenCLIP image tower for init=open_clip.

    Returns the backbone and its provenance: ``{"init", "path", "sha256"}`` of the weight file exactly as read
    (None for random init; timm_file adds its key report, open_clip its model config), what metrics.json and
    the fine-tuned checkpoint record."""
    if init_cfg.name == "open_clip":
        clip, record = open_clip_model(init_cfg)
        return ImageTower(clip), record
    weights = resolve_init_weights(init_cfg)
    record = None if weights is None else {"init": init_cfg.name, "path": str(weights.resolve()),
                                           "sha256": file_sha256(weights)}
    if init_cfg.name == "timm_file":
        backbone = instantiate(backbone_cfg, name=init_cfg.architecture, pretrained_path=None)
        keys = load_backbone_weights(backbone, weights, init_cfg.trust_pickle, strict=init_cfg.strict,
                                     key_prefix=init_cfg.key_prefix)
        return backbone, {**record, "architecture": init_cfg.architecture, "keys": asdict(keys)}
    overrides = {"pretrained_path": None if weights is None else str(weights)}
    if init_cfg.name == "random":
        overrides["zero_init_last"] = init_cfg.zero_init_last
    return instantiate(backbone_cfg, **overrides), record


def backbone_from_record(backbone_cfg: DictConfig, record: dict[str, str], source: str | Path) -> nn.Module:
    """The backbone a run started from, read from exactly the file its provenance names; refused if the file
    changed since (so a head is never paired with other weights than those it was trained on)."""
    if record["init"] == "timm_file":
        raise ValueError(f"{source}: a head-only checkpoint on an init=timm_file backbone cannot be rebuilt yet; "
                         "fine-tune with finetune_mode=full or partial, whose checkpoint holds the backbone")
    path = Path(record["path"])
    if not path.is_file():
        raise FileNotFoundError(f"{source}: the init weights it was trained on, {path}, are gone")
    found = file_sha256(path)
    if found != record["sha256"]:
        raise ValueError(f"{source}: init weights {path} changed since the run (sha256 recorded "
                         f"{record['sha256']}, now {found}); restore that file or re-run the fine-tuning")
    return instantiate(backbone_cfg, pretrained_path=str(path))
