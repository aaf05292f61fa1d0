"""The console scripts end to end, as a user runs them: pretrain, prepare, fine-tune sweeps that resume."""

import json
import shutil

import pytest
import timm
import torch

from conftest import run_cli

TINY_PRETRAIN = ["experiment=demo", "data.image_size=32", "data.short_side=40", "data.batch_size=8",
                 "data.samples_per_video=8", "data.num_workers=0", "method.projector.hidden_dims=[32]",
                 "method.projector.out_dim=32", "trainer.max_epochs=1", "probe=none"]
TINY_FINETUNE = ["experiment=demo_finetune", "data.image_size=32", "trainer.max_epochs=2",
                 "finetune_mode=linear", "finetune_mode.cache_features=true"]


def test_pretraining_writes_checkpoints_and_a_strict_timm_backbone(tiny_demo_data, tmp_path):
    run_cli("fetalssl-train", *TINY_PRETRAIN, f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}",
            "run_id=r", f"data.cache_dir={tmp_path / 'cache'}")
    run_dir = tmp_path / "pretrain" / "barlowtwins" / "r"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)
    model.load_state_dict(torch.load(run_dir / "backbone.pt"), strict=True)


def test_prepare_builds_the_cache_once(tiny_demo_data, tmp_path):
    args = [f"data.root={tiny_demo_data}", f"data.cache_dir={tmp_path / 'cache'}", "data.short_side=40",
            f"paths.output_root={tmp_path}"]
    first = run_cli("fetalssl-prepare", *args).stdout
    second = run_cli("fetalssl-prepare", *args).stdout
    assert "2 decoded" in first and "0 skipped" in first
    assert "0 decoded, 2 reused" in second


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_sweep_survives_a_failing_point_and_a_rerun_skips_finished_ones(tiny_demo_data, tmp_path):
    sweep = [*TINY_FINETUNE, f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}", "run_id=s",
             "init=random,ssl_barlowtwins", "data_fraction=pct10,pct100"]  # no pretraining run: ssl points fail
    run_cli("fetalssl-finetune", "-m", *sweep)
    runs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "finetune_sweep" / "s").glob("*/metrics.json")}
    assert len(runs) == 4
    status = {name: r["status"] for name, r in runs.items()}
    assert sorted(status.values()) == ["failed", "failed", "ok", "ok"]
    assert all(("init-ssl" in name) == (s == "failed") for name, s in status.items())
    assert all("is not a directory" in r["error"] for r in runs.values() if r["status"] == "failed")

    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "finetune_sweep" / "s").glob("*/metrics.json")
            if "init-random" in p.parent.name}
    rerun = run_cli("fetalssl-finetune", "-m", *sweep)
    assert rerun.stderr.count("completed with this config already") + rerun.stdout.count(
        "completed with this config already") == 2
    assert {p: p.stat().st_mtime_ns for p in done} == done

    report = run_cli("fetalssl-report", tmp_path / "finetune_sweep" / "s", check=False)
    assert "failed" in report.stdout.lower() and "random" in report.stdout


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_training_subset_matches_the_requested_fraction(tiny_demo_data, tmp_path):
    run_cli("fetalssl-finetune", *TINY_FINETUNE, f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}",
            "run_id=f", "data_fraction=pct25")
    run_dir = tmp_path / "finetune" / "random" / "f"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    subset = (run_dir / "train_subset.csv").read_text().splitlines()[1:]
    assert metrics["grid"]["fraction"] == 0.25 and len(subset) == metrics["train_size"]
    per_class = metrics["train_class_counts"]
    assert all(n >= 1 for n in per_class.values())
    full = run_cli("fetalssl-finetune", *TINY_FINETUNE, f"data.root={tiny_demo_data}",
                   f"paths.output_root={tmp_path}", "run_id=g", "data_fraction=pct100", "trainer.max_epochs=1")
    assert full.returncode == 0
    full_counts = json.loads((tmp_path / "finetune" / "random" / "g" / "metrics.json").read_text())["train_class_counts"]
    for label, n in per_class.items():
        assert n == max(1, int(0.25 * full_counts[label] + 0.5))


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_pretraining_is_reproducible_with_any_worker_count_and_a_new_seed_changes_it(tiny_demo_data, tmp_path):
    def pretrain(run_id, *extra):
        run_cli("fetalssl-train", *TINY_PRETRAIN, "method=moco", "method.shuffle_bn_groups=2",
                f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}", f"run_id={run_id}",
                f"data.cache_dir={tmp_path / 'cache'}", *extra)
        run = tmp_path / "pretrain" / "moco" / run_id
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        return state, (run / "logs" / "metrics.csv").read_text()

    # MoCo: every random source at once (weights, pairs, views, Shuffle-BN permutations, queue init)
    ref, ref_log = pretrain("a", "data.num_workers=0")
    for run_id, extra in (("b", "data.num_workers=0"), ("c", "data.num_workers=2")):
        state, log = pretrain(run_id, extra)
        assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref), run_id
        assert log == ref_log, run_id
    other, _ = pretrain("d", "seed=1")
    assert not torch.equal(other["backbone.conv1.weight"], ref["backbone.conv1.weight"])
    assert not torch.equal(other["queue.rows"], ref["queue.rows"])


