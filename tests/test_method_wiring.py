"""Each method's loss is its paper's criterion on its own two views, with the config's values.

Built from the real YAML with non-default coefficients, every method's loss is compared with the criterion
computed independently from the method's parts; swapping or duplicating the views changes the loss as the
formula says. Wrong wiring (a view used twice, a loss made one-directional, a coefficient not passed through)
fails here."""

import math

import pytest
import torch
import torch.nn.functional as F

from fetalssl.losses import (
    barlow_twins_loss,
    byol_loss,
    dino_loss,
    masked_patch_loss,
    moco_loss,
    mocov3_loss,
    nearest_neighbours,
    nnclr_loss,
    nt_xent_loss,
    reconstruction_loss,
    simsiam_loss,
    vicreg_loss,
)
from fetalssl.models.ema import cosine_tau
from test_methods import RandomPairs, build

NOT_THE_PAPERS = {  # every coefficient away from its default, so a value left at the default shows
    "barlowtwins": {"criterion": {"lambd": 0.3}},
    "vicreg": {"criterion": {"sim_coeff": 3.0, "std_coeff": 7.0, "cov_coeff": 0.5}},
    "simclr": {"criterion": {"temperature": 0.9}},
    "moco": {"temperature": 0.7, "shuffle_bn": False},
    "byol": {},
    "simsiam": {},
    "nnclr": {"temperature": 0.7},
    "mocov3": {"criterion": {"temperature": 0.7}},
    "dino": {"student_temp": 0.3, "teacher_temp": 0.07, "warmup_teacher_temp": 0.07},
}


def views(n=8, seed=0):
    data = RandomPairs(n=n, seed=seed)
    return data.v1, data.v2


def batch(v1, v2):
    return {"view1": v1, "view2": v2}


def online_embedding(model, x):
    return model.projector(model.backbone(x))


def target_embedding(model, x):
    """The EMA copy of (backbone, projector), called part by part."""
    backbone, projector = model.target.network
    return projector(backbone(x))


