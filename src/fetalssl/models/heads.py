"""Projector / predictor MLPs (built from `_partial_: true` configs, completed with in_dim at runtime)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    """[Linear -> (BN) -> ReLU] per hidden size, then Linear, optionally followed by a BN without affine."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, hidden_bn: bool, last_bn: bool):
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            # A bias before BN is redundant.
            layers += [nn.Linear(dim, hidden, bias=not hidden_bn)]
            if hidden_bn:
                layers += [nn.BatchNorm1d(hidden)]
            layers += [nn.ReLU(inplace=True)]
            dim = hidden
        layers += [nn.Linear(dim, out_dim, bias=not last_bn)]
        if last_bn:
            layers += [nn.BatchNorm1d(out_dim, affine=False)]
        super().__init__(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, section 3.1 and the official code): an MLP with GELU (no BN by
    default) down to a ``bottleneck_dim`` bottleneck, L2-normalised, then ``out_dim`` prototypes compared by
    cosine (the weight-normalised last layer with its norm fixed at 1, the paper's norm_last_layer)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], bottleneck_dim: int, out_dim: int, hidden_bn: bool):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden)] + ([nn.BatchNorm1d(hidden)] if hidden_bn else []) + [nn.GELU()]
            dim = hidden
        layers += [nn.Linear(dim, bottleneck_dim)]
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck_dim), std=0.02))
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))
