"""Which backbone parameters fine-tuning trains, and keeping the frozen parts truly frozen.

`trainable` (conf/finetune_mode/*.yaml):
- "none": linear probe; no backbone parameter is trained.
- "last_stage": the last stage plus every parameter registered after it (final norms, conv_head...).
  The last stage is the module named by the last entry of timm's `feature_info` (resnet: layer4,
  convnext: stages.3, vit: blocks.11, efficientnet: blocks.6); models without it fall back to the last
  child of `layers` / `stages` / `blocks` / `visual.transformer.resblocks` (an OpenCLIP image tower).
- "all": full fine-tuning.

Frozen parts must also stay in eval mode: otherwise BatchNorm running statistics keep moving and dropout /
drop-path keeps firing in modules whose weights never change. `frozen_subtrees` finds them and the classifier
re-applies `eval()` after every `train()` call.
"""

from __future__ import annotations

from torch import nn

TRAINABLE_CHOICES = ("none", "last_stage", "all")
_STAGE_CONTAINERS = ("layers", "stages", "blocks", "visual.transformer.resblocks")


def last_stage_name(backbone: nn.Module) -> str:
    feature_info = getattr(backbone, "feature_info", None)
    if feature_info:
        return feature_info[-1]["module"]
    for attr in _STAGE_CONTAINERS:
        try:
            container = backbone.get_submodule(attr)
        except AttributeError:
            continue
        if isinstance(container, nn.Sequential | nn.ModuleList) and len(container):
            return f"{attr}.{len(container) - 1}"
    raise ValueError(f"{type(backbone).__name__}: cannot find its last stage (no timm feature_info and no "
                     f"{'/'.join(_STAGE_CONTAINERS)} container); use finetune_mode=full or linear")


def set_trainable(backbone: nn.Module, trainable: str) -> list[str]:
    """Set requires_grad on the backbone for the mode; returns the names of the trained parameters."""
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable={trainable!r}: must be one of {TRAINABLE_CHOICES}")
    names = [name for name, _ in backbone.named_parameters()]
    if trainable == "none":
        first_trained = len(names)
    elif trainable == "all":
        first_trained = 0
    else:
        stage = last_stage_name(backbone)
        # Parameters are registered in forward order in timm models, so "after the stage" = later names.
        first_trained = next((i for i, n in enumerate(names) if n.startswith(stage + ".")), None)
        if first_trained is None:
            raise ValueError(f"{type(backbone).__name__}: last stage {stage!r} has no parameters")
    for i, (_, param) in enumerate(backbone.named_parameters()):
        param.requires_grad_(i >= first_trained)
    return names[first_trained:]


def frozen_subtrees(module: nn.Module) -> list[nn.Module]:
    """Largest submodules whose parameters are all frozen (the module itself when nothing is trained)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        return [module]
    return [frozen for child in module.children() for frozen in frozen_subtrees(child)]
