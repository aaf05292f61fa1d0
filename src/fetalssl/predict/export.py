"""Export a fine-tune run's best checkpoint as TorchScript and ONNX, each carrying its preprocessing metadata.

Files (in `out_dir`): plane_classifier.ts, plane_classifier.onnx, plane_classifier.json (sidecar: the same
metadata for tools that read neither format's embedded fields). Both models take float32 (N, C, S, S) input
and return softmax probabilities; the batch dimension is dynamic. After writing, each file is loaded through
load_predictor and compared with the checkpoint; a larger difference than `tolerance` is an error.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch

from fetalssl.io import atomic_write
from fetalssl.predict.model import ModelMeta, ProbabilityModel, load_run
from fetalssl.predict.predictor import METADATA_KEY, TorchPredictor, load_predictor

log = logging.getLogger(__name__)

BASENAME = "plane_classifier"
# float32 through different kernels (oneDNN vs ONNX Runtime); probabilities agree far tighter in practice.
DEFAULT_TOLERANCE = 1e-4
_CHECK_BATCH = 3  # != the trace batch of 2, so the check also proves the batch dimension is dynamic


def example_input(meta: ModelMeta, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, meta.channels, meta.image_size, meta.image_size, generator=g)


def torchscript_bytes(model: ProbabilityModel, meta: ModelMeta) -> bytes:
    # trace, not script: timm backbones are not all scriptable, and the graph has no data-dependent control flow
    traced = torch.jit.trace(model, example_input(meta, 2, seed=0))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_KEY: meta.to_json()})
    return buffer.getvalue()


def onnx_bytes(model: ProbabilityModel, meta: ModelMeta) -> bytes:
    program = torch.onnx.export(model, (example_input(meta, 2, seed=0),), dynamo=True, external_data=False,
                                input_names=["image"], output_names=["probabilities"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    return proto.SerializeToString()


def max_difference(reference: TorchPredictor, exported: Path, batch: np.ndarray) -> float:
    return float(np.abs(load_predictor(exported).predict_batch(batch) - reference.predict_batch(batch)).max())


def export_run(run_dir: str | Path, out_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Path]:
    """Write the three files; returns {"torchscript", "onnx", "metadata"} -> path."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, meta = load_run(run_dir)
    paths = {kind: out_dir / f"{BASENAME}{suffix}"
             for kind, suffix in (("torchscript", ".ts"), ("onnx", ".onnx"), ("metadata", ".json"))}
    payloads = {"torchscript": torchscript_bytes(model, meta), "onnx": onnx_bytes(model, meta),
                "metadata": meta.to_json().encode()}
    for kind, payload in payloads.items():
        atomic_write(paths[kind], lambda f, payload=payload: f.write(payload))
    reference = TorchPredictor(model, meta, run_dir, "cpu")
    batch = example_input(meta, _CHECK_BATCH, seed=1).numpy()
    for kind in ("torchscript", "onnx"):
        diff = max_difference(reference, paths[kind], batch)
        log.info("%s: max |p - p_checkpoint| = %.2e", paths[kind], diff)
        if diff > tolerance:
            raise RuntimeError(f"{paths[kind]}: probabilities differ from the checkpoint by {diff:.2e} "
                               f"> tolerance {tolerance:.0e}")
    return paths
