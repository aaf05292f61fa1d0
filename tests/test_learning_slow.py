"""Pretraining must teach something: BarlowTwins features beat random-init features under the same probe."""

import json
from statistics import mean

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_barlowtwins_features_beat_random_init_under_a_linear_probe_with_few_labels(tmp_path):
    data = tmp_path / "data"
    run_cli("fetalssl-demo-data", data)
    common = [f"data.root={data}", f"paths.output_root={tmp_path}", "run_id=t"]
    run_cli("fetalssl-train", "experiment=demo", *common)  # ~3 minutes on 2 cores
    run_cli("fetalssl-finetune", "-m", "experiment=demo_finetune", "finetune_mode=linear", "data_fraction=pct10",
            "init=random,ssl_barlowtwins", "seed=0,1,2", *common)
    scores = {"random": [], "ssl_barlowtwins": []}
    for path in (tmp_path / "finetune_sweep" / "t").glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        init = "random" if metrics["grid"]["init"] == "random" else "ssl_barlowtwins"
        scores[init].append(metrics["test"]["macro_f1"])
    assert all(len(v) == 3 for v in scores.values()), scores
    # Same held-out patients, same 10 % label subsets per seed: only the backbone's weights differ.
    assert mean(scores["ssl_barlowtwins"]) > mean(scores["random"]) + 0.05, scores
