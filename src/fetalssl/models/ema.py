"""Exponential moving average of a network (BYOL target, MoCo key encoder)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL schedule: tau rises from tau_base (step 0) to tau_final (last step) along a half cosine."""
    progress = min(step / max(total_steps, 1), 1.0)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, 1 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that receives no gradient (updated only via ema_update)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class EMATarget(nn.Module):
    """The target half of an online/target pair (BYOL's target, MoCo's key encoder, DINO's teacher): a frozen copy
    of ``online`` that only moves by ``update``, after optimiser steps, as an EMA with tau on ``cosine_tau``.

    ``online`` is held unregistered: its parameters belong to the method (and its optimiser), not to this part.
    """

    def __init__(self, online: nn.Module, tau_base: float, tau_final: float):
        super().__init__()
        self.network = frozen_copy(online)
        self._online = (online,)
        self.tau_base = tau_base
        self.tau_final = tau_final

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def update(self, step: int, total_steps: int) -> float:
        """EMA step for optimiser step ``step`` (0-based) of ``total_steps``; returns the tau used."""
        tau = cosine_tau(step, total_steps, self.tau_base, self.tau_final)
        ema_update(self.network, self._online[0], tau)
        return tau
