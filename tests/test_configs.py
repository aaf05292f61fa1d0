"""Every config choice composes and resolves; the paper's grid has the paper's 540 points."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fetalssl
import fetalssl.runtime  # noqa: F401  (the resolvers the console scripts register)

CONF = Path(fetalssl.__file__).parent / "conf"
RESOLVED_NODES = {"train": ("data", "pairs", "augment", "backbone", "method", "trainer"),
                  "finetune": ("data", "backbone", "init", "finetune_mode", "trainer", "classifier"),
                  "prepare": ("data",)}


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(config: str, overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=["paths.imagenet_weights=/weights.pth", "paths.fetalclip=/fetalclip",
                                         "paths.usfm=/usfm.pth", "paths.output_dir=/out", *overrides])
    for node in RESOLVED_NODES[config]:
        OmegaConf.to_container(cfg[node], resolve=True)  # raises on a dangling interpolation or missing value
    return cfg


@pytest.mark.parametrize("group", ["method", "backbone", "augment", "pairs", "trainer", "logger", "probe",
                                   "launcher"])
def test_every_pretraining_choice_composes(group):
    for choice in choices(group):
        composed("train", [f"{group}={choice}", "data.root=/data"])


@pytest.mark.parametrize("group", ["init", "finetune_mode", "data_fraction", "backbone", "trainer"])
def test_every_finetuning_choice_composes(group):
    # the files a user must name (??? in YAML) for the inits that load them
    required = {"open_clip": ["init.config=/m.json", "init.checkpoint=/m.pt"], "timm_file": ["init.checkpoint=/w.pt"]}
    for choice in choices(group):
        composed("finetune", [f"{group}={choice}", "data.root=/data", *required.get(choice, [])])


@pytest.mark.parametrize("config, experiment", [("train", "demo"), ("finetune", "demo_finetune"),
                                                ("finetune", "paper_grid"), ("train", "pocus"),
                                                ("finetune", "pocus_finetune"), ("train", "data_variance_demo"),
                                                ("train", "data_variance"), ("finetune", "published_baselines"),
                                                ("finetune", "all_methods_grid")])
def test_experiments_compose(config, experiment):
    composed(config, [f"experiment={experiment}", "data.root=/data"])


def test_paper_grid_is_the_papers_540_runs_with_one_label_per_init():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("finetune", overrides=["experiment=paper_grid"], return_hydra_config=True)
    params = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert len(list(itertools.product(*params.values()))) == 540
    assert cfg.backbone.name == "resnet50" and cfg.data.image_size == 224
    labels = set()
    for init in params["init"]:
        c = composed("finetune", ["experiment=paper_grid", f"init={init}", "data.root=/data"])
        labels.add((c.init.name, c.init.get("method")))
    assert len(labels) == 9
    assert {m for name, m in labels if name == "ssl"} == {
        "autoencoder", "inpainting", "simclr", "moco", "byol", "barlowtwins", "vicreg"}
    assert [c for c in choices("data_fraction")] and {float(composed("finetune", [f"data_fraction={f}",
        "data.root=/d"]).data.fraction) for f in params["data_fraction"]} == {0.01, 0.05, 0.1, 0.25, 0.5, 1.0}


def test_all_methods_grids_are_the_paper_grid_over_every_ssl_method_on_its_backbone():
    ssl_inits = {}
    for preset, backbone, baselines in (("all_methods_grid", "resnet50", 2), ("all_methods_grid_vit", "vit_small_patch16_224", 1)):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("finetune", overrides=[f"experiment={preset}"], return_hydra_config=True)
        params = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
        ssl_inits[preset] = [i.removeprefix("ssl_") for i in params["init"] if i.startswith("ssl_")]
        assert set(params) == {"init", "data_fraction", "finetune_mode", "seed"}
        assert len(list(itertools.product(*params.values()))) == (len(ssl_inits[preset]) + baselines) * 6 * 2 * 5
        assert cfg.backbone.name == backbone and cfg.data.image_size == 224
    assert set(ssl_inits["all_methods_grid_vit"]) == {"mae", "mocov3_vit"}  # the methods that need a ViT
    every = ssl_inits["all_methods_grid"] + ssl_inits["all_methods_grid_vit"]
    assert sorted(every) == choices("method")  # every method there is, each once


def run_with_stub_console_scripts(script: str, names: tuple[str, ...], tmp_path: Path) -> Path:
    """Run scripts/pocus/<script> (or scripts/<script> when it names a sub-folder) with stub console scripts that only append their arguments (\\x1f-separated,
    a line per call) to the returned log file."""
    import subprocess

    log = tmp_path / "calls.txt"
    for name in names:
        stub = tmp_path / "bin" / name
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\x1f" {name} "$@" >> {log}\necho >> {log}\n')
        stub.chmod(0o755)
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    subprocess.run(["bash", str(scripts / script if "/" in script else scripts / "pocus" / script),
                    str(tmp_path / "out")], check=True, env={"BIN": str(tmp_path / "bin"), "PATH": "/usr/bin:/bin"})
    return log


def test_pocus_reproduction_script_commands_compose(tmp_path):
    """Run scripts/pocus/reproduce.sh with stub console scripts that only record their arguments; every training
    run and the first point of every sweep must compose and resolve, and every report must compare real inits."""

    log = run_with_stub_console_scripts("reproduce.sh", ("fetalssl-extract-frames", "fetalssl-train", "fetalssl-finetune", "fetalssl-report"), tmp_path)
    calls = [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line]
    assert [c[0] for c in calls].count("fetalssl-train") == 3 and [c[0] for c in calls].count("fetalssl-finetune") == 8

    def first_point(override: str) -> str:  # a sweep "key=a,b" -> "key=a"; list values "[a,b]" are kept
        key, _, value = override.partition("=")
        return override if value.startswith("[") else f"{key}={value.split(',')[0]}"

    for name, *args in calls:
        if name == "fetalssl-train":
            cfg = composed("train", args)
            assert cfg.data.manifest.endswith("pocus_prepared/pretrain_manifest.csv")
        elif name == "fetalssl-finetune":
            assert args[0] == "-m"
            cfg = composed("finetune", [first_point(a) for a in args[1:]])
            assert cfg.data.classes[:3] == ["regular", "pneumonia", "covid"] and cfg.data.image_size == 64
        elif name == "fetalssl-report":
            compared = {side.split("@")[0] for i, a in enumerate(args) if a == "--compare" for side in args[i + 1:i + 3]}
            assert compared == {"hog", "random", "ssl:barlowtwins", "ssl:simclr", "ssl:byol"}


def test_pocus_cross_validation_script_composes_one_pretraining_per_fold_and_scan(tmp_path):
    """scripts/pocus/cross_validate.sh with stub console scripts: every call composes, each fold pretrains on its
    own manifest and fine-tunes that fold, and the report compares labels the sweep's grid really produces."""

    from conftest import scan_options

    log = run_with_stub_console_scripts("cross_validate.sh", ("fetalssl-extract-frames", "fetalssl-prepare", "fetalssl-train", "fetalssl-finetune",
                 "fetalssl-report"), tmp_path)
    calls = [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line]
    names = [c[0] for c in calls]
    assert names.count("fetalssl-train") == 10 and names.count("fetalssl-finetune") == 20
    pretrained = set()
    for name, *args in calls:
        if name == "fetalssl-extract-frames":
            assert "folds=5" in args
        elif name == "fetalssl-prepare":
            assert composed("prepare", args).scan.crop_to_sector
        elif name == "fetalssl-train":
            cfg = composed("train", args)
            fold = int(cfg.run_id.split("-")[1].removeprefix("fold"))
            assert cfg.data.manifest.endswith(f"pocus_prepared/pretrain_manifest_fold{fold}.csv")
            assert cfg.data.mean is None and cfg.scan.crop_to_sector == cfg.run_id.endswith("sector")
            method = next(a.split("=")[1] for a in args if a.startswith("method="))
            pretrained.add(f"{cfg.paths.output_root}/pretrain/{method}/{cfg.run_id}/backbone.pt")
        elif name == "fetalssl-finetune":
            cfg = composed("finetune", [a.split(",")[0] if "=" in a and not a.split("=", 1)[1].startswith("[")
                                        else a for a in args[1:]])
            assert cfg.data.folds == 5 and cfg.data.mean is None and f"fold{cfg.data.fold}" in cfg.run_id
            if cfg.init.name == "ssl":
                assert cfg.init.checkpoint in pretrained and f"fold{cfg.data.fold}-" in cfg.init.checkpoint
        elif name == "fetalssl-report":
            sides = {side for i, a in enumerate(args) if a == "--compare" for side in args[i + 1:i + 3]}
            labels = {f"{init} (scan={scan_options(s).label})" for s in ("keep", "sector")
                      for init in ("hog", "random", "ssl:simclr")}
            assert sides == labels


