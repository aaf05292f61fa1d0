"""VICReg (Bardes, Ponce & LeCun, 2022)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import vicreg_loss
from fetalssl.methods.base import Batch, SSLMethod


class VICReg(SSLMethod):
    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], sim_coeff: float,
                 std_coeff: float, cov_coeff: float, gather: bool, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)  # the paper's "expander"
        self.coeffs = dict(sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff)
        self.gather = gather

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        return vicreg_loss(z1, z2, **self.coeffs, gather=self.gather)
