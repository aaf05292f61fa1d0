"""Export: TorchScript and ONNX reproduce the checkpoint's probabilities and carry the preprocessing metadata."""

import json

import numpy as np
import onnx
import pytest
import torch
from omegaconf import OmegaConf

from conftest import scan_options
from fetalssl.cli import export as export_cli
from fetalssl.data.video import read_frames
from fetalssl.predict.export import export_run
from fetalssl.predict.model import RUN_CONFIG, ModelMeta
from fetalssl.predict.predictor import METADATA_KEY, OnnxPredictor, TorchPredictor, load_predictor
from test_predict import make_run_dir, write_sweep

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = make_run_dir(root, image_size=48)
    assert export_cli.main([str(run), "--out", str(root / "export")]) == 0
    return run, {p.suffix: p for p in (root / "export").iterdir()}


def test_export_writes_torchscript_onnx_and_sidecar_with_the_same_metadata(exported):
    run, files = exported
    assert sorted(files) == [".json", ".onnx", ".ts"]
    sidecar = json.loads(files[".json"].read_text())
    assert sidecar["scan"] == scan_options("keep").record()  # the run's scan options, as its data config had them
    assert {k: v for k, v in sidecar.items() if k != "scan"} == {"channels": 3, "classes": ["4CH", "LVOT", "RVOT", "3VV", "3VT"], "format": 2,
                       "image_size": 48, "input_layout": "NCHW float32", "mean": 0.5, "std": 0.25,
                       "output": "softmax probabilities (N, len(classes))",
                       "resize": "short_side_resize_then_centre_crop"}
    props = {p.key: p.value for p in onnx.load(str(files[".onnx"])).metadata_props}
    extra = {METADATA_KEY: ""}
    torch.jit.load(str(files[".ts"]), _extra_files=extra)
    assert json.loads(props[METADATA_KEY]) == json.loads(extra[METADATA_KEY]) == sidecar


def test_exported_models_give_the_checkpoint_probabilities_within_1e4(exported, tmp_path):
    run, files = exported
    reference = load_predictor(run)
    backends = {suffix: load_predictor(path) for suffix, path in files.items() if suffix != ".json"}
    assert isinstance(reference, TorchPredictor) and isinstance(backends[".onnx"], OnnxPredictor)
    write_sweep(tmp_path / "v.mp4", n_frames=23, size=64)
    frames, _ = read_frames(tmp_path / "v.mp4")
    expected = reference.predict_frames(frames, batch_size=10)  # batches of 10, 10, 3: dynamic batch size
    assert expected.max(axis=1).mean() > 0.5  # far from uniform, so the comparison means something
    for backend in backends.values():
        assert backend.meta == reference.meta
        got = backend.predict_frames(frames, batch_size=10)
        assert np.abs(got - expected).max() < TOLERANCE
        assert (got.argmax(1) == expected.argmax(1)).all()
        assert backend.saliency(frames[:1], [0]) is None  # exported graphs carry no gradients: no Grad-CAM
    assert reference.saliency(frames[:1], [0]) is not None


def test_export_refuses_an_eval_transform_it_cannot_describe(tmp_path):
    run = make_run_dir(tmp_path)
    cfg = OmegaConf.load(run / RUN_CONFIG)
    cfg.data.eval_transform.transforms[0].max_size = 40  # resize differently from the crop size
    OmegaConf.save(cfg, run / RUN_CONFIG)
    with pytest.raises(ValueError, match="eval_transform"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_cli_reports_a_missing_run_dir(tmp_path, capsys):
    assert export_cli.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "is missing" in err


def test_metadata_rejects_unknown_formats():
    meta = ModelMeta(classes=["a"], image_size=8, channels=1, mean=0.5, std=0.25, scan={})
    assert ModelMeta.from_json(meta.to_json(), "x") == meta
    with pytest.raises(ValueError, match="unsupported"):
        ModelMeta.from_json(meta.to_json().replace('"format": 2', '"format": 1'), "m.onnx")
    with pytest.raises(ValueError, match="m.onnx: malformed"):
        ModelMeta.from_json("{", "m.onnx")