def test_pocus_data_variance_script_pretrains_three_budgets_and_fine_tunes_over_that_sweep(tmp_path):
    """scripts/pocus/data_variance.sh with stub console scripts: the pretraining sweep composes for each patient
    share at the same frame and pair budget, and the fine-tuning grid runs over that sweep's folder."""

    import fetalssl.runtime  # noqa: F401  (registers the frames_for_share resolver, as the console scripts do)

    log = run_with_stub_console_scripts("data_variance.sh", ("fetalssl-extract-frames", "fetalssl-train", "fetalssl-finetune", "fetalssl-report"), tmp_path)
    calls = {c[0]: c[1:] for c in (line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line)}
    train = calls["fetalssl-train"]
    budgets = next(a for a in train if a.startswith("data_budget=")).removeprefix("data_budget=").split(",")
    frames = {}
    for budget in budgets:
        cfg = composed("train", [a for a in train[1:] if not a.startswith("data_budget=")] + [f"data_budget={budget}"])
        assert cfg.data.pairs_per_epoch == 1024 and cfg.trainer.max_epochs == 10 and cfg.method.criterion._target_.endswith("nt_xent_loss")
        frames[cfg.data.patient_fraction] = cfg.data.frames_per_video
    assert frames == {0.25: 32, 0.5: 16, 1.0: 8}  # equal distinct frames: share x frames per video
    finetune = composed("finetune", [a.split(",")[0] for a in calls["fetalssl-finetune"][1:]])
    assert finetune.init.pretrain_sweep == f"{tmp_path / 'out'}/pretrain_sweep/variance"
    assert finetune.finetune_mode.cache_features and "seed=0,1,2" in calls["fetalssl-finetune"]


