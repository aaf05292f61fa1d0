"""One interface over the three ways a plane classifier is stored.

    predictor = load_predictor("outputs/finetune/ssl/run")      # checkpoint  (run dir)
    predictor = load_predictor("export/plane_classifier.ts")    # TorchScript (metadata embedded)
    predictor = load_predictor("export/plane_classifier.onnx")  # ONNX        (metadata embedded)
    probabilities = predictor.predict_frames(frames_uint8_thw, batch_size=64)   # (T, n_classes)

A backend only implements `_forward` on one preprocessed batch; preprocessing (ModelMeta.preprocess) and
batching are shared, so every backend sees the same input tensors.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from fetalssl.finetune.saliency import display_image
from fetalssl.models.saliency import grad_cam, gradcam_layer
from fetalssl.predict.model import ModelMeta, ProbabilityModel, load_run

log = logging.getLogger(__name__)

METADATA_KEY = "fetalssl_meta"  # TorchScript extra-file name and ONNX metadata_props key
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".torchscript")
ONNX_SUFFIXES = (".onnx",)


class Predictor(ABC):
    def __init__(self, meta: ModelMeta, source: Path):
        self.meta = meta
        self.source = source

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    @abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) preprocessed batch -> float32 (B, n_classes) probabilities."""

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(np.ascontiguousarray(batch, dtype=np.float32))

    def saliency(self, frames: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Grad-CAM of ``classes[i]`` on ``frames[i]`` (uint8 grey, T x H x W): the frames as the model sees them
        (uint8, model input size) and the maps (in [0, 1]); None where the stored model has no gradients
        (TorchScript, ONNX)."""
        return None

    def predict_frames(self, frames: np.ndarray, batch_size: int) -> np.ndarray:
        """uint8 grayscale (T, H, W) frames of one input -> (T, n_classes) probabilities: the scan options applied
        to each frame as to the fine-tuning stills, then preprocessed batch by batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        frames = self.meta.apply_scan(frames)
        out = [self.predict_batch(self.meta.preprocess(frames[i:i + batch_size]))
               for i in range(0, len(frames), batch_size)]
        return np.concatenate(out) if out else np.empty((0, len(self.classes)), np.float32)


class TorchPredictor(Predictor):
    """An nn.Module (rebuilt from a checkpoint) or a TorchScript module; both map images to probabilities."""

    def __init__(self, module: torch.nn.Module, meta: ModelMeta, source: Path, device: str):
        super().__init__(meta, source)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        return self.module(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def saliency(self, frames: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
        if not isinstance(self.module, ProbabilityModel):  # TorchScript: no Python modules to hook
            return None
        batch = torch.from_numpy(self.meta.preprocess(self.meta.apply_scan(frames))).to(self.device)
        backbone, head = self.module.backbone, self.module.head
        layer, to_map = gradcam_layer(backbone)
        cams = grad_cam(lambda x: head(backbone(x)), layer, to_map, batch, torch.tensor(classes, device=self.device))
        shown = np.stack([display_image(image.cpu(), self.meta.mean, self.meta.std) for image in batch])
        return shown, cams.cpu().numpy()


class OnnxPredictor(Predictor):
    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else [
            "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), providers=providers)
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path}: no '{METADATA_KEY}' metadata; export it with fetalssl-export")
        super().__init__(ModelMeta.from_json(props[METADATA_KEY], str(path)), path)
        self.input_name = self.session.get_inputs()[0].name

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def load_torchscript(path: Path, device: str) -> TorchPredictor:
    extra = {METADATA_KEY: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        raise ValueError(f"{path}: not a TorchScript model ({str(e).splitlines()[0]})") from e
    if not extra[METADATA_KEY]:
        raise ValueError(f"{path}: no '{METADATA_KEY}' extra file; export it with fetalssl-export")
    return TorchPredictor(module, ModelMeta.from_json(extra[METADATA_KEY], str(path)), path, device)


def load_predictor(model: str | Path, device: str = "cpu") -> Predictor:
    """A fine-tune run dir, a TorchScript file (.ts/.pt/.torchscript) or an ONNX file (.onnx)."""
    path = Path(model)
    if path.is_dir():
        module, meta = load_run(path)
        predictor: Predictor = TorchPredictor(module, meta, path, device)
    elif not path.is_file():
        raise FileNotFoundError(f"model={path} does not exist")
    elif path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        predictor = load_torchscript(path, device)
    elif path.suffix.lower() in ONNX_SUFFIXES:
        predictor = OnnxPredictor(path, device)
    else:
        raise ValueError(f"model={path}: expected a fine-tune run dir, a TorchScript file "
                         f"({', '.join(TORCHSCRIPT_SUFFIXES)}) or an ONNX file (.onnx)")
    log.info("Loaded %s (%s): classes %s, input %d px x %d ch", path, type(predictor).__name__,
             predictor.classes, predictor.meta.image_size, predictor.meta.channels)
    return predictor
