"""MoCo v2 (Chen, Fan, Girshick & He, 2020): momentum key encoder, queue of negatives, MLP head, Shuffle-BN."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fetalssl.losses import moco_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import cosine_tau, ema_update, frozen_copy
from fetalssl.models.queue import enqueue_
from fetalssl.models.shuffle_bn import shuffle_bn_forward


class MoCo(SSLMethod):
    """Algorithm 1 of the paper::

        q = normalize(projector(backbone(view1)))            # queries, online encoder
        k = normalize(key_projector(key_backbone(view2)))    # keys, momentum encoder, no gradient, Shuffle-BN
        loss = InfoNCE(q, k, negatives=queue)
        after the optimiser step: key encoder <- EMA of the online one; enqueue k

    The queue (``queue_size`` x D) and its pointer are buffers, so they are checkpointed. Keys are kept for every
    micro-batch since the last optimiser step (gradient accumulation) and those of all ranks are enqueued, so
    every key of the global batch reaches the queue once. Momentum follows ``cosine_tau`` from ``tau_base`` to
    ``tau_final`` (equal values: the paper's constant m). ``shuffle_bn``: keys by fetalssl.models.shuffle_bn,
    over ``shuffle_bn_groups`` BN groups of the global batch (shuffled across ranks under DDP).
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], temperature: float,
                 queue_size: int, tau_base: float, tau_final: float, shuffle_bn: bool, shuffle_bn_groups: int,
                 **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.tau_base = tau_base
        self.tau_final = tau_final
        self.shuffle_bn = shuffle_bn
        self.shuffle_bn_groups = shuffle_bn_groups
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, self.projector.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[Tensor] = []

    def key_encoder(self, x: Tensor) -> Tensor:
        return self.key_projector(self.key_backbone(x))

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        if self.shuffle_bn and self.training:
            return F.normalize(shuffle_bn_forward(self.key_encoder, x, self.shuffle_bn_groups), dim=1)
        return F.normalize(self.key_encoder(x), dim=1)

    def loss(self, batch: Batch) -> Tensor:
        q = self.projector(self.backbone(batch["view1"]))
        k = self.keys(batch["view2"])
        loss = moco_loss(q, k, self.queue, temperature=self.temperature)
        if self.training:
            # Enqueued after the optimiser step: changing the queue in place now would corrupt the autograd graph.
            self._pending_keys.append(k)
        return loss

    def after_optimizer_step(self, step: int) -> None:
        tau = cosine_tau(step, self.total_steps, self.tau_base, self.tau_final)
        ema_update(self.key_backbone, self.backbone, tau)
        ema_update(self.key_projector, self.projector, tau)
        # Every rank enqueues the keys of the global batch, so the queue stays identical across ranks.
        keys = self.all_gather(torch.cat(self._pending_keys)).reshape(-1, self.queue.shape[1])
        enqueue_(self.queue, self.queue_ptr, keys)
        self._pending_keys.clear()
