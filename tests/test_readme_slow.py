"""Every command the README shows, run as written (plus tiny settings) on generated data, so none goes stale.

Each ```bash block of the README runs in bash, in order of dependence, in a scratch folder. The console scripts
are wrapped by shell functions that append tiny settings (one epoch, 32 px, ...): later overrides win in Hydra,
so the README's own arguments are all used. Paths that stand for the user's data (/data/videos, /data/stills,
/weights/...) point at generated data. Commands covered elsewhere are listed in COVERED_ELSEWHERE.
"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {
    "fetalssl-train": "trainer.max_steps=2 trainer.limit_val_batches=1 data.image_size=32 data.short_side=40 "
                      "data.batch_size=16 data.samples_per_video=8 data.num_workers=0 probe=none",
    "fetalssl-finetune": "trainer.max_epochs=1 data.image_size=32 data.num_workers=0",
    "fetalssl-predict": "batch_size=16",
}
# README commands run by other tests (what runs them).
COVERED_ELSEWHERE = {
    "make demo": "tests/test_demo_slow.py runs scripts/demo.sh, what make demo runs",
    "make test": "CI (.ci/run) runs it",
    "bash scripts/pocus/reproduce.sh outputs/pocus": "tests/test_configs.py::test_pocus_reproduction_script_commands_compose",
    "bash scripts/pocus/cross_validate.sh outputs/pocus_cv":
        "tests/test_configs.py::test_pocus_cross_validation_script_composes_one_pretraining_per_fold_and_scan",
    "bash scripts/bench/new_methods_demo.sh outputs/new_methods":
        "tests/test_configs.py::test_new_methods_demo_script_pretrains_each_new_method_and_probes_it_against_random_init",
    "bash scripts/pocus/data_variance.sh outputs/pocus_variance":
        "tests/test_configs.py::test_pocus_data_variance_script_pretrains_three_budgets_and_fine_tunes_over_that_sweep",
}


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, a for-loop kept whole."""
    text = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    joined, loop = [], []
    for line in lines:
        if line.startswith("for ") or loop:
            loop.append(line)
            if line == "done":
                joined.append("; ".join(loop).replace("do;", "do"))
                loop = []
        else:
            joined.append(line)
    return joined


def block_with(first_command: str) -> str:
    [block] = [b for b in readme_blocks() if commands(b) and commands(b)[0].startswith(first_command)]
    return block


def run_block(block: str, cwd: Path, substitutions: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    for placeholder, value in (substitutions or {}).items():
        block = block.replace(placeholder, value)
    wrappers = "".join(f'{name}() {{ "{BIN / name}" "$@" {extra}; }}\n' for name, extra in TINY.items())
    script = f'set -euo pipefail\nexport PATH="{BIN}:$PATH"\n{wrappers}{block}'
    result = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-4000:]}"
    return result


def ok_metrics(sweep: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert runs and all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs if r["status"] != "ok"]
    return runs


def test_every_readme_command_is_run_by_a_test():
    tested = {c for name in ("fetalssl-demo-data demo/", "fetalssl-demo-data scans/", "fetalssl-demo-data variance/",
                             "for m in", "fetalssl-finetune -m experiment=published_baselines",
                             "fetalssl-predict model=outputs", "fetalssl-export", "fetalssl-demo-data tracked/")
              for c in commands(block_with(name))}
    shown = {c for b in readme_blocks() for c in commands(b)}
    assert shown - tested - set(COVERED_ELSEWHERE) == set()


