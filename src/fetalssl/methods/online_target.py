"""An online network with a predictor regressing or contrasting an EMA target network: BYOL and MoCo v3 are this
shape with their own criterion (conf/method/<name>.yaml)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import EMATarget


class OnlineTargetMethod(SSLMethod):
    """BYOL (Grill et al. 2020, algorithm 1) and MoCo v3 (Chen, Xie & He 2021, algorithm 1)::

        online(x) = predictor(projector(backbone(x)))
        target    = EMA of (backbone, projector), no gradient
        loss = criterion(online(view1), target(view2)) + criterion(online(view2), target(view1))
        after the optimiser step: target <- tau * target + (1 - tau) * online, tau from tau_base to tau_final

    ``criterion``: byol_loss (BYOL) or mocov3_loss (MoCo v3, the keys of the global batch as negatives).
    ``frozen_backbone_parts``: backbone submodules kept at their random init (MoCo v3's frozen random patch
    projection for ViT, section 4.2), e.g. ``[patch_embed]``.
    """

    def __init__(self, backbone: nn.Module, projector: Callable[..., nn.Module],
                 predictor: Callable[..., nn.Module], criterion: Callable[[Tensor, Tensor], Tensor],
                 tau_base: float, tau_final: float, frozen_backbone_parts: Sequence[str], **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        for name in frozen_backbone_parts:
            if not hasattr(backbone, name):
                raise ValueError(f"method.frozen_backbone_parts: the {type(backbone).__name__} backbone has no part "
                                 f"{name!r} (the ViT recipe needs backbone=vit_small)")
            backbone.get_submodule(name).requires_grad_(False)
        self.projector = projector(in_dim=backbone.num_features)
        self.predictor = predictor(in_dim=self.projector.out_dim)
        self.target = EMATarget(nn.Sequential(self.backbone, self.projector), tau_base, tau_final)
        self.criterion = criterion

    def online(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    def loss(self, batch: Batch) -> Tensor:
        x1, x2 = batch["view1"], batch["view2"]
        return self.criterion(self.online(x1), self.target(x2)) + self.criterion(self.online(x2), self.target(x1))

    def after_optimizer_step(self, step: int) -> None:
        self.log("tau", self.target.update(step, self.total_steps))
