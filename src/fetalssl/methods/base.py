"""Thin base for SSL methods: holds the backbone, builds the optimiser with the scaled LR and per-step
warm-up + cosine schedule, and logs train/loss, val/loss and lr. Subclasses implement ``loss(batch)``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fetalssl.models.optim import parameter_groups, scaled_lr, warmup_cosine

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
# Safety rule, not a knob: a warm-up may take at most this share of the run (short test / smoke runs).
MAX_WARMUP_SHARE = 0.5


class SSLMethod(L.LightningModule):
    """``optimizer`` is a partial (e.g. LARS or SGD with momentum/weight_decay set) completed with parameter
    groups and the scaled lr; ``base_lr`` is per 256 images; ``batch_size`` is the per-device batch size."""

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: Callable[..., Optimizer],
        base_lr: float,
        batch_size: int,
        warmup_epochs: float,
    ):
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.base_lr = base_lr
        self.batch_size = batch_size
        self.warmup_epochs = warmup_epochs
        self.total_steps: int | None = None  # set in configure_optimizers (needed by EMA schedules)

    def loss(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        n = batch["view1"].shape[0]
        # Mean over ranks: with equal per-rank batches this is the loss of the global batch.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step(step=self.global_step)

    def after_optimizer_step(self, step: int) -> None:
        """Updates that belong to optimiser step ``step`` (0-based): EMA targets, queues. Done here, not in
        on_train_batch_end, because Lightning saves step checkpoints in the callbacks' on_train_batch_end, which
        runs before the module's: state updated later would be missing from that checkpoint on resume."""

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["view1"].shape[0])
        return loss

    def epochs_to_steps(self, epochs: float) -> int:
        """Optimiser steps in ``epochs`` epochs of this run's train loader (warm-ups given in epochs)."""
        if epochs == 0:
            return 0
        if self.trainer.train_dataloader is None:
            # estimated_stepping_batches skips loading the data when only max_steps is set
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        if math.isinf(batches):
            raise ValueError("a warm-up in epochs needs a train loader with a length; set it to 0")
        steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches)
        return round(epochs * steps_per_epoch)

    def configure_optimizers(self):
        trainer = self.trainer
        lr = scaled_lr(self.base_lr, self.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
        optimizer = self.optimizer_factory(parameter_groups([self]), lr=lr)
        total = trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError("the LR/EMA schedules need a finite run: set trainer.max_epochs or trainer.max_steps")
        self.total_steps = int(total)
        warmup = self.epochs_to_steps(self.warmup_epochs)
        if warmup > MAX_WARMUP_SHARE * self.total_steps:
            clamped = int(MAX_WARMUP_SHARE * self.total_steps)
            log.warning("warm-up of %d steps is longer than %d%% of this %d-step run: the LR would barely reach "
                        "its peak; warming up over %d steps instead (set method.warmup_epochs to change it)",
                        warmup, 100 * MAX_WARMUP_SHARE, self.total_steps, clamped)
            warmup = clamped
        log.info("lr %.4g (base %.4g), %d warm-up of %d total steps", lr, self.base_lr, warmup, self.total_steps)
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
