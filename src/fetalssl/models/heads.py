"""Projector / predictor MLPs (built from `_partial_: true` configs, completed with in_dim at runtime)."""

from __future__ import annotations

from collections.abc import Sequence

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
