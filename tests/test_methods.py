"""Each SSL method built from its YAML trains a few steps on CPU, checkpoints, and exports a timm backbone."""

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fetalssl
from fetalssl.evaluation import extract_features
from fetalssl.io import load_weights
from fetalssl.losses import nt_xent_loss
from fetalssl.methods.monitor import LinearProbeMonitor
from fetalssl.methods.two_view import TwoViewMethod
from fetalssl.models.backbones import create_backbone
from fetalssl.models.heads import MLP
from fetalssl.models.optim import LARS

CONF = Path(fetalssl.__file__).parent / "conf"
METHODS = ["barlowtwins", "vicreg", "simclr", "byol", "moco", "simsiam", "nnclr", "mocov3", "mocov3_vit", "dino",
           "mae", "autoencoder", "inpainting"]
DATA = {"batch_size": 8, "channels": 1, "image_size": 32}
SMALL_HEAD = {"hidden_dims": [32], "out_dim": 16}
SMALL = {  # shrink the paper-sized heads so the test runs in seconds
    "barlowtwins": {"projector": SMALL_HEAD},
    "vicreg": {"projector": SMALL_HEAD},
    "simclr": {"projector": SMALL_HEAD},
    "byol": {"projector": SMALL_HEAD, "predictor": SMALL_HEAD},
    "simsiam": {"projector": SMALL_HEAD, "predictor": {"hidden_dims": [8], "out_dim": 16}},
    "nnclr": {"projector": SMALL_HEAD, "predictor": {"hidden_dims": [8], "out_dim": 16}, "support_size": 32},
    "moco": {"projector": SMALL_HEAD, "queue_size": 32, "shuffle_bn_groups": 2},
    "mocov3": {"projector": SMALL_HEAD, "predictor": {"hidden_dims": [8], "out_dim": 16}},
    "mocov3_vit": {"projector": SMALL_HEAD, "predictor": {"hidden_dims": [8], "out_dim": 16}},
    "dino": {"head": {"hidden_dims": [32], "bottleneck_dim": 8, "out_dim": 64}},
    "mae": {"decoder": {"dim": 32, "depth": 1, "num_heads": 2}},
    "autoencoder": {"decoder": {"channels": [16, 16, 8, 8, 8]}},
    "inpainting": {"decoder": {"channels": [16, 16, 8, 8, 8]}},
}


