"""Barlow Twins (Zbontar et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import barlow_twins_loss
from fetalssl.methods.base import Batch, SSLMethod


class BarlowTwins(SSLMethod):
    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], lambd: float, gather: bool,
                 **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.lambd = lambd
        self.gather = gather

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        return barlow_twins_loss(z1, z2, lambd=self.lambd, gather=self.gather)
