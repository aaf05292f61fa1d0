"""Running Lightning from a composed config: the trainer, DDP inside Hydra sweeps, and resume points.

Library code (fine-tuning, pretraining and the console scripts all use it), so nothing needs to import cli/."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

SAFE_VALUE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_SUBDIR_LENGTH = 200  # file names are limited to 255 bytes


def sweep_subdir(task_overrides: list[str], exclude_keys: list[str]) -> str:
    """A sweep point's folder name that can be pasted back into a command (`model=<sweep>/<this>`).

    Hydra's own `key=value,key=value` cannot: `=`, `,`, quotes, brackets and `/` break the override parser or
    nest folders. Here each override becomes `key-value`, sorted, joined by `__`; a value with any other
    character than letters, digits and `._-` is replaced by `h` + 8 hex digits of its sha1 (the full overrides
    are in the point's .hydra/overrides.yaml). Keys in `exclude_keys` (output locations) are left out.
    """
    items = []
    for override in task_overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key in exclude_keys:
            continue
        if not SAFE_VALUE.match(value):
            value = "h" + hashlib.sha1(value.encode()).hexdigest()[:8]
        items.append(f"{key.replace('/', '.')}-{value}")
    name = "__".join(sorted(items)) or "default"
    if len(name) > MAX_SUBDIR_LENGTH:
        name = name[:MAX_SUBDIR_LENGTH - 10] + "__h" + hashlib.sha1(name.encode()).hexdigest()[:7]
    return name


# Registered at import, before composition. Slurm asks for GPUs only for GPU trainers (conf/launcher/slurm.yaml).
OmegaConf.register_new_resolver(
    "gpus_per_node", lambda accelerator, devices: devices if accelerator in ("gpu", "cuda") else 0, replace=True
)
OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)
# conf/data_budget: frames per video that keep patients x frames fixed when only `share` of the patients is used.
OmegaConf.register_new_resolver("frames_for_share", lambda frames, share: round(frames / share), replace=True)
# conf/augment/multicrop: the local crop size in the paper's proportion to the global one (96 of 224 px).
OmegaConf.register_new_resolver("scaled_size", lambda size, num, den: max(1, round(size * num / den)), replace=True)


# What Lightning's subprocess launcher sets in the launching process (lightning/fabric/strategies/launchers/
# subprocess_script.py); LOCAL_RANK there makes a later Trainer believe its ranks were started externally.
_DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def end_previous_sweep_point_ddp() -> None:
    """The basic launcher runs sweep points one after another in this process. After a DDP point its rank
    processes have exited, but its process group and launch variables remain: drop them so this point starts
    (and launches) its own ranks instead of waiting on the gone ones."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        for key in _DDP_LAUNCH_ENV:
            os.environ.pop(key, None)


def pin_multirun_job_for_ddp() -> None:
    """Make Lightning's per-rank re-launch run only this sweep job, in this job's directory.

    Lightning starts ranks > 0 as ``sys.argv + hydra.run.dir=<HydraConfig run.dir>`` (subprocess_script.py). In a
    multirun that would be the whole sweep (``-m`` and the sweep lists) with the unused run dir. So: argv becomes
    this job's own overrides (no -m) and run.dir this job's output dir. Single runs need nothing.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    end_previous_sweep_point_ddp()
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint on ``monitor`` that falls back to ``fallback_monitor`` (with a warning) when the run has
    no validation batches, e.g. pretraining on a single patient: a best checkpoint is still written instead of
    Lightning's repeated "could not find the monitored key"."""

    def __init__(self, fallback_monitor: str, **kwargs):
        super().__init__(**kwargs)
        self.fallback_monitor = fallback_monitor

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage == "fit" and datamodule is not None and not datamodule.val_dataloader():
            log.warning("no validation data (too few patients for a validation split?): the best checkpoint is "
                        "chosen by %s instead of %s", self.fallback_monitor, self.monitor)
            self.monitor = self.fallback_monitor
        super().setup(trainer, pl_module, stage)


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None,
                  grid: Mapping[str, Any] | None = None) -> L.Trainer:
    """The trainer of a composed config: its callbacks and loggers (every entry of ``cfg.logger``, e.g.
    logger=[csv,tensorboard]). Each logger receives the composed config and the run's ``grid`` keys as
    hyperparameters, so the runs of a sweep can be compared in the tracker."""
    pin_multirun_job_for_ddp()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks += extra_callbacks or []
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if loggers:
        hyperparameters = {"config": plain_config(cfg), "grid": dict(grid or {})}
        for logger in trainer.loggers:
            logger.log_hyperparams(hyperparameters)
    return trainer


def plain_config(cfg: DictConfig) -> dict:
    """The config as plain data, interpolations resolved; as written where one does not resolve (a config put
    together in code may refer to keys it lacks)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(cfg, resolve=False)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest resume point in a run dir: checkpoints/last.ckpt (periodic) or hpc_ckpt_<n>.ckpt, which
    Lightning's SLURM requeue handler writes into trainer.default_root_dir (= the run dir) when the signal comes."""
    candidates = [output_dir / "checkpoints" / "last.ckpt", *output_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime_ns) if existing else None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` or a run dir that already holds a checkpoint means resume from the newest one (see
    latest_checkpoint); a missing explicit path is an error."""
    if ckpt_path in (None, "last"):
        latest = latest_checkpoint(output_dir)
        if latest is not None:
            log.info("Resuming from %s", latest)
            return str(latest)
        if ckpt_path == "last":
            log.warning("ckpt_path=last but %s holds no checkpoint: starting from scratch", output_dir)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return str(ckpt_path)
