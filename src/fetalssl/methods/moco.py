"""MoCo v2 (Chen, Fan, Girshick & He, 2020): momentum key encoder, queue of negatives, MLP head, Shuffle-BN."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fetalssl.losses import moco_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import EMATarget
from fetalssl.models.queue import EmbeddingQueue
from fetalssl.models.shuffle_bn import shuffle_bn_forward


class MoCo(SSLMethod):
    """Algorithm 1 of the paper::

        q = normalize(projector(backbone(view1)))   # queries, online encoder
        k = normalize(key_encoder(view2))           # momentum copy of (backbone, projector), no gradient, Shuffle-BN
        loss = InfoNCE(q, k, negatives=queue)
        after the optimiser step: key encoder <- EMA of the online one; enqueue k

    The queue (fetalssl.models.queue.EmbeddingQueue, ``queue_size`` x D) is checkpointed and gets every key of
    the global batch once, under gradient accumulation and DDP. Momentum follows ``cosine_tau`` from
    ``tau_base`` to ``tau_final`` (equal values: the paper's constant m). ``shuffle_bn``: keys by
    fetalssl.models.shuffle_bn, over ``shuffle_bn_groups`` BN groups of the global batch (shuffled across ranks
    under DDP).
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], temperature: float,
                 queue_size: int, tau_base: float, tau_final: float, shuffle_bn: bool, shuffle_bn_groups: int,
                 **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.key_encoder = EMATarget(nn.Sequential(self.backbone, self.projector), tau_base, tau_final)
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.shuffle_bn_groups = shuffle_bn_groups
        self.queue = EmbeddingQueue(queue_size, self.projector.out_dim)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        if self.shuffle_bn and self.training:
            return F.normalize(shuffle_bn_forward(self.key_encoder, x, self.shuffle_bn_groups), dim=1)
        return F.normalize(self.key_encoder(x), dim=1)

    def loss(self, batch: Batch) -> Tensor:
        q = self.projector(self.backbone(batch["view1"]))
        k = self.keys(batch["view2"])
        loss = moco_loss(q, k, self.queue.rows, temperature=self.temperature)
        if self.training:
            self.queue.add(k)
        return loss

    def after_optimizer_step(self, step: int) -> None:
        self.log("tau", self.key_encoder.update(step, self.total_steps))
        self.queue.flush(self.all_gather)
