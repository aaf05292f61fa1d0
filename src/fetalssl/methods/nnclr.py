"""NNCLR (Dwibedi et al., 2021): the positive of each view is its nearest neighbour in a support set of past
embeddings, contrasted against the predictions of the other view."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from fetalssl.losses import nearest_neighbours, nnclr_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.queue import EmbeddingQueue


class NNCLR(SSLMethod):
    """Section 3 of the paper::

        z1, z2 = projector(backbone(view1)), projector(backbone(view2))
        p1, p2 = predictor(z1), predictor(z2)
        nn1, nn2 = NN(z1, support), NN(z2, support)          # no gradient
        loss = (InfoNCE(nn1, p2) + InfoNCE(nn2, p1)) / 2
        after the optimiser step: enqueue normalize(z1) of the global batch into the support set

    The support set (fetalssl.models.queue.EmbeddingQueue, ``support_size`` x D) is checkpointed and, as MoCo's
    queue, gets the embeddings of every micro-batch (gradient accumulation) of every rank.
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module],
                 predictor: Callable[..., nn.Module], temperature: float, support_size: int, gather: bool,
                 **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.predictor = predictor(in_dim=self.projector.out_dim)
        self.temperature = temperature
        self.gather = gather
        self.support = EmbeddingQueue(support_size, self.projector.out_dim)

    def loss(self, batch: Batch) -> Tensor:
        z1 = self.projector(self.backbone(batch["view1"]))
        z2 = self.projector(self.backbone(batch["view2"]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        nn1, nn2 = nearest_neighbours(z1, self.support.rows), nearest_neighbours(z2, self.support.rows)
        if self.training:  # enqueued after the optimiser step, never from validation
            self.support.add(F.normalize(z1, dim=1))
        return (nnclr_loss(nn1, p2, self.temperature, self.gather)
                + nnclr_loss(nn2, p1, self.temperature, self.gather)) / 2

    def after_optimizer_step(self, step: int) -> None:
        self.support.flush(self.all_gather)
