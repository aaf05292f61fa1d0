"""SimSiam (Chen & He, 2021): a predictor and a stop-gradient, no negatives, no momentum encoder."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import simsiam_loss
from fetalssl.methods.base import Batch, SSLMethod


class SimSiam(SSLMethod):
    """Algorithm 1 of the paper::

        z1, z2 = projector(backbone(view1)), projector(backbone(view2))
        p1, p2 = predictor(z1), predictor(z2)
        loss = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2      # D: negative cosine similarity
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module],
                 predictor: Callable[..., nn.Module], stop_gradient: bool, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.predictor = predictor(in_dim=self.projector.out_dim)
        self.stop_gradient = stop_gradient

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (simsiam_loss(p1, z2, self.stop_gradient) + simsiam_loss(p2, z1, self.stop_gradient)) / 2
