"""Backbones, heads, EMA, optimiser parts, decoder."""

import math
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import fetalssl
from fetalssl.methods.inpainting import random_rectangle_mask
from fetalssl.models.backbones import create_backbone as _create_backbone
from fetalssl.models.backbones import input_channels
from fetalssl.models.decoders import ConvDecoder
from fetalssl.models.ema import cosine_tau, ema_update, frozen_copy
from fetalssl.models.heads import MLP
from fetalssl.models.optim import LARS, parameter_groups, scaled_lr, warmup_cosine

CONF = Path(fetalssl.__file__).parent / "conf"


def create_backbone(name, in_chans, **kwargs):
    """The factory with conf/backbone's values for the keys a test does not set."""
    return _create_backbone(name, in_chans, **{"pretrained_path": None, "zero_init_last": False,
                                               "trust_pickle": False, **kwargs})


@pytest.mark.parametrize("config, dim", [("resnet18", 512), ("resnet50", 2048), ("convnext_tiny", 768),
                                         ("vit_small", 384)])
def test_backbone_yaml_builds_headless_timm_model(config, dim):
    cfg = OmegaConf.create({"data": {"channels": 1, "image_size": 32},
                            "backbone": OmegaConf.load(CONF / "backbone" / f"{config}.yaml")})
    model = instantiate(cfg.backbone)
    assert model.num_features == dim and input_channels(model) == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, dim)


def _last_bn_weights(model):
    return torch.cat([block.bn2.weight for block in model.layer1])


def test_zero_init_last_is_explicit():
    assert torch.all(_last_bn_weights(create_backbone("resnet18", 1, zero_init_last=True)) == 0)
    assert torch.all(_last_bn_weights(create_backbone("resnet18", 1, zero_init_last=False)) == 1)
    with pytest.raises(ValueError, match="ResNet-family"):
        create_backbone("convnext_tiny", 1, zero_init_last=True)


def test_load_weights_from_lightning_checkpoint_strips_prefixes(tmp_path):
    src = create_backbone("resnet18", 1)
    state = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    state["projector.0.weight"] = torch.zeros(3, 3)  # other method parts are ignored
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "last.ckpt")
    loaded = create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "last.ckpt"))
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_rgb_weights_into_grey_backbone_sums_channels(tmp_path):
    rgb = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=3)  # with an fc head
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "rgb.pt"))
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_load_weights_lists_missing_and_unexpected_keys(tmp_path):
    state = create_backbone("resnet18", 1).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*missing \(1\): \['layer1\.0\.conv1\.weight'\].*unexpected \(1\): \['extra\.weight'\]"):
        create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "nope.pt"))


class _Payload:
    """What a malicious weight file could carry: unpickling it calls os.system-like code."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_weight_files_load_as_tensors_only_unless_trusted(tmp_path, capsys):
    state = create_backbone("resnet18", 1).state_dict()
    torch.save({"state_dict": state, "payload": _Payload()}, tmp_path / "legacy.ckpt")
    with pytest.raises(ValueError, match=r"legacy\.ckpt.*backbone\.trust_pickle=true"):
        create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "legacy.ckpt"))
    assert "unpickled code ran" not in capsys.readouterr().out
    loaded = create_backbone("resnet18", 1, pretrained_path=str(tmp_path / "legacy.ckpt"), trust_pickle=True)
    assert "unpickled code ran" in capsys.readouterr().out  # the explicit switch is what lets it run
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])


def test_mlp_layout():
    mlp = MLP(in_dim=10, hidden_dims=[16, 16], out_dim=4, hidden_bn=True, last_bn=True)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not mlp[-1].affine and mlp.out_dim == 4
    assert mlp(torch.randn(5, 10)).shape == (5, 4)
    plain = MLP(in_dim=10, hidden_dims=[16], out_dim=4, hidden_bn=False, last_bn=False)
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"]
    assert plain[0].bias is not None and plain[-1].bias is not None


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(30, 100, 0.999, 0.999) == pytest.approx(0.999)


def test_ema_update_numbers():
    online = nn.BatchNorm1d(3)
    target = frozen_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.fill_(3.0)
        online.running_mean.fill_(5.0)
    ema_update(target, online, tau=0.9)
    assert torch.allclose(target.weight, torch.full((3,), 0.9 * 1 + 0.1 * 3))
    assert torch.equal(target.running_mean, online.running_mean)


def test_parameter_groups_exclude_bias_norm_and_frozen():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    frozen = frozen_copy(model)
    decay, no_decay = parameter_groups([model, frozen])
    assert [p.shape for p in decay["params"]] == [(3, 4)]
    assert len(no_decay["params"]) == 3  # linear bias, bn weight, bn bias
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] and not decay["lars_exclude"]


def test_vit_position_embedding_and_class_token_get_no_decay_nor_lars_inside_a_method():
    vit = create_backbone("vit_tiny_patch16_224", in_chans=1, img_size=32)
    wrapper = nn.ModuleDict({"backbone": vit, "head": nn.Linear(vit.num_features, 4)})  # as an SSL method holds it
    decay, no_decay = parameter_groups([wrapper])
    exempt = {id(vit.pos_embed), id(vit.cls_token)}
    assert exempt <= {id(p) for p in no_decay["params"]}
    assert not exempt & {id(p) for p in decay["params"]}
    assert all(p.ndim > 1 for p in decay["params"]) and id(wrapper["head"].weight) in {id(p) for p in decay["params"]}


def test_lars_update_numbers():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    lr, wd, eta = 0.1, 0.5, 0.01
    opt = LARS([{"params": [w], "lars_exclude": False}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    opt.step()
    update = torch.tensor([[0.0, 1.0]]) + wd * torch.tensor([[3.0, 4.0]])  # [1.5, 3.0]
    trust = eta * 5.0 / update.norm()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - lr * trust * update)
    assert torch.allclose(b, torch.tensor([1.0 - lr * 2.0]))  # plain SGD: no decay, no trust ratio


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)  # after warm-up steps: the base lr
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(99, 10, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


def test_scaled_lr_uses_global_batch():
    assert scaled_lr(0.2, 256, 1, 1) == pytest.approx(0.2)
    assert scaled_lr(0.2, 64, 4, 2) == pytest.approx(0.4)


@pytest.mark.parametrize("size", [32, 48])
def test_decoder_output_shape(size):
    dec = ConvDecoder(in_dim=16, out_chans=3, image_size=size, channels=[8, 8, 4, 4, 4])
    assert dec(torch.randn(2, 16)).shape == (2, 3, size, size)


def test_random_rectangle_mask_sizes():
    torch.manual_seed(0)
    mask = random_rectangle_mask((64, 40, 40), n_holes=1, min_frac=0.25, max_frac=0.25)
    assert torch.all(mask.sum(dim=(1, 2)) == 100)  # one 10 x 10 hole per image, always inside
    multi = random_rectangle_mask((64, 40, 40), n_holes=3, min_frac=0.1, max_frac=0.3)
    area = multi.float().mean(dim=(1, 2))
    assert torch.all(area > 0) and torch.all(area <= 3 * 0.09 + 1e-6)
