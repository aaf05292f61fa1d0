"""BYOL (Grill et al., 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fetalssl.losses import byol_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import cosine_tau, ema_update, frozen_copy


class BYOL(SSLMethod):
    """Online = backbone -> projector -> predictor; target = EMA of backbone -> projector.

    tau goes from ``tau_base`` to ``tau_final`` on a cosine schedule over the optimiser steps. The target is
    updated only after optimiser steps (never during validation).
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module],
                 predictor: Callable[..., nn.Module], tau_base: float, tau_final: float, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.predictor = predictor(in_dim=self.projector.out_dim)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.tau_base = tau_base
        self.tau_final = tau_final

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(x))

    def online(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    def loss(self, batch: Batch) -> Tensor:
        x1, x2 = batch["view1"], batch["view2"]
        # Symmetrised: each view's prediction regresses the other view's target projection.
        return byol_loss(self.online(x1), self.target(x2)) + byol_loss(self.online(x2), self.target(x1))

    def after_optimizer_step(self, step: int) -> None:
        tau = cosine_tau(step, self.total_steps, self.tau_base, self.tau_final)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
        self.log("tau", tau)