def test_new_methods_demo_script_pretrains_each_new_method_and_probes_it_against_random_init(tmp_path):
    """scripts/bench/new_methods_demo.sh with stub console scripts: every pretraining composes, DINO gets its
    multi-crop views despite experiment=demo, MAE its ViT, and the probes compare each with random init."""
    import fetalssl.runtime  # noqa: F401  (the resolvers the console scripts register)

    names = ("fetalssl-demo-data", "fetalssl-train", "fetalssl-finetune", "fetalssl-report")
    log = run_with_stub_console_scripts("bench/new_methods_demo.sh", names, tmp_path)
    calls = [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines() if line]
    trained = {}
    for call in (c for c in calls if c[0] == "fetalssl-train"):
        cfg = composed("train", call[1:])
        trained[cfg.method._target_.rsplit(".", 1)[-1] + ":" + next(a for a in call if a.startswith("method="))] = cfg
    methods = {key.split(":method=")[1]: cfg for key, cfg in trained.items()}
    assert sorted(methods) == ["dino", "mae", "mocov3", "nnclr", "simsiam"]
    assert methods["dino"].augment._target_.endswith("multi_crop") and methods["mae"].backbone.name.startswith("vit")
    assert {cfg.trainer.max_epochs for cfg in methods.values()} == {8}  # experiment=demo for every one
    sweeps = [c for c in calls if c[0] == "fetalssl-finetune"]
    inits = [next(a for a in c if a.startswith("init=")).removeprefix("init=").split(",") for c in sweeps]
    assert inits == [["random", "ssl_simsiam", "ssl_nnclr", "ssl_mocov3", "ssl_dino"], ["random", "ssl_mae"]]
    for sweep in sweeps:
        cfg = composed("finetune", [a.split(",")[0] for a in sweep[1:] if a != "-m"])
        assert cfg.finetune_mode.cache_features and cfg.data.fraction == 0.1
    assert "backbone=vit_small" in sweeps[1]


