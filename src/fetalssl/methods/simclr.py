"""SimCLR (Chen et al., 2020)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import nt_xent_loss
from fetalssl.methods.base import Batch, SSLMethod


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], temperature: float,
                 gather: bool, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.temperature = temperature
        self.gather = gather

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        return nt_xent_loss(z1, z2, temperature=self.temperature, gather=self.gather)