def test_readme_quick_start_plane_finder_and_export_blocks_run_as_written(tmp_path):
    run_block(block_with("fetalssl-demo-data demo/"), tmp_path)
    outputs = tmp_path / "outputs"
    assert (outputs / "pretrain" / "barlowtwins" / "bt" / "backbone.pt").is_file()
    probe = json.loads((outputs / "finetune" / "ssl_barlowtwins" / "probe" / "metrics.json").read_text())
    assert probe["status"] == "ok" and probe["grid"]["fraction"] == 0.01
    by_file = json.loads((outputs / "finetune" / "ssl" / "file" / "metrics.json").read_text())
    assert by_file["init_weights"]["path"] == str((outputs / "pretrain" / "barlowtwins" / "bt" / "backbone.pt").resolve())
    assert len(ok_metrics(outputs / "finetune_sweep" / "grid")) == 2 * 2 * 3 * 3
    assert (outputs / "finetune_sweep" / "grid" / "report" / "results.md").is_file()
    assert json.loads((tmp_path / "predictions" / "scan00_mp4" / "scan.json").read_text())["n_frames"] > 0

    run_block(block_with("fetalssl-export"), tmp_path)
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"plane_classifier.ts", "plane_classifier.onnx"}
    run_block(block_with("fetalssl-predict model=outputs"), tmp_path)
    summary = json.loads((tmp_path / "planes" / "predict_summary.json").read_text())["results"]
    videos = [p for p in (tmp_path / "demo" / "videos").rglob("*") if p.suffix in (".mp4", ".avi")]
    assert len(summary) == len(videos) and all(r["status"] == "ok" for r in summary)


def test_readme_trackers_and_report_block_runs_as_written(tmp_path):
    result = run_block(block_with("fetalssl-demo-data tracked/"), tmp_path, {
        "tracked/\n": "tracked/ --patients 3 --frames 30 --size 64 --stills 100 --still-patients 10\n"})
    outputs = tmp_path / "outputs"
    run = outputs / "pretrain" / "simclr" / "tracked"
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and list(run.glob("wandb/offline-run-*"))
    assert (outputs / "mlflow.db").is_file()
    sweep = outputs / "finetune_sweep" / "tracked"
    assert len(ok_metrics(sweep)) == 4 and len({p.parent for p in sweep.glob("*/tensorboard/events.out.tfevents.*")}) == 4
    report = sweep / "report"
    assert {"report.html", "embeddings.png", "embeddings.csv", "comparisons.csv"} <= {p.name for p in report.iterdir()}
    assert result.stdout.splitlines()[-1].endswith("report.html")  # the console ends with the page to open


def test_readme_paper_grid_block_runs_as_written(tmp_path):
    run_cli("fetalssl-demo-data", tmp_path / "demo")
    weights = tmp_path / "resnet50_in1k.pth"  # stands in for the downloaded ImageNet file
    torch.save(timm.create_model("resnet50", num_classes=1000).state_dict(), weights)
    run_block(block_with("for m in"), tmp_path, {
        "/data/videos": str(tmp_path / "demo"), "/data/stills": str(tmp_path / "demo"),
        "/weights/resnet50_a1_in1k.pth": str(weights),
        # the paper's 540 points, cut to one seed and fraction here (appended overrides win)
        "run_id=paper \\": "run_id=paper seed=0 data_fraction=pct100 \\"})
    assert len(list((tmp_path / "outputs" / "pretrain").glob("*/paper/backbone.pt"))) == 7
    runs = ok_metrics(tmp_path / "outputs" / "finetune_sweep" / "paper")
    assert {(r["grid"]["init"], r["grid"]["method"]) for r in runs} == {
        ("random", None), ("imagenet", None), *(("ssl", m) for m in
        ("barlowtwins", "vicreg", "simclr", "moco", "byol", "autoencoder", "inpainting"))}
    assert {r["grid"]["finetune_mode"] for r in runs} == {"linear", "full"} and len(runs) == 18
    assert (tmp_path / "outputs" / "finetune_sweep" / "paper" / "report" / "results.md").is_file()


def test_readme_scan_layout_block_runs_as_written(tmp_path):
    run_block(block_with("fetalssl-demo-data scans/"), tmp_path, {
        "scans/ --frame-counter": "scans/ --patients 4 --frames 30 --size 64 --stills 100 --still-patients 10 "
                                  "--still-size 64 --frame-counter"})
    summary = json.loads((tmp_path / "outputs" / "prepare_report" / "prepare_summary.json").read_text())
    assert summary["doppler_clips"] == 1 and summary["split_screen_clips"] == 1 and summary["skipped"] == 2
    record = json.loads((tmp_path / "outputs" / "pretrain" / "simclr" / "sector" / "pretraining_data.json").read_text())
    runs = ok_metrics(tmp_path / "outputs" / "finetune_sweep" / "cv")
    assert sorted(r["grid"]["fold"] for r in runs) == [0, 1, 2, 3, 4]
    assert all(r["normalization"]["mean"] == record["normalization"]["mean"] for r in runs)
    assert "5 folds" in (tmp_path / "outputs" / "finetune_sweep" / "cv" / "report" / "results.md").read_text()