PRETRAINING_PRESETS = [p for p in choices("experiment") if "package _global_" in (CONF / "experiment" / f"{p}.yaml").read_text()
                       and "finetune" not in p and p not in ("paper_grid", "all_methods_grid", "all_methods_grid_vit",
                                                            "published_baselines")]


VIT_RECIPES = ("mae", "mocov3_vit")
# In the slow suite: ResNet-50 presets (~10x longer per step on a CPU) and presets built on another one (the
# data_variance_demo preset is the demo's plus data settings, which these two steps do not reach).
SLOW_PRESETS = {p for p in PRETRAINING_PRESETS
                if "override /backbone: resnet50" in (text := (CONF / "experiment" / f"{p}.yaml").read_text())
                or "\n  - demo\n" in text}


@pytest.mark.parametrize("preset, method", [
    pytest.param(preset, method, marks=[pytest.mark.slow] if preset in SLOW_PRESETS else [])
    for preset, method in itertools.product(PRETRAINING_PRESETS, choices("method"))])
def test_every_pretraining_preset_trains_every_method_for_two_steps(preset, method, tmp_path):
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from test_methods import RandomPairs

    # The ViT recipes with their ViT: a preset's own backbone (ResNet-18 on CPU) is the one they cannot use.
    vit = ["backbone=vit_small"] if method in VIT_RECIPES else []
    cfg = composed("train", [f"experiment={preset}", f"method={method}", "data.root=/data", "data.channels=1",
                             "data.image_size=32", "data.batch_size=16", *vit])
    model = instantiate(cfg.method, backbone=instantiate(cfg.backbone))  # the preset's heads with this method's
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = RandomPairs(n=32, n_local=2 if "locals" in cfg.augment else 0)
    trainer.fit(model, DataLoader(data, batch_size=16, drop_last=True))
    assert trainer.global_step == 2 and trainer.callback_metrics["train/loss"].isfinite()


def test_presets_change_method_specific_keys_only_through_method_preset_files():
    for preset in PRETRAINING_PRESETS:
        text = (CONF / "experiment" / f"{preset}.yaml").read_text()
        keys = OmegaConf.create(text).get("method", {})
        # only keys that mean the same for every method; the rest belongs in method_preset/<preset>_<method>.yaml
        assert set(keys) <= {"warmup_epochs"}, f"{preset} sets method keys {sorted(keys)}"


COMMON_TRAINER_KEYS = ["trainer.max_steps=100", "trainer.val_check_interval=0.5", "trainer.limit_train_batches=20",
                       "trainer.limit_val_batches=0.5", "trainer.limit_test_batches=1.0", "trainer.gradient_clip_val=1.0",
                       "trainer.accumulate_grad_batches=2", "trainer.check_val_every_n_epoch=2"]


@pytest.mark.parametrize("config", ["train", "finetune"])
@pytest.mark.parametrize("trainer", choices("trainer"))
def test_common_trainer_keys_work_as_typed_and_reach_lightning(config, trainer):
    from hydra.utils import instantiate

    cfg = composed(config, [f"trainer={trainer}", "data.root=/data", *COMMON_TRAINER_KEYS])
    assert (cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches) == (100, 2)
    if trainer != "cpu":
        return  # only a CPU trainer can be built here
    built = instantiate(cfg.trainer, default_root_dir="/tmp", enable_checkpointing=False, logger=False)
    assert (built.max_steps, built.val_check_interval, built.limit_train_batches, built.limit_val_batches,
            built.gradient_clip_val, built.accumulate_grad_batches, built.check_val_every_n_epoch) == (
        100, 0.5, 20, 0.5, 1.0, 2, 2)


def test_a_sweep_mixing_inits_takes_the_weight_keys_as_typed():
    # fetalssl-finetune -m init=random,imagenet,hog,ssl,ssl_byol init.checkpoint=... init.ssl_dir=...: every point
    for init in choices("init"):
        cfg = composed("finetune", [f"init={init}", "data.root=/data", "init.checkpoint=/w/backbone.pt",
                                    "init.ssl_dir=/w", "init.on_multiple=latest", "init.pretrained_path=/w/in1k.pth"])
        assert (cfg.init.checkpoint, cfg.init.ssl_dir, cfg.init.on_multiple) == ("/w/backbone.pt", "/w", "latest")
        assert cfg.init.pretrained_path == "/w/in1k.pth"
