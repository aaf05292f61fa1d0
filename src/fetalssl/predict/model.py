"""What a plane classifier needs besides its weights: the class list and the exact eval preprocessing.

The same `ModelMeta` travels with every exported model (TorchScript extra file, ONNX metadata_props, sidecar
JSON), so any backend preprocesses frames identically to the fine-tuning evaluation:
grayscale uint8 -> short side resized to `image_size` -> centre crop -> [0, 1] -> (x - mean) / std ->
replicated to `channels`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import fetalssl.conf
from fetalssl.data.scan import ScanDetector, ScanOptions, analyse_still, apply_to_frames
from fetalssl.data.transforms import to_normalised_tensor
from fetalssl.finetune.classifier import linear_head
from fetalssl.finetune.init import backbone_from_record
from fetalssl.finetune.run import NORMALIZATION_FILE

log = logging.getLogger(__name__)

META_FORMAT = 2  # 2: carries the scan options
RESIZE_SHORT_SIDE_CENTRE_CROP = "short_side_resize_then_centre_crop"
RUN_CONFIG = Path(".hydra") / "config.yaml"
RUN_CHECKPOINT = Path("checkpoints") / "best.ckpt"
# The eval transform of conf/data/labelled.yaml, the only one exported models describe.
SUPPORTED_EVAL_TRANSFORM = ["albumentations.SmallestMaxSize", "albumentations.CenterCrop"]


@dataclass(frozen=True)
class ModelMeta:
    classes: list[str]
    image_size: int
    channels: int
    mean: float
    std: float
    scan: dict  # ScanOptions.record() of the fine-tuning data: the same layout handling before preprocessing
    resize: str = RESIZE_SHORT_SIDE_CENTRE_CROP
    input_layout: str = "NCHW float32"
    output: str = "softmax probabilities (N, len(classes))"
    format: int = META_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelMeta:
        try:
            fields = json.loads(text)
            meta = cls(**fields)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{source}: malformed fetalssl model metadata ({e})") from e
        if meta.format != META_FORMAT or meta.resize != RESIZE_SHORT_SIDE_CENTRE_CROP:
            raise ValueError(f"{source}: unsupported metadata format={meta.format} resize={meta.resize!r}")
        return meta

    def eval_transform(self) -> A.Compose:
        return A.Compose([A.SmallestMaxSize(max_size=self.image_size),
                          A.CenterCrop(height=self.image_size, width=self.image_size)])

    def scan_options(self) -> ScanOptions:
        return ScanOptions(**{**self.scan, "detector": ScanDetector(**self.scan["detector"])})

    def apply_scan(self, frames: np.ndarray) -> list[np.ndarray]:
        """uint8 (T, H, W) frames of one input, each with the scan options applied to its own layout found from
        its content (data.scan.analyse_still), exactly as each labelled still was in fine-tuning (a clip's
        motion would find a different sector and remove overlays that training images kept)."""
        scan = self.scan_options()
        if not scan.changes_pixels:
            return list(frames)
        return [apply_to_frames(f, analyse_still(f, None, scan.detector), scan) for f in frames]

    def preprocess(self, frames: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """uint8 grayscale frames ((T, H, W), or a list of (H, W) of any sizes) -> float32 (T, channels,
        image_size, image_size)."""
        if any(f.ndim != 2 or f.dtype != np.uint8 for f in frames):
            raise ValueError("expected uint8 grayscale frames (T, H, W) or a list of (H, W), got "
                             f"{[(f.dtype, f.shape) for f in frames][:3]}")
        transform = self.eval_transform()
        out = np.empty((len(frames), self.channels, self.image_size, self.image_size), np.float32)
        for i, frame in enumerate(frames):
            # Same call as LabelledImageDataset: normalise the single channel, then replicate it.
            out[i] = to_normalised_tensor(transform(image=frame)["image"][..., None], self.mean, self.std).numpy()
        return out


def check_eval_transform(data_cfg: DictConfig, source: Path) -> None:
    """Exported models describe only the default eval transform; anything else is refused, not approximated."""
    transforms = data_cfg.eval_transform.transforms
    targets = [t["_target_"] for t in transforms]
    sizes_match = (transforms[0].get("max_size") == data_cfg.image_size
                   and transforms[1].get("height") == transforms[1].get("width") == data_cfg.image_size
                   ) if targets == SUPPORTED_EVAL_TRANSFORM else False
    if not sizes_match:
        raise ValueError(f"{source}: data.eval_transform {targets} is not {SUPPORTED_EVAL_TRANSFORM} at "
                         f"image_size={data_cfg.image_size}; the plane finder only reproduces that one")


def meta_from_run_config(cfg: DictConfig, classes: list[str], run_dir: Path) -> ModelMeta:
    """``classes``: what the classifier was trained on (its checkpoint's), since data.classes may be inferred.
    The normalisation is the one the run wrote to normalization.json (measured or from the config)."""
    check_eval_transform(cfg.data, run_dir)
    if OmegaConf.select(cfg, "data.pad_to_square"):
        raise ValueError(f"{run_dir}: trained with data.pad_to_square=true, which the plane finder and exported "
                         "models do not reproduce yet")
    normalization = run_dir / NORMALIZATION_FILE
    if normalization.is_file():
        values = json.loads(normalization.read_text())
    elif cfg.data.mean is not None:
        values = {"mean": cfg.data.mean, "std": cfg.data.std}
    else:
        raise FileNotFoundError(f"{run_dir}: measured normalisation but no {NORMALIZATION_FILE}")
    scan_cfg = OmegaConf.select(cfg, "data.scan")
    if scan_cfg is None:  # a run from before the scan options: its pixels were kept as they were
        scan_cfg = OmegaConf.load(Path(fetalssl.conf.__file__).parent / "scan" / "keep.yaml")
    scan = OmegaConf.to_container(scan_cfg, resolve=True)
    scan.pop("_target_")
    scan["detector"].pop("_target_")
    if not isinstance(values["mean"], int | float):
        raise ValueError(f"{run_dir}: per-channel normalisation {values['mean']} is not supported by the plane "
                         "finder and exported models yet")
    return ModelMeta(classes=list(classes), image_size=int(cfg.data.image_size), channels=int(cfg.data.channels),
                     mean=float(values["mean"]), std=float(values["std"]), scan=scan)


class ProbabilityModel(nn.Module):
    """Backbone -> linear head -> softmax: the fine-tuned PlaneClassifier at inference, without Lightning."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).softmax(dim=1)


def load_run(run_dir: str | Path) -> tuple[ProbabilityModel, ModelMeta]:
    """The best checkpoint of a fine-tune run dir (.hydra/config.yaml + checkpoints/best.ckpt), in eval mode."""
    run_dir = Path(run_dir)
    for required in (RUN_CONFIG, RUN_CHECKPOINT):
        if not (run_dir / required).is_file():
            raise FileNotFoundError(f"{run_dir} is not a fine-tune run dir: {required} is missing")
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    init = OmegaConf.select(cfg, "init.name")
    if init == "open_clip":
        raise ValueError(f"{run_dir}: fetalssl-predict and -export do not support init=open_clip runs yet")
    checkpoint = torch.load(run_dir / RUN_CHECKPOINT, map_location="cpu", weights_only=True)
    meta = meta_from_run_config(cfg, checkpoint["hyper_parameters"]["classes"], run_dir)
    state = checkpoint["state_dict"]
    has_backbone = any(k.startswith("backbone.") for k in state)
    if has_backbone:
        # weights come from the checkpoint; init=timm_file may name another architecture than conf/backbone
        architecture = {"name": cfg.init.architecture} if init == "timm_file" else {}
        backbone = instantiate(cfg.backbone, pretrained_path=None, **architecture)
    elif cfg.init.name == "random":
        raise ValueError(f"{run_dir}: the checkpoint holds only the head (cached-feature linear probe) and the "
                         f"random-init backbone it was trained on cannot be rebuilt")
    elif checkpoint.get("init_weights") is None:
        raise ValueError(f"{run_dir / RUN_CHECKPOINT}: head-only checkpoint without the provenance of its init "
                         f"weights (written before fetalssl recorded it): re-run this fine-tuning")
    else:  # cached-feature linear probe: the frozen backbone is exactly the file it was trained on
        record = checkpoint["init_weights"]
        log.info("%s: head-only checkpoint; backbone from %s (sha256 %s)", run_dir, record["path"], record["sha256"])
        backbone = backbone_from_record(cfg.backbone, record, run_dir / RUN_CHECKPOINT)
    head = linear_head(backbone.num_features, len(meta.classes), cfg.finetune_mode.feature_norm)
    model = ProbabilityModel(backbone, head)
    # Lightning prefixes match ProbabilityModel's attribute names; metric states and class weights are dropped.
    target, prefix = (model, "") if has_backbone else (head, "head.")
    wanted = {k[len(prefix):]: v for k, v in state.items()
              if k.startswith(prefix or ("backbone.", "head."))}
    try:
        target.load_state_dict(wanted, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{run_dir / RUN_CHECKPOINT} does not fit cfg.backbone={cfg.backbone.name}: {e}") from e
    return model.eval(), meta