def test_sweep_folder_names_can_be_pasted_into_another_command(tiny_demo_data, tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_cli("fetalssl-finetune", "-m", *TINY_FINETUNE, f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}",
            "run_id=p", "trainer.max_epochs=1", "data.patient_pattern='^(P[0-9]+)_'", "seed=0,1")
    points = sorted(p.parent for p in (tmp_path / "finetune_sweep" / "p").glob("*/metrics.json"))
    assert len(points) == 2
    for point in points:  # readable keys, the regex hashed, nothing the override parser chokes on
        assert "seed-" in point.name and "finetune_mode-linear" in point.name and "data.patient_pattern-h" in point.name
        override = OverridesParser.create().parse_override(f"model={point}")
        assert override.value() == str(point) and not override.is_sweep_override()
    overrides = (points[0] / ".hydra" / "overrides.yaml").read_text()
    assert "data.patient_pattern='^(P[0-9]+)_'" in overrides  # the full overrides are kept inside


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_pretraining_on_one_patient_warns_and_still_keeps_a_weights_only_best_checkpoint(tiny_demo_data, tmp_path):
    one = tmp_path / "one" / "videos"
    patient = sorted((tiny_demo_data / "videos").iterdir())[0]
    shutil.copytree(patient, one / patient.name)
    result = run_cli("fetalssl-train", *TINY_PRETRAIN, f"data.root={one.parent}", f"paths.output_root={tmp_path}",
                     "run_id=r", "method.warmup_epochs=100", "trainer.max_epochs=2")
    log = result.stdout + result.stderr
    assert "no validation split" in log and "chosen by train/loss instead of val/loss" in log
    assert "could not find the monitored key" not in log.lower()
    assert "warming up over" in log  # 100 warm-up epochs in a 2-epoch run: clamped, and said so
    checkpoints = tmp_path / "pretrain" / "barlowtwins" / "r" / "checkpoints"
    [best] = checkpoints.glob("best-*.ckpt")
    best_ckpt = torch.load(best, weights_only=True)
    last_ckpt = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best_ckpt and "optimizer_states" in last_ckpt  # resume needs only last.ckpt
    assert best_ckpt["state_dict"].keys() == last_ckpt["state_dict"].keys()
    assert not list(one.parent.rglob(".fetalssl_cache")) and (tmp_path / "frame_cache" / "index.json").is_file()


@pytest.mark.slow  # end to end through subprocesses: minutes on 2 cores
def test_a_sweep_mixing_inits_takes_init_checkpoint_and_trainer_keys_as_typed(tiny_demo_data, tmp_path):
    weights = tmp_path / "backbone.pt"
    torch.save(timm.create_model("resnet18", num_classes=0, pretrained=False).state_dict(), weights)
    run_cli("fetalssl-finetune", "-m", *TINY_FINETUNE, f"data.root={tiny_demo_data}", f"paths.output_root={tmp_path}",
            "run_id=mix", "init=random,ssl", f"init.checkpoint={weights}", "trainer.max_steps=3",
            "trainer.limit_val_batches=1")
    runs = {r["grid"]["init"]: r for r in (json.loads(p.read_text())
                                           for p in (tmp_path / "finetune_sweep" / "mix").glob("*/metrics.json"))}
    assert {k: r["status"] for k, r in runs.items()} == {"random": "ok", "ssl": "ok"}
    assert runs["ssl"]["init_weights"]["path"] == str(weights.resolve()) and runs["random"]["init_weights"] is None
