"""fetalssl-train: self-supervised pretraining of a backbone on scan-video frame pairs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from fetalssl.cli.sweep import log_sweep_point
from fetalssl.io import save_torch
from fetalssl.progress import configure_console
from fetalssl.runtime import build_trainer, resolve_ckpt_path

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> Path:
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, pair_sampler=instantiate(cfg.pairs), views=instantiate(cfg.augment),
                             output_dir=output_dir)
    backbone = instantiate(cfg.backbone)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    model = instantiate(cfg.method, backbone=backbone)
    if cfg.compile:
        model.backbone.compile()
    probe_cfg = cfg.get("probe")
    extra = [instantiate(probe_cfg)] if probe_cfg and "_target_" in probe_cfg else []
    trainer = build_trainer(cfg, extra_callbacks=extra, grid=sweep_point())
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
    backbone_path = output_dir / "backbone.pt"
    if trainer.is_global_zero:
        # Plain timm state dict: timm.create_model(<same name>, num_classes=0).load_state_dict(..., strict=True).
        state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
        save_torch(state, backbone_path)
        log.info("Backbone written to %s", backbone_path)
    return backbone_path


def sweep_point() -> dict[str, str]:
    """The command line's overrides (key -> value) of this run: what tells it apart from the other runs of a sweep.
    Keys lose Hydra's +/~/++ prefixes (trackers such as MLflow accept only letters, digits and ._-/ in names)."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return {re.sub(r"[^\w./-]", "_", key.lstrip("+~")): value
            for key, value in (o.split("=", 1) for o in overrides if "=" in o)}


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    configure_console(cfg.verbose)
    log_sweep_point()
    backbone = train(cfg)
    log.info("run folder %s", backbone.parent)


if __name__ == "__main__":
    main()
