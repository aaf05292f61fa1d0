"""Pretraining must teach something: BarlowTwins features beat random-init features under the same probe."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_barlowtwins_features_beat_random_init_under_a_linear_probe(tmp_path):
    data = tmp_path / "data"
    run_cli("fetalssl-demo-data", data)
    common = [f"data.root={data}", f"paths.output_root={tmp_path}", "run_id=t"]
    run_cli("fetalssl-train", "experiment=demo", *common)
    scores = {}
    for init in ("random", "ssl_barlowtwins"):
        run_cli("fetalssl-finetune", "experiment=demo_finetune", "finetune_mode=linear", f"init={init}", *common)
        name = "ssl" if init != "random" else "random"
        metrics = json.loads((tmp_path / "finetune" / name / "t" / "metrics.json").read_text())
        scores[init] = metrics["test"]["macro_f1"]
    assert scores["ssl_barlowtwins"] > scores["random"] + 0.05, scores