def test_readme_two_level_sweep_block_runs_as_written(tmp_path):
    run_block(block_with("fetalssl-demo-data variance/"), tmp_path, {
        "variance/\n": "variance/ --patients 5 --videos-per-patient 1 --frames 40 --size 64 --stills 100 "
                        "--still-patients 10 --still-size 64\n",
        "seed=0,1,2": "seed=0"})
    runs = ok_metrics(tmp_path / "outputs" / "finetune_sweep" / "variance")
    assert len(runs) == 3 * 2 and {r["grid"]["pretrain.patient_fraction"] for r in runs} == {0.25, 0.5, 1.0}
    report = tmp_path / "outputs" / "finetune_sweep" / "variance" / "report"
    assert (report / "test_macro_f1_vs_pretraining.png").is_file() and (report / "comparisons.csv").is_file()


def test_readme_published_baselines_block_runs_as_written(tmp_path):
    from conftest import small_demo_data
    from test_open_clip import write_clip

    data = small_demo_data(tmp_path / "stills", video_patients=2)
    (tmp_path / "fetalclip").mkdir()
    write_clip(tmp_path / "fetalclip", "FetalCLIP_config")  # a tiny OpenCLIP model under FetalCLIP's file names
    (tmp_path / "fetalclip" / "FetalCLIP_config.pt").rename(tmp_path / "fetalclip" / "FetalCLIP_weights.pt")
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "usfm.pth")
    torch.save(timm.create_model("resnet50", num_classes=1000).state_dict(), tmp_path / "resnet50.pth")
    for method in ("simclr", "barlowtwins", "vicreg"):  # stand-ins for the user's pretraining runs
        run = tmp_path / "outputs" / "pretrain" / method / "own"
        run.mkdir(parents=True)
        torch.save(timm.create_model("resnet50", num_classes=0).state_dict(), run / "backbone.pt")
    run_block(block_with("fetalssl-finetune -m experiment=published_baselines"), tmp_path, {
        "/data/stills": str(data), "/weights/resnet50_a1_in1k.pth": str(tmp_path / "resnet50.pth"),
        "/models/fetalclip": str(tmp_path / "fetalclip"),
        "/models/USFM_latest.pth": f"{tmp_path / 'usfm.pth'} init.architecture=resnet18",  # a ViT-B at 32 px: no
        "run_id=published/trained": "run_id=published/trained seed=0 data_fraction=pct100"})
    sweep = tmp_path / "outputs" / "finetune_sweep" / "published"
    trained = ok_metrics(sweep / "trained")
    assert {(r["grid"]["init"], r["grid"]["method"]) for r in trained} == {
        ("random", None), ("imagenet", None), ("ssl", "simclr"), ("ssl", "barlowtwins"), ("ssl", "vicreg"),
        ("open_clip", "FetalCLIP"), ("timm_file", "USFM")}
    assert len(trained) == 7 * 2 and {r["grid"]["finetune_mode"] for r in trained} == {"linear", "knn(k=20,T=0.07)"}
    zeroshot = ok_metrics(sweep / "zeroshot")
    assert sorted(r["grid"]["fraction"] for r in zeroshot) == [0.01, 0.1, 1.0]
    assert len({r["test"]["macro_f1"] for r in zeroshot}) == 1  # no training label used: one answer
    with (sweep / "report" / "comparisons.csv").open() as f:
        pairs = {(r["a"], r["mode_a"], r["b"], r["mode_b"]) for r in csv.DictReader(f)}
    assert ("open_clip:FetalCLIP", "zeroshot", "ssl:barlowtwins", "linear") in pairs
    assert ("open_clip:FetalCLIP", "linear", "ssl:barlowtwins", "linear") in pairs
