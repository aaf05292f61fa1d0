"""Two views, one encoder, one criterion: Barlow Twins, VICReg and SimCLR are this shape with their own loss
(conf/method/<name>.yaml names the loss and its coefficients)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.methods.base import Batch, SSLMethod


class TwoViewMethod(SSLMethod):
    """::

        z1, z2 = projector(backbone(view1)), projector(backbone(view2))
        loss = criterion(z1, z2)        # barlow_twins_loss | vicreg_loss | nt_xent_loss, with the paper's values

    ``criterion`` is a partial of a loss in fetalssl.losses with every coefficient set by the config.
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module],
                 criterion: Callable[[Tensor, Tensor], Tensor], **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.criterion = criterion

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        return self.criterion(z1, z2)
