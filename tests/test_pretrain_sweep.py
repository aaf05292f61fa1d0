"""Two-level sweeps: the fine-tuning grid once per run of a pretraining sweep (init.pretrain_sweep), each run
recording its pretraining setting, and the report by pretraining setting."""

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import fetalssl.runtime  # noqa: F401  (registers the config resolvers)
from conftest import run_cli, small_demo_data
from fetalssl.finetune.pretrain_sweep import expand_pretrain_sweep, pretraining_runs

TINY_PRETRAIN = ["experiment=data_variance_demo", "data.image_size=32", "data.short_side=40", "data.batch_size=8",
                 "data.num_workers=0", "data.pairs_per_epoch=16", "equal_budget_frames=4",
                 "method.projector.hidden_dims=[32]", "method.projector.out_dim=32", "trainer.max_epochs=1",
                 "probe=none"]
TINY_FINETUNE = ["experiment=demo_finetune", "data.image_size=32", "trainer.max_epochs=2", "finetune_mode=linear",
                 "finetune_mode.cache_features=true"]


def fake_sweep(root: Path, names) -> Path:
    root.mkdir(parents=True)
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "backbone.pt").write_bytes(b"")
    return root


def test_the_sweep_dir_becomes_a_multirun_over_its_pretraining_runs(tmp_path):
    sweep = fake_sweep(tmp_path / "s", ["data_budget-patients50", "data_budget-patients100"])
    (sweep / "not_a_run").mkdir()
    argv = expand_pretrain_sweep([f"init.pretrain_sweep={sweep}", "seed=0,1"])
    assert argv == ["-m", f"init.pretrain_sweep={sweep}", "seed=0,1", "init=ssl",
                    "init.pretrain_run=data_budget-patients100,data_budget-patients50"]
    assert expand_pretrain_sweep(["-m", "init=ssl", f"init.pretrain_sweep={sweep}"])[-1].startswith(
        "init.pretrain_run=")
    assert expand_pretrain_sweep(["seed=1"]) == ["seed=1"]  # nothing to expand
    pinned = [f"init.pretrain_sweep={sweep}", "init.pretrain_run=data_budget-patients50"]
    assert expand_pretrain_sweep(pinned) == pinned
    with pytest.raises(ValueError, match="init=ssl"):
        expand_pretrain_sweep([f"init.pretrain_sweep={sweep}", "init=random,ssl"])
    with pytest.raises(FileNotFoundError, match="no pretraining run"):
        pretraining_runs(fake_sweep(tmp_path / "empty", []))


def test_budget_presets_hold_patients_times_frames_and_pairs_fixed():
    with initialize_config_module("fetalssl.conf", version_base="1.3"):
        for preset, frames in (("data_variance_demo", 8), ("data_variance", 16)):
            budgets = {}
            for choice in ("patients25", "patients50", "patients100"):
                data = compose("train", overrides=[f"experiment={preset}", f"data_budget={choice}"]).data
                budgets[choice] = (data.patient_fraction, data.frames_per_video, data.pairs_per_epoch)
            assert {round(share * frames_per_video, 6) for share, frames_per_video, _ in budgets.values()} == {frames}
            assert [b[0] for b in budgets.values()] == [0.25, 0.5, 1.0]
            assert len({b[2] for b in budgets.values()}) == 1 and budgets["patients25"][2] > 0
        default = compose("train").data
        assert (default.patient_fraction, default.frames_per_video) == (1.0, None)  # data_budget=all


@pytest.fixture(scope="module")
def five_patients(tmp_path_factory) -> Path:
    return small_demo_data(tmp_path_factory.mktemp("demo") / "data", video_patients=5)


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_two_level_sweep_fine_tunes_every_pretraining_run_and_reports_by_setting(five_patients, tmp_path):
    common = [f"data.root={five_patients}", f"paths.output_root={tmp_path}", "run_id=variance"]
    run_cli("fetalssl-train", "-m", *TINY_PRETRAIN, *common, f"data.cache_dir={tmp_path / 'cache'}",
            "data_budget=patients50,patients100")
    pretrain_sweep = tmp_path / "pretrain_sweep" / "variance"
    used = {run: json.loads((pretrain_sweep / run / "pretraining_data.json").read_text())
            for run in pretraining_runs(pretrain_sweep)}
    share = {used[run]["settings"]["patient_fraction"]: run for run in used}
    assert sorted(share) == [0.5, 1.0] and all(f"data_budget-patients{int(100 * k)}" in run for k, run in share.items())
    patients = {run: set(record["patients"]) for run, record in used.items()}
    assert patients[share[0.5]] < patients[share[1.0]]  # nested, fewer
    frames = {k: sum(v["frames"] for v in used[run]["videos"]) for k, run in share.items()}
    assert frames[0.5] == frames[1.0] == 4 * len(patients[share[1.0]])  # equal distinct frames (1 video each)

    finetune = [*TINY_FINETUNE, *common, f"init.pretrain_sweep={pretrain_sweep}", "seed=0,1"]
    run_cli("fetalssl-finetune", *finetune)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "finetune_sweep" / "variance").rglob("metrics.json")]
    assert len(runs) == 2 * 2 and all(r["status"] == "ok" for r in runs)
    for run in runs:
        pretrain = run["pretrain"]
        assert f"data_budget-{pretrain['overrides']['data_budget']}" in pretrain["run"]
        assert pretrain["data"]["patients"] == len(patients[pretrain["run"]])
        assert run["grid"]["pretrain.patient_fraction"] == used[pretrain["run"]]["settings"]["patient_fraction"]
        assert run["grid"]["method"] == "barlowtwins" and pretrain["run"] in run["init_weights"]["path"]
    rerun = run_cli("fetalssl-finetune", *finetune)
    assert (rerun.stdout + rerun.stderr).count("completed with this config already") == 4

    report = tmp_path / "finetune_sweep" / "variance" / "report"
    printed = run_cli("fetalssl-report", tmp_path / "finetune_sweep" / "variance").stdout
    macro_f1 = printed.split("## test.macro_f1", 1)[1].split("\n## ", 1)[0]  # the first table (then ECE, ...)
    rows = [line for line in macro_f1.splitlines() if line.startswith("| ssl:barlowtwins")]
    assert len(rows) == 2 and any("pretrain.patient_fraction=0.5" in r for r in rows)
    assert any("pretrain.patient_fraction=1.0" in r for r in rows)
    with (report / "comparisons.csv").open() as f:
        [compared] = {(r["a"], r["b"]) for r in csv.DictReader(f)}
    assert "patient_fraction=1.0" in compared[0] and "patient_fraction=0.5" in compared[1]  # 50 % minus 100 %
    assert (report / "test_macro_f1_vs_pretraining.png").stat().st_size > 5_000