def reference(name, model, v1, v2):
    """The paper's criterion from the method's parts, written out here (not through model.loss)."""
    z1, z2 = (online_embedding(model, v1), online_embedding(model, v2)) if hasattr(model, "projector") else (0, 0)
    if name == "barlowtwins":
        return barlow_twins_loss(z1, z2, lambd=0.3, gather=False)
    if name == "vicreg":
        return vicreg_loss(z1, z2, sim_coeff=3.0, std_coeff=7.0, cov_coeff=0.5, gather=False)
    if name == "simclr":
        return nt_xent_loss(z1, z2, temperature=0.9, gather=False)
    if name == "moco":
        with torch.no_grad():
            k = F.normalize(model.key_encoder.network[1](model.key_encoder.network[0](v2)), dim=1)
        return moco_loss(z1, k, model.queue.rows, temperature=0.7)
    if name == "byol":
        with torch.no_grad():
            t1, t2 = (target_embedding(model, v) for v in (v1, v2))
        return byol_loss(model.predictor(z1), t2) + byol_loss(model.predictor(z2), t1)
    if name == "nnclr":
        p1, p2 = model.predictor(z1), model.predictor(z2)
        nn1, nn2 = nearest_neighbours(z1, model.support.rows), nearest_neighbours(z2, model.support.rows)
        return (nnclr_loss(nn1, p2, 0.7, gather=False) + nnclr_loss(nn2, p1, 0.7, gather=False)) / 2
    if name == "mocov3":
        with torch.no_grad():
            t1, t2 = (target_embedding(model, v) for v in (v1, v2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        return mocov3_loss(p1, t2, 0.7, gather=False) + mocov3_loss(p2, t1, 0.7, gather=False)
    if name == "dino":
        backbone, head = model.teacher.network
        with torch.no_grad():
            teacher = head(backbone(torch.cat([v1, v2]))).chunk(2)
        student = model.head(model.backbone(torch.cat([v1, v2]))).chunk(2)
        return dino_loss(student, teacher, model.center, student_temp=0.3, teacher_temp=0.07)
    if name == "simsiam":
        p1, p2 = model.predictor(z1), model.predictor(z2)
        return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    raise KeyError(name)


@pytest.mark.parametrize("name", list(NOT_THE_PAPERS))
def test_loss_is_the_criterion_on_the_methods_own_views_with_the_config_values(name):
    torch.manual_seed(0)
    model = build(name, **NOT_THE_PAPERS[name]).train()
    v1, v2 = views()
    with torch.no_grad():
        loss = model.loss(batch(v1, v2))
        assert loss.item() == pytest.approx(reference(name, model, v1, v2).item(), rel=1e-5)
        swapped = model.loss(batch(v2, v1))
        duplicated = model.loss(batch(v1, v1))
    if name == "moco":  # asymmetric: queries from view1, keys from view2
        assert not math.isclose(swapped.item(), loss.item(), rel_tol=1e-4)
        assert swapped.item() == pytest.approx(reference(name, model, v2, v1).item(), rel=1e-5)
    else:  # symmetric criteria: the order of the views cannot matter
        assert swapped.item() == pytest.approx(loss.item(), rel=1e-5)
    assert not math.isclose(duplicated.item(), loss.item(), rel_tol=1e-3)  # both views reach the loss


def test_byol_loss_has_both_directions():
    torch.manual_seed(0)
    model = build("byol").train()
    v1, v2 = views()
    with torch.no_grad():
        z1, z2 = online_embedding(model, v1), online_embedding(model, v2)
        t1, t2 = (target_embedding(model, v) for v in (v1, v2))
        forward, backward = byol_loss(model.predictor(z1), t2), byol_loss(model.predictor(z2), t1)
        assert not math.isclose(forward.item(), backward.item(), rel_tol=1e-3)
        assert model.loss(batch(v1, v2)).item() == pytest.approx((forward + backward).item(), rel=1e-5)


def test_simsiam_gradient_reaches_the_encoder_only_through_the_predictor_side_unless_ablated():
    torch.manual_seed(0)
    v1, v2 = views()
    for stop_gradient in (True, False):
        model = build("simsiam", stop_gradient=stop_gradient).train()
        z2 = model.projector(model.backbone(v2))
        z2.retain_grad()
        p1 = model.predictor(model.projector(model.backbone(v1)))
        simsiam_loss(p1, z2, stop_gradient).backward()
        assert (z2.grad is None) == stop_gradient  # stopgrad(z): no gradient flows into the target branch


def test_autoencoder_reconstructs_view1_and_inpainting_fills_holes_against_the_clean_frame():
    v1, v2 = views()
    torch.manual_seed(0)
    ae = build("autoencoder").train()
    with torch.no_grad():
        loss = ae.loss(batch(v1, v2))
        assert loss.item() == pytest.approx(reconstruction_loss(ae.decoder(ae.backbone(v1)), v1).item(), rel=1e-5)
        assert ae.loss(batch(v1, v1 + 5)).item() == pytest.approx(loss.item(), rel=1e-6)  # view2 is unused

    torch.manual_seed(0)
    inpaint = build("inpainting", n_holes=2, min_hole_frac=0.3, max_hole_frac=0.4, fill_value=-3.0).train()
    with torch.no_grad():
        torch.manual_seed(5)
        loss = inpaint.loss(batch(v1, v2))
        torch.manual_seed(5)
        corrupted = inpaint.corrupt(v1)
        expected = reconstruction_loss(inpaint.decoder(inpaint.backbone(corrupted)), v1)  # target: the clean frame
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    holes = corrupted != v1
    assert 0.05 < holes.float().mean() < 0.5 and torch.all(corrupted[holes] == -3.0)


@pytest.mark.parametrize("name, target_attr", [("byol", "target"), ("moco", "key_encoder")])
def test_ema_follows_the_configured_cosine_schedule_at_several_steps(name, target_attr):
    model = build(name, tau_base=0.9, tau_final=0.99)
    model.total_steps = 10
    model.all_gather = lambda x: x  # one process
    online, target = model.backbone, getattr(model, target_attr)
    for step in (0, 5, 10):
        with torch.no_grad():
            for p in online.parameters():
                p.fill_(1.0)
            for p in target.parameters():
                p.fill_(0.0)
        model.after_optimizer_step(step)
        tau = 0.99 - (0.99 - 0.9) * (math.cos(math.pi * step / 10) + 1) / 2
        assert tau == pytest.approx(cosine_tau(step, 10, 0.9, 0.99))
        got = next(target.parameters()).flatten()[0].item()
        assert got == pytest.approx(1 - tau, abs=1e-6), f"step {step}"  # target <- tau * 0 + (1 - tau) * 1
    assert [round(cosine_tau(s, 10, 0.9, 0.99), 6) for s in (0, 10)] == [0.9, 0.99]


def test_dino_local_crops_reach_the_student_only_and_the_centre_moves_after_steps_only():
    torch.manual_seed(0)
    model = build("dino", student_temp=0.3).train()
    data = RandomPairs(n=8, n_local=2)
    two = batch(data.v1, data.v2)
    crops = {**two, "locals": data.locals}
    with torch.no_grad():
        with_locals, without = model.loss(crops), model.loss(two)
        changed = model.loss({**two, "locals": [data.locals[0], data.locals[0] + 1]})
        teacher = [t for t in model.teacher(torch.cat([data.v1, data.v2])).chunk(2)]
        backbone, head = model.backbone, model.head
        student = [*head(backbone(torch.cat([data.v1, data.v2]))).chunk(2),
                   *head(backbone(torch.cat(data.locals))).chunk(2)]
        expected = dino_loss(student, teacher, model.center, 0.3, model.teacher_temperature(0))
    assert with_locals.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not math.isclose(with_locals.item(), without.item(), rel_tol=1e-4)
    assert not math.isclose(changed.item(), with_locals.item(), rel_tol=1e-4)
    # The centre: untouched by the forward passes, then the EMA of the mean teacher output of those 3 passes.
    assert torch.equal(model.center, torch.zeros_like(model.center))
    model.total_steps, model.all_gather = 10, (lambda x: x)
    model.after_optimizer_step(0)
    mean = torch.cat([*teacher, *teacher, *teacher]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(model.center, 0.1 * mean, rtol=1e-5, atol=1e-7)


def test_dino_teacher_temperature_warms_up_linearly_per_step_then_holds():
    model = build("dino", warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2)
    model.epochs_to_steps = lambda epochs: int(epochs * 5)
    assert [round(model.teacher_temperature(s), 6) for s in (0, 5, 10, 20)] == [0.04, 0.055, 0.07, 0.07]


def test_mae_reconstructs_masked_patches_of_view1_with_the_configured_ratio_and_targets():
    from fetalssl.models.masking import encode_visible, patchify

    torch.manual_seed(0)
    model = build("mae", mask_ratio=0.5, normalise_targets=False).train()
    v1, v2 = views()
    with torch.no_grad():
        torch.manual_seed(3)
        loss = model.loss(batch(v1, v2))
        torch.manual_seed(3)
        encoded, mask, restore = encode_visible(model.backbone, v1, 0.5)
        expected = masked_patch_loss(model.decoder(encoded, restore), patchify(v1, 16), mask, False)
        torch.manual_seed(3)
        unused_view2 = model.loss(batch(v1, v2 + 5))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert unused_view2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert encoded.shape[1] == 1 + 2 and mask.sum(dim=1).tolist() == [2.0] * len(v1)  # 4 patches at 32 px, half kept


def test_random_masking_keeps_the_share_asked_and_restore_puts_tokens_back():
    from fetalssl.models.masking import patchify, random_masking

    tokens = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    kept, mask, restore = random_masking(tokens, 0.75)
    assert kept.shape == (2, 2, 3) and mask.sum(dim=1).tolist() == [6.0, 6.0]
    for b in range(2):  # the kept tokens are exactly the unmasked positions
        assert sorted(kept[b, :, 0].tolist()) == sorted(tokens[b, mask[b] == 0, 0].tolist())
    placed = torch.gather(torch.cat([kept, torch.zeros(2, 6, 3)], dim=1), 1, restore[..., None].expand(-1, -1, 3))
    assert torch.equal(placed[mask == 0], tokens[mask == 0])
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 8) and patches[0, 1].tolist() == [2.0, 18.0, 3.0, 19.0, 6.0, 22.0, 7.0, 23.0]


def test_mocov3_vit_keeps_its_random_patch_projection_and_trains_the_rest(tmp_path):
    from test_methods import loader, trainer

    torch.manual_seed(0)
    model = build("mocov3_vit", warmup_epochs=0)
    patch = {k: v.clone() for k, v in model.backbone.patch_embed.state_dict().items()}
    blocks = {k: v.clone() for k, v in model.backbone.blocks.state_dict().items()}
    trainer(tmp_path, max_steps=2).fit(model, loader())
    assert all(torch.equal(v, patch[k]) for k, v in model.backbone.patch_embed.state_dict().items())
    assert any(not torch.equal(v, blocks[k]) for k, v in model.backbone.blocks.state_dict().items())


def test_dino_prototypes_get_no_gradient_in_the_first_epochs_then_do(monkeypatch):
    model = build("dino", freeze_last_layer_epochs=1).train()
    data = RandomPairs(n=8, n_local=0)
    epoch = {"now": 0}
    monkeypatch.setattr(type(model), "current_epoch", property(lambda self: epoch["now"]))
    for now, frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        epoch["now"] = now
        model.loss(batch(data.v1, data.v2)).backward()
        model.on_after_backward()
        assert (model.head.prototypes.grad is None) == frozen, now
        assert model.backbone.conv1.weight.grad is not None  # the rest trains from the start


def test_mae_names_what_it_needs_of_its_backbone():
    from fetalssl.models.masking import check_maskable

    resnet = build("barlowtwins").backbone
    with pytest.raises(ValueError, match="timm VisionTransformer backbone.*got"):
        check_maskable(resnet)
    vit = build("mae").backbone
    assert check_maskable(vit) is vit
    vit.reg_token = torch.nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
    with pytest.raises(ValueError, match="no register tokens"):
        check_maskable(vit)
