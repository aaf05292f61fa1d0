"""Plane finder: classify every frame of a scan video, smooth over time, pick the best frame per plane.

- model.py:    preprocessing metadata (ModelMeta), the probability model rebuilt from a fine-tune run dir.
- predictor.py: one Predictor interface over the checkpoint / TorchScript / ONNX backends (load_predictor).
- export.py:   TorchScript + ONNX export with embedded metadata and a sidecar JSON, checked against the checkpoint.
- timeline.py: temporal smoothing, abstention, best-frame choice and the timeline figure.
- scan.py:     one input -> its output folder (written atomically); folders of inputs with per-file errors.
"""
