"""MAE (He et al., 2022): reconstruct the pixels of randomly removed patches from the visible ones."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import masked_patch_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.masking import check_maskable, encode_visible, patchify


class MAE(SSLMethod):
    """Section 3 of the paper::

        visible, mask = random 25 % of the patches of view1 (mask_ratio 0.75)
        latent = ViT(visible)                                  # the backbone, exported as a plain timm ViT
        pred = decoder(latent, mask tokens in the removed places)
        loss = MSE(pred, normalised pixels of each patch) over the removed patches

    view2 is not used. The backbone's own forward (all patches, class token) is what fine-tuning sees.
    """

    def __init__(self, backbone: nn.Module, decoder: Callable[..., nn.Module], mask_ratio: float,
                 normalise_targets: bool, **base_kwargs):
        super().__init__(check_maskable(backbone), **base_kwargs)
        self.patch_size = backbone.patch_embed.patch_size[0]
        self.decoder = decoder(embed_dim=backbone.embed_dim, grid_size=backbone.patch_embed.grid_size,
                               patch_size=self.patch_size, in_chans=backbone.patch_embed.proj.in_channels)
        self.mask_ratio = mask_ratio
        self.normalise_targets = normalise_targets

    def loss(self, batch: Batch) -> Tensor:
        x = batch["view1"]
        encoded, mask, restore = encode_visible(self.backbone, x, self.mask_ratio)
        pred = self.decoder(encoded, restore)
        return masked_patch_loss(pred, patchify(x, self.patch_size), mask, self.normalise_targets)