def build(method, backbone=None, **overrides):
    """Compose the real train.yaml (method file, its augment preset, its backbone unless given) and shrink the
    heads."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", *([f"backbone={backbone}"] if backbone else []),
                                          *(f"data.{k}={v}" for k, v in DATA.items())])
    cfg = OmegaConf.merge(cfg, {"method": SMALL[method]}, {"method": overrides})
    return instantiate(cfg.method, backbone=instantiate(cfg.backbone))


class RandomPairs(Dataset):
    """Two 32 px views per sample, and ``n_local`` 16 px local crops (multi-crop) when asked."""

    def __init__(self, n=16, seed=0, n_local=0):
        g = torch.Generator().manual_seed(seed)
        self.v1 = torch.randn(n, 1, 32, 32, generator=g)
        self.v2 = self.v1 + 0.3 * torch.randn(n, 1, 32, 32, generator=g)
        self.locals = [self.v1[:, :, :16, :16] + 0.3 * torch.randn(n, 1, 16, 16, generator=g) for _ in range(n_local)]

    def __len__(self):
        return len(self.v1)

    def __getitem__(self, i):
        sample = {"view1": self.v1[i], "view2": self.v2[i]}
        if self.locals:
            sample["locals"] = [crop[i] for crop in self.locals]
        return sample


def loader(n_local=0):
    return DataLoader(RandomPairs(n_local=n_local), batch_size=8, drop_last=True)


def trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps, limit_val_batches=1, accelerator="cpu", devices=1, default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True), *callbacks],
    )


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_checkpoints_and_exports_backbone(method, tmp_path):
    torch.manual_seed(0)
    model = build(method)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    # The probe monitor rides along on one method rather than costing a run of its own.
    probe = [LinearProbeMonitor(labelled(4, 1), labelled(2, 2), every_n_epochs=1, knn=True, k=20, batch_size=256, max_iter=1000)] if method == "simclr" else []
    t = trainer(tmp_path, max_steps=2, callbacks=probe)
    n_local = 2 if method == "dino" else 0
    t.fit(model, loader(n_local), loader(n_local))

    assert t.global_step == 2
    for key in ("train/loss", "val/loss", "lr"):
        assert math.isfinite(t.callback_metrics[key].item()), key
    assert t.callback_metrics["lr"].item() > 0
    # Lightning checkpoints of every method load as plain weights (weights_only=True), so none needs trust_pickle.
    ckpt = load_weights(tmp_path / "ckpt" / "last.ckpt", trust_pickle=False, switch="backbone.trust_pickle")
    if method == "moco":  # the queue is a buffer, so it is checkpointed
        assert torch.equal(ckpt["state_dict"]["queue.rows"], model.queue.rows) and ckpt["state_dict"]["queue.ptr"] == 16
    if method == "nnclr":  # so is the support set, filled after each optimiser step with that step's embeddings
        assert torch.equal(ckpt["state_dict"]["support.rows"], model.support.rows) and ckpt["state_dict"]["support.ptr"] == 16
    if method == "dino":  # and DINO's centre, moved by the teacher outputs of each step
        assert torch.equal(ckpt["state_dict"]["center"], model.center) and model.center.abs().sum() > 0
    if method == "simclr":
        for key in ("probe/acc", "probe/macro_f1", "probe/knn_acc"):
            assert 0.0 <= t.callback_metrics[key].item() <= 1.0
        assert model.training
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())

    torch.save(model.backbone.state_dict(), tmp_path / "backbone.pt")
    vit = type(model.backbone).__name__ == "VisionTransformer"
    plain = timm.create_model("vit_small_patch16_224", num_classes=0, in_chans=1, img_size=32) if vit else \
        timm.create_model("resnet18", num_classes=0, in_chans=1)
    assert vit == (method in ("mocov3_vit", "mae"))  # the ViT recipes bring their backbone
    plain.load_state_dict(torch.load(tmp_path / "backbone.pt"), strict=True)


@pytest.mark.parametrize("method, backbone", [("autoencoder", "vit_small"), ("mocov3", "vit_small")])
def test_methods_work_with_other_backbones(method, backbone):
    model = build(method, backbone=backbone)
    batch = next(iter(loader()))
    loss = model.loss(batch)
    loss.backward()
    assert math.isfinite(loss.item())


def test_method_optimiser_scales_lr_by_world_size_and_steps_per_step():
    model = TwoViewMethod(
        backbone=create_backbone("resnet18", 1, pretrained_path=None, zero_init_last=False, trust_pickle=False),
        projector=partial(MLP, hidden_dims=[8], out_dim=4, hidden_bn=True, last_bn=False),
        criterion=partial(nt_xent_loss, temperature=0.5, gather=False),
        optimizer=partial(LARS, momentum=0.9, weight_decay=1e-6, eta=1e-3),
        base_lr=0.3, batch_size=32, warmup_epochs=2,
    )
    model.trainer = SimpleNamespace(world_size=4, accumulate_grad_batches=2, estimated_stepping_batches=50,
                                    num_training_batches=10, train_dataloader=loader())
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    base = 0.3 * 32 * 4 * 2 / 256
    assert sched["interval"] == "step" and model.total_steps == 50
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]
    for _ in range(10):  # 2 warm-up epochs of ceil(10 / 2) optimiser steps
        opt.step()
        sched["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx(base)
    for _ in range(40):
        opt.step()
        sched["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _target_state(model):
    """Target backbone weights (all of them get gradients online; the projector's last bias does not in BYOL,
    whose predictor starts with BatchNorm) and the MoCo queue."""
    target = model.target if hasattr(model, "target") else model.key_encoder
    state = {k: v.clone() for k, v in target.network[0].named_parameters()}
    if hasattr(model, "queue"):
        state["queue"] = model.queue.rows.clone()
    return state


@pytest.mark.parametrize("method, overrides", [
    ("byol", {"tau_base": 0.5}),
    ("moco", {"tau_base": 0.5, "tau_final": 0.5}),
])
def test_target_moves_in_training_only(method, overrides, tmp_path):
    torch.manual_seed(0)
    model = build(method, warmup_epochs=0, **overrides)
    start = _target_state(model)

    trainer(tmp_path / "val", max_steps=1).validate(model, loader(), verbose=False)
    for k, v in _target_state(model).items():
        assert torch.equal(v, start[k]), f"validation changed {k}"

    trainer(tmp_path / "fit", max_steps=1).fit(model, loader())
    after = _target_state(model)
    assert not [k for k in start if torch.equal(after[k], start[k])], "a target tensor did not move"
    if method == "moco":
        assert model.queue.ptr.item() == 8
        assert torch.equal(model.queue.rows[8:], start["queue"][8:])  # only one batch of keys enqueued


# --- Linear-probe monitor ----------------------------------------------------------------------------


def labelled(n_per_class, seed):
    """Five classes, each a fixed random pattern plus noise: linearly separable in any sane feature space."""
    patterns = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(5).repeat_interleave(n_per_class)
    return patterns[y] + 0.2 * torch.randn(len(y), 1, 32, 32, generator=g), y


def test_probe_monitor_scores_separable_data_and_restores_train_mode():
    backbone = timm.create_model("resnet18", num_classes=0, in_chans=1)
    backbone.train()
    monitor = LinearProbeMonitor(labelled(8, 1), lambda: labelled(4, 2), every_n_epochs=1, knn=True, k=5, batch_size=256, max_iter=1000)
    metrics = monitor.evaluate(backbone, torch.device("cpu"))
    assert backbone.training
    assert metrics["probe/acc"] == 1.0 and metrics["probe/macro_f1"] == 1.0 and metrics["probe/knn_acc"] == 1.0


def test_extract_features_is_detached_and_eval_mode():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9))
    backbone.train()
    loader = DataLoader(TensorDataset(torch.ones(4, 1, 2, 2), torch.arange(4)), batch_size=3)
    feats, labels = extract_features(backbone, loader, device=torch.device("cpu"))
    assert torch.equal(feats, torch.ones(4, 4)) and not feats.requires_grad  # dropout off in eval
    assert torch.equal(labels, torch.arange(4)) and backbone.training  # order kept, train mode restored


@pytest.mark.parametrize("method, preset", [("barlowtwins", "barlowtwins"), ("vicreg", "barlowtwins"),
                                            ("byol", "barlowtwins"), ("simclr", "simclr"), ("moco", "moco"),
                                            ("autoencoder", "autoencoder"), ("inpainting", "autoencoder")])
def test_method_selects_its_papers_views_unless_overridden(method, preset):
    with initialize_config_dir(str(CONF), version_base="1.3", job_name="t"):
        cfg = compose("train", overrides=[f"method={method}"], return_hydra_config=True)
        overridden = compose("train", overrides=[f"method={method}", "augment=ultrasound"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.augment == preset
    assert overridden.hydra.runtime.choices.augment == "ultrasound"


def test_rank_and_std_monitors_match_their_formulas_and_flag_a_constant_output():
    from fetalssl.methods.monitor import effective_rank, normalised_std

    z = torch.diag(torch.tensor([3.0, 1.0, 0.0])) + 0.0  # singular values 3, 1, 0
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(z) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert effective_rank(torch.eye(8)) == pytest.approx(8, rel=1e-6)
    spread = torch.nn.functional.normalize(torch.randn(4000, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    assert normalised_std(spread) * 16 ** 0.5 == pytest.approx(1.0, abs=0.02)  # uniform on the sphere: 1/sqrt(d)
    assert normalised_std(torch.ones(10, 16)) == 0.0 and effective_rank(torch.ones(10, 16)) == pytest.approx(1.0)


class _Collapsing(L.LightningModule):
    """A method whose backbone maps every input to (nearly) one point, or not."""

    def __init__(self, collapsed: bool):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 32))
        self.projector = torch.nn.Linear(32, 8)
        self.collapsed = collapsed

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize("collapsed", [True, False])
def test_collapse_monitor_logs_both_embeddings_and_warns_only_for_a_collapsed_run(collapsed, caplog):
    from fetalssl.methods.monitor import CollapseMonitor

    torch.manual_seed(0)
    module = _Collapsing(collapsed)
    if collapsed:
        with torch.no_grad():
            module.backbone[1].weight.mul_(1e-6)  # the output is the bias: one point for every input
    logged = {}
    module.log = lambda name, value: logged.__setitem__(name, value)
    monitor = CollapseMonitor(max_samples=24, min_rankme=2.0, min_std_x_sqrt_d=0.01, max_teacher_entropy=0.99,
                              min_teacher_marginal_entropy=0.05)
    fake_trainer = type("T", (), {"sanity_checking": False, "current_epoch": 3})()
    monitor.on_validation_epoch_start(fake_trainer, module)
    for i in range(4):  # 4 batches of 8: only the first 24 views count
        views = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(i))
        monitor.on_validation_batch_end(fake_trainer, module, None, {"view1": views}, i)
    with caplog.at_level("WARNING", logger="fetalssl.methods.monitor"):
        monitor.on_validation_epoch_end(fake_trainer, module)
    assert set(logged) == {f"monitor/{w}_{m}" for w in ("backbone", "projector") for m in ("rankme", "std_x_sqrt_d")}
    assert (logged["monitor/backbone_rankme"] < 2.0) == collapsed
    assert ("backbone embeddings have collapsed" in caplog.text) == collapsed


def test_nnclr_support_set_fills_in_training_only_one_batch_per_step(tmp_path):
    torch.manual_seed(0)
    model = build("nnclr", warmup_epochs=0)
    start = model.support.rows.clone()
    trainer(tmp_path / "val", max_steps=1).validate(model, loader(), verbose=False)
    assert torch.equal(model.support.rows, start) and model.support.ptr.item() == 0 and not model.support.pending
    trainer(tmp_path / "fit", max_steps=1).fit(model, loader())
    rows = model.support.rows
    assert model.support.ptr.item() == 8 and torch.equal(rows[8:], start[8:])
    assert torch.allclose(rows[:8].norm(dim=1), torch.ones(8))  # L2-normalised embeddings of that batch
    assert not torch.equal(rows[:8], start[:8])


def test_teacher_entropy_monitor_flags_uniform_and_one_prototype_teachers_of_a_real_dino(caplog):
    from fetalssl.methods.monitor import CollapseMonitor, entropies

    assert entropies(torch.full((4, 8), 1 / 8)) == pytest.approx((1.0, 1.0))
    assert entropies(torch.eye(8)[[0, 0, 0]]) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert entropies(torch.eye(8)) == pytest.approx((0.0, 1.0), abs=1e-12)  # confident, every prototype used

    def run(model):
        logged = {}
        model.log = lambda name, value: logged.__setitem__(name, value)
        monitor = CollapseMonitor(max_samples=16, min_rankme=0.0, min_std_x_sqrt_d=0.0, max_teacher_entropy=0.99,
                                  min_teacher_marginal_entropy=0.05)
        fake_trainer = type("T", (), {"sanity_checking": False, "current_epoch": 1})()
        caplog.clear()
        with torch.no_grad():
            monitor.on_validation_epoch_start(fake_trainer, model)
            for b in loader():
                monitor.on_validation_batch_end(fake_trainer, model, None, b, 0)
            monitor.on_validation_epoch_end(fake_trainer, model)
        return logged, "teacher has collapsed" in caplog.text

    torch.manual_seed(0)
    model = build("dino").eval()
    logged, warned = run(model)
    assert 0.05 < logged["monitor/teacher_marginal_entropy"] and logged["monitor/teacher_entropy"] < 0.99
    assert not warned
    model.center[0, 3] = -100.0  # prototype 3 wins for every input: the collapse that centring prevents
    logged, warned = run(model)
    assert logged["monitor/teacher_marginal_entropy"] < 0.05 and warned
    model.center.zero_()
    model.teacher.network[1].prototypes.zero_()  # every logit 0: uniform teacher outputs
    logged, warned = run(model)
    assert logged["monitor/teacher_entropy"] > 0.99 and warned
