"""OpenCLIP models (FetalCLIP, or any other) from local files: the image tower as a fine-tuning backbone, and
zero-shot classification with the text tower.

Two files describe a model, as FetalCLIP publishes it: a model config .json in open_clip's format (embed_dim,
vision_cfg, text_cfg, optionally preprocess_cfg) and a weights file. open-clip-torch builds the towers (nothing is
re-implemented, nothing is downloaded); the weights are read tensors-only, like every weight file here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fetalssl.io import load_weights
from fetalssl.models.backbones import load_matching

log = logging.getLogger(__name__)

REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
TRUST_PICKLE_SWITCH = "init.trust_pickle"


def _open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("OpenCLIP models need open-clip-torch: pip install 'fetalssl[clip]'") from err
    return open_clip


def read_model_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP model config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON model config ({err})") from err
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path}: not an OpenCLIP model config, missing keys {missing}")
    return config


@dataclass(frozen=True)
class InputSpec:
    """What the image tower was trained on: square side, per-channel (RGB) mean and std of x/255."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def input_spec(config_path: str | Path) -> InputSpec:
    """The model's input size (vision_cfg.image_size) and normalisation (preprocess_cfg, else open_clip's
    defaults, as open_clip.create_model resolves them)."""
    config = read_model_config(config_path)
    preprocess = {**asdict(_open_clip().transform.PreprocessCfg()), **config.get("preprocess_cfg", {})}
    size = config["vision_cfg"].get("image_size", preprocess["size"])
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"{config_path}: non-square image_size {size} is not supported")
        size = size[0]
    return InputSpec(int(size), tuple(map(float, preprocess["mean"])), tuple(map(float, preprocess["std"])))


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """open_clip's checkpoint layouts: a state dict, or one under 'state_dict' (training checkpoints), keys
    possibly prefixed 'module.' (DDP)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict, or a checkpoint with a 'state_dict' entry")
    return {key.removeprefix("module."): value for key, value in obj.items()}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def load_clip(config_path: str | Path, weights_path: str | Path, trust_pickle: bool) -> nn.Module:
    """The whole OpenCLIP model of `config_path` with the weights of `weights_path`, loaded strictly, in eval mode.
    A mismatch is an error naming the weights file, the config and the keys."""
    open_clip = _open_clip()
    config_path, weights_path = Path(config_path), Path(weights_path)
    read_model_config(config_path)
    open_clip.add_model_config(config_path)  # registered under the file's stem, as FetalCLIP's README does
    # open_clip logs (on the root logger) that no weights were loaded: true only until the lines below
    not_loaded_yet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(not_loaded_yet)
    try:
        model = open_clip.create_model(config_path.stem, pretrained=None)
    finally:
        logging.getLogger().removeFilter(not_loaded_yet)
    state = _state_dict(load_weights(weights_path, trust_pickle, switch=TRUST_PICKLE_SWITCH), weights_path)
    try:
        load_matching(model, state, weights_path, strict=True)
    except ValueError as err:
        raise ValueError(f"{err} (model config {config_path})") from err
    log.info("OpenCLIP model %s with weights %s", config_path, weights_path)
    return model.eval()


class Projection(nn.Module):
    """``x @ weight``: the image projection of an OpenCLIP ViT as a module of its own."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class ImageTower(nn.Module):
    """The image encoder of an OpenCLIP model as a backbone: ``forward(x)`` is the model's
    ``encode_image(x)`` (pooled output through the image projection, not L2-normalised), ``num_features`` its
    embedding size. Only the image tower's weights are held.

    A ViT tower's projection matrix is a parameter of the tower's root, listed before its blocks; it moves into
    the child module ``projection`` registered after the tower (it is applied last), so that
    finetune_mode=partial, which trains the last block and every parameter after it, trains it too. The tower
    taken from `clip` loses it."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.visual = clip.visual
        self.num_features = int(clip.visual.output_dim)
        weight = getattr(self.visual, "proj", None)
        self.projection = Projection(weight) if isinstance(weight, nn.Parameter) else nn.Identity()
        if isinstance(weight, nn.Parameter):
            self.visual.proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.visual(x))


def read_prompts(given: str | Path | Mapping, classes: Sequence[str], source: str) -> dict[str, list[str]]:
    """init.prompts: a JSON file, or the mapping itself, from every class to one prompt or a list of them;
    `source` names it in errors."""
    prompts = given
    if not isinstance(given, Mapping):
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"init.prompts={path} does not exist")
        try:
            prompts = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(prompts, Mapping):
        raise ValueError(f"{source}: expected an object mapping each class to its prompts")
    prompts = {c: [p] if isinstance(p, str) else p for c, p in prompts.items()}
    missing = [c for c in classes if not prompts.get(c)]
    unknown = sorted(set(prompts) - set(classes))
    bad = [c for c, p in prompts.items() if not isinstance(p, list) or not all(isinstance(t, str) for t in p)]
    if missing or unknown or bad:
        raise ValueError(f"{source}: classes without prompts {missing}, unknown classes {unknown}, prompts that are "
                         f"not text {bad}; the classes are {list(classes)}")
    return {c: list(prompts[c]) for c in classes}


@torch.no_grad()
def class_text_embeddings(clip: nn.Module, tokenizer, prompts: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """(C, D), one row per class in `prompts` order: the mean of its prompts' L2-normalised text embeddings,
    normalised again (CLIP's prompt ensembling, as FetalCLIP's zero-shot evaluation)."""
    rows = [F.normalize(F.normalize(clip.encode_text(tokenizer(list(texts))).float(), dim=-1).mean(0), dim=0)
            for texts in prompts.values()]
    return torch.stack(rows)


def zeroshot_probs(image_features: torch.Tensor, class_embeddings: torch.Tensor,
                   logit_scale: torch.Tensor) -> torch.Tensor:
    """Softmax over classes of the scaled cosine similarity between image and class embeddings."""
    return (logit_scale * F.normalize(image_features.float(), dim=-1) @ class_embeddings.T).softmax(dim=-1)


def tokenizer_for(config_path: str | Path):
    """open_clip's tokenizer for the model (its text_cfg; the default BPE vocabulary ships with open_clip)."""
    open_clip = _open_clip()
    open_clip.add_model_config(Path(config_path))
    return open_clip.get_tokenizer(Path(config_path).stem)
