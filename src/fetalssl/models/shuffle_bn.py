"""Shuffle-BN (He et al. 2020, MoCo section 3.3): compute the keys with BatchNorm over a random regrouping of
the batch, so a query and its key never share BN statistics and the model cannot use them to find its positive.

Across ranks (DDP): gather the global batch, permute it with one permutation drawn on rank 0, encode each rank's
slice, undo the permutation (the official MoCo code). On one device: the same with the batch split into
groups, each normalised on its own (what that many GPUs would do; lightly's ``batch_shuffle`` and MoCo's
SplitBatchNorm). ``groups`` is the number of BN groups over the whole global batch: 8 on 8 GPUs is the paper's
setting (one group per GPU), and the same config on one device gives 8 groups of its batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _gather(x: Tensor) -> Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's slice of the randomly permuted global batch, and the permutation (global indices)."""
    gathered = _gather(x)
    perm = torch.randperm(len(gathered), device=x.device)
    dist.broadcast(perm, src=0)
    rank = dist.get_rank()
    return gathered[perm.view(dist.get_world_size(), -1)[rank]], perm


@torch.no_grad()
def batch_unshuffle_ddp(x: Tensor, perm: Tensor) -> Tensor:
    """Inverse of batch_shuffle_ddp for the encoded slice: this rank's own samples, in their original order."""
    gathered = _gather(x)
    restored = torch.empty_like(gathered)
    restored[perm] = gathered
    return restored.view(dist.get_world_size(), -1, *x.shape[1:])[dist.get_rank()]


@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, x: Tensor, groups: int) -> Tensor:
    """``encoder(x)`` with Shuffle-BN over ``groups`` BN groups of the global batch (at least one per device).

    Rows come back in x's order."""
    world_size = _world_size()
    splits = max(1, groups // world_size)  # groups per device
    if groups < 1 or len(x) % splits:
        raise ValueError(f"shuffle_bn_groups={groups}: the {splits} groups per device (of {world_size}) must "
                         f"divide the per-device batch size {len(x)}")
    if world_size > 1:
        local, perm = batch_shuffle_ddp(x)
        return batch_unshuffle_ddp(torch.cat([encoder(g) for g in local.chunk(splits)]), perm)
    perm = torch.randperm(len(x), device=x.device)
    encoded = torch.cat([encoder(g) for g in x[perm].chunk(splits)])
    restored = torch.empty_like(encoded)
    restored[perm] = encoded
    return restored
