"""MoCo v2 (Chen, Fan, Girshick & He, 2020): momentum key encoder, queue of negatives, MLP head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fetalssl.losses import moco_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import cosine_tau, ema_update, frozen_copy


class MoCo(SSLMethod):
    """Queries from view1 by the online encoder, keys from view2 by its momentum copy (asymmetric, as in the
    paper's Algorithm 1). The queue (``queue_size`` x D) and its pointer are buffers, so they are checkpointed.

    Momentum follows ``cosine_tau`` from ``tau_base`` to ``tau_final``; tau_base == tau_final gives the
    paper's constant m. Shuffle-BN is not implemented (as in solo-learn); single-device BN leakage is small.
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module], temperature: float,
                 queue_size: int, tau_base: float, tau_final: float, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.projector = projector(in_dim=backbone.num_features)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.tau_base = tau_base
        self.tau_final = tau_final
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, self.projector.out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: Tensor | None = None

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    def loss(self, batch: Batch) -> Tensor:
        q = self.projector(self.backbone(batch["view1"]))
        k = self.keys(batch["view2"])
        loss = moco_loss(q, k, self.queue, temperature=self.temperature)
        if self.training:
            # Enqueued after backward: changing the queue in place now would corrupt the autograd graph.
            self._new_keys = k
        return loss

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        keys = keys[-len(self.queue):]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))

    def after_optimizer_step(self, step: int) -> None:
        tau = cosine_tau(step, self.total_steps, self.tau_base, self.tau_final)
        ema_update(self.key_backbone, self.backbone, tau)
        ema_update(self.key_projector, self.projector, tau)
        # Every rank enqueues the keys of the global batch, so the queue stays identical across ranks.
        keys = self.all_gather(self._new_keys).reshape(-1, self.queue.shape[1])
        self.enqueue(keys)
        self._new_keys = None
