"""Optimiser parts shared by all methods: LARS, weight-decay parameter groups, LR scaling and schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

REFERENCE_BATCH_SIZE = 256  # linear scaling rule: lr = base_lr * global_batch / 256 (Goyal et al. 2017)


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters a submodule exempts through ``no_weight_decay()`` (timm's convention: ViT
    ``pos_embed`` / ``cls_token``, ConvNeXt / Swin tables...), names given relative to that submodule."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        exempt = getattr(sub, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{name}" if prefix else name for name in exempt()}
    return names


def parameter_groups(modules: Iterable[nn.Module]) -> list[dict]:
    """Split trainable parameters: biases and norm weights (ndim <= 1) and whatever the model names in
    ``no_weight_decay()`` (timm, e.g. ViT position embedding and class token) get no weight decay and no LARS
    adaptation, as in SimCLR/BYOL/Barlow Twins and timm. Frozen (EMA target) parameters are left out."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in modules:
        exempt = no_weight_decay_names(module)
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 or name in exempt else decay).append(p)
    return [
        {"params": decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def scaled_lr(base_lr: float, batch_size: int, world_size: int, accumulate: int) -> float:
    """Linear scaling by the global (effective) batch size."""
    return base_lr * batch_size * world_size * accumulate / REFERENCE_BATCH_SIZE


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up reaching 1 at ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with SGD momentum, as in the Barlow Twins/BYOL code.

    Parameter groups with ``lars_exclude=True`` (biases, norms) skip both weight decay and the trust ratio.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        weight_decay: float,
        eta: float,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss
