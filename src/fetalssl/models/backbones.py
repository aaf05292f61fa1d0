"""timm backbones without a classifier head, optionally initialised from a local weight file.

Random-init baseline: ``zero_init_last`` is an explicit config key (conf/backbone/*.yaml sets it to false), so
the random baseline's ResNet blocks start with their last BatchNorm weight at 1 (plain torchvision-style
init) instead of timm's default of 0. Only ResNet-family models have this option.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fetalssl.io import load_weights

log = logging.getLogger(__name__)

_STRIP_PREFIXES = ("module.", "backbone.")
TRUST_PICKLE_SWITCH = "backbone.trust_pickle"


def create_backbone(
    name: str,
    in_chans: int,
    pretrained_path: str | None,
    zero_init_last: bool,
    trust_pickle: bool,
    **timm_kwargs,
) -> nn.Module:
    """Build ``timm.create_model(name, num_classes=0, in_chans=...)``; ``.num_features`` is the embedding size.

    ``timm_kwargs`` go to timm (e.g. ``img_size`` for ViT). ``pretrained_path`` loads a state dict or a
    checkpoint holding ``state_dict`` (Lightning); see :func:`load_backbone_weights`. The file is read with
    ``weights_only=True`` unless ``trust_pickle`` (config ``backbone.trust_pickle``) allows a legacy pickle.
    """
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    try:
        model = timm.create_model(name, zero_init_last=zero_init_last, **kwargs)
    except TypeError as err:
        if "zero_init_last" not in str(err):
            raise
        if zero_init_last:
            raise ValueError(f"zero_init_last=True is only supported by ResNet-family models, not {name!r}") from err
        model = timm.create_model(name, **kwargs)
    if pretrained_path is not None:
        load_backbone_weights(model, pretrained_path, trust_pickle, strict=True, key_prefix=None)
    return model


def first_conv(model: nn.Module) -> nn.Module:
    """The input convolution of a timm model (named in its pretrained_cfg)."""
    return model.get_submodule(model.pretrained_cfg["first_conv"])


def input_channels(model: nn.Module) -> int:
    return first_conv(model).in_channels


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with a 'state_dict' entry")
    # A whole SSL-method checkpoint also holds projector/target weights: keep only the backbone's.
    if any(k.startswith("backbone.") or k.startswith("module.backbone.") for k in obj):
        obj = {k: v for k, v in obj.items() if k.startswith(("backbone.", "module.backbone."))}
    stripped = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        stripped[key] = value
    return stripped


@dataclass(frozen=True)
class KeyReport:
    """How a weight file's keys met a model's: what the model has that the file lacks (left as initialised),
    what the file has that the model lacks (ignored), and keys present in both with different shapes."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]

    @classmethod
    def compare(cls, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> KeyReport:
        return cls(missing=sorted(set(expected) - set(found)), unexpected=sorted(set(found) - set(expected)),
                   mismatched=sorted(k for k in expected if k in found and found[k].shape != expected[k].shape))

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
                parts.append(f"{label} ({len(keys)}): {keys[:limit]}{more}")
        return "; ".join(parts) or "every key matches"


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, strict: bool) -> KeyReport:
    """Load `state` into `model`: all of it (strict; anything else is an error naming the file and the keys), or,
    with strict=False, the keys that fit, the rest of the model left as initialised (logged)."""
    report = KeyReport.compare(model.state_dict(), state)
    if not report.exact:
        if strict:
            raise ValueError(f"{path}: weights do not fit {type(model).__name__}: {report.describe()}")
        log.warning("%s: partial load into %s; left as initialised or ignored: %s", path, type(model).__name__,
                    report.describe())
    skipped = set(report.unexpected) | set(report.mismatched)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=strict)
    return report


def load_backbone_weights(model: nn.Module, path: str | Path, trust_pickle: bool, strict: bool,
                          key_prefix: str | None) -> KeyReport:
    """Load weights (strictly unless told otherwise); adapt RGB->grey first conv by summing over input channels.

    ``key_prefix`` (e.g. "encoder." of a checkpoint that wraps the timm model): only the keys under it are the
    backbone's, read without it.
    Classifier weights in the file (e.g. an ImageNet ``fc``) are dropped because the backbone has no head.
    """
    path = Path(path)
    state = _extract_state_dict(load_weights(path, trust_pickle, switch=TRUST_PICKLE_SWITCH), path)
    if key_prefix:
        state = {k.removeprefix(key_prefix): v for k, v in state.items() if k.startswith(key_prefix)}
        if not state:
            raise ValueError(f"{path}: no weight key starts with key_prefix {key_prefix!r}")

    classifier = model.pretrained_cfg.get("classifier")
    if classifier:
        dropped = [k for k in state if k.startswith(classifier + ".")]
        if dropped:
            log.info("%s: ignoring classifier weights %s", path, dropped)
            state = {k: v for k, v in state.items() if k not in dropped}

    conv_key = model.pretrained_cfg["first_conv"] + ".weight"
    expected = model.state_dict()
    if conv_key in state and conv_key in expected:
        src, dst = state[conv_key], expected[conv_key]
        if src.shape[1] == 3 and dst.shape[1] == 1:
            log.info("%s: summing RGB weights of %s into one input channel", path, conv_key)
            state[conv_key] = src.sum(dim=1, keepdim=True)

    report = load_matching(model, state, path, strict)
    log.info("loaded backbone weights from %s", path)
    return report
