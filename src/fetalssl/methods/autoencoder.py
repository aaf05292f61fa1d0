"""Autoencoder baseline: reconstruct the frame from the backbone's pooled embedding."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fetalssl.losses import reconstruction_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.backbones import input_channels


class Autoencoder(SSLMethod):
    """view1 is both input and target. ``decoder`` is a partial of models.decoders.ConvDecoder."""

    def __init__(self, backbone: nn.Module, decoder: Callable[..., nn.Module], image_size: int, **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.decoder = decoder(in_dim=backbone.num_features, out_chans=input_channels(backbone),
                               image_size=image_size)

    def corrupt(self, x: Tensor) -> Tensor:
        """The encoder's input; identity for the plain autoencoder."""
        return x

    def loss(self, batch: Batch) -> Tensor:
        x = batch["view1"]
        return reconstruction_loss(self.decoder(self.backbone(self.corrupt(x))), x)
