"""Each loss vs. a plainly written loop implementation, gradient sanity, optimisability and DDP gathering."""

import math
import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

from fetalssl.losses import (
    barlow_twins_loss,
    byol_loss,
    dino_center,
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

N, D = 6, 4


def _mean(xs):
    return sum(xs) / len(xs)


def _col(z, j):
    return [float(z[b, j]) for b in range(z.shape[0])]


def _cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)))


def ref_barlow(z1, z2, lambd):
    n, d = z1.shape

    def standardise(z):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            col = _col(z, j)
            mu = _mean(col)
            var = _mean([(x - mu) ** 2 for x in col])  # biased, as BatchNorm
            for b in range(n):
                out[b][j] = (col[b] - mu) / math.sqrt(var + 1e-5)
        return out

    a, b_ = standardise(z1), standardise(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[b][i] * b_[b][j] for b in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def ref_vicreg(z1, z2, sim_coeff, std_coeff, cov_coeff, eps):
    n, d = z1.shape
    inv = _mean([(float(z1[b, j]) - float(z2[b, j])) ** 2 for b in range(n) for j in range(d)])

    def var_cov(z):
        cols = [_col(z, j) for j in range(d)]
        mus = [_mean(c) for c in cols]
        cov = [[sum((cols[i][b] - mus[i]) * (cols[j][b] - mus[j]) for b in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        std_term = _mean([max(0.0, 1 - math.sqrt(cov[j][j] + eps)) for j in range(d)])
        off = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return std_term, off

    s1, c1 = var_cov(z1)
    s2, c2 = var_cov(z2)
    return sim_coeff * inv + std_coeff * (s1 + s2) / 2 + cov_coeff * (c1 + c2)


def ref_nt_xent(z1, z2, t):
    views = [z1[b] for b in range(len(z1))] + [z2[b] for b in range(len(z2))]
    n2 = len(views)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(math.exp(_cos(views[i], views[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(_cos(views[i], views[pos]) / t) / denom)
    return total / n2


def ref_byol(p, z):
    return _mean([2 - 2 * _cos(p[b], z[b]) for b in range(len(p))])


def ref_moco(q, k, queue, t):
    total = 0.0
    for b in range(len(q)):
        pos = math.exp(_cos(q[b], k[b]) / t)
        neg = sum(math.exp(_cos(q[b], queue[r]) / t) for r in range(len(queue)))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def ref_mse(pred, target):
    flat_p, flat_t = pred.flatten().tolist(), target.flatten().tolist()
    return _mean([(a - b) ** 2 for a, b in zip(flat_p, flat_t, strict=True)])


VICREG = {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "gather": False}  # the paper's


@pytest.fixture
def z():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)


def test_barlow_matches_reference(z):
    assert barlow_twins_loss(*z, lambd=0.0051, gather=False).item() == pytest.approx(ref_barlow(*z, 0.0051), rel=1e-9)
    assert barlow_twins_loss(*z, lambd=0.3, gather=False).item() == pytest.approx(ref_barlow(*z, 0.3), rel=1e-9)


def test_vicreg_matches_reference(z):
    # Scale one branch down so the variance hinge is active for some dimensions.
    z1, z2 = z[0], z[1] * torch.tensor([0.3, 2.0, 0.5, 1.5], dtype=torch.float64)
    assert vicreg_loss(z1, z2, **VICREG).item() == pytest.approx(ref_vicreg(z1, z2, 25.0, 25.0, 1.0, 1e-4), rel=1e-9)
    got = vicreg_loss(z1, z2, sim_coeff=1.0, std_coeff=2.0, cov_coeff=3.0, gather=False, eps=1e-2).item()
    assert got == pytest.approx(ref_vicreg(z1, z2, 1.0, 2.0, 3.0, 1e-2), rel=1e-9)


def test_nt_xent_matches_reference(z):
    assert nt_xent_loss(*z, temperature=0.5, gather=False).item() == pytest.approx(ref_nt_xent(*z, 0.5), rel=1e-9)
    assert nt_xent_loss(*z, temperature=0.1, gather=False).item() == pytest.approx(ref_nt_xent(*z, 0.1), rel=1e-9)


def test_byol_matches_reference_and_detaches_target(z):
    p, t = z[0].clone().requires_grad_(), z[1].clone().requires_grad_()
    loss = byol_loss(p, t)
    assert loss.item() == pytest.approx(ref_byol(*z), rel=1e-9)
    loss.backward()
    assert t.grad is None and p.grad.abs().sum() > 0


def test_moco_matches_reference(z):
    queue = torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert moco_loss(*z, queue, temperature=0.2).item() == pytest.approx(ref_moco(*z, queue, 0.2), rel=1e-9)
    assert moco_loss(*z, queue, temperature=0.07).item() == pytest.approx(ref_moco(*z, queue, 0.07), rel=1e-9)


def test_reconstruction_matches_reference():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    assert reconstruction_loss(pred, target).item() == pytest.approx(ref_mse(pred, target), rel=1e-6)


def _two(*shape):
    return [torch.nn.Parameter(torch.randn(*shape)) for _ in range(2)]


QUEUE = torch.randn(16, 8)
CASES = {
    "barlow": (lambda: _two(16, 8), partial(barlow_twins_loss, lambd=0.0051, gather=False)),
    "vicreg": (lambda: _two(16, 8), partial(vicreg_loss, **VICREG)),
    "nt_xent": (lambda: _two(16, 8), partial(nt_xent_loss, temperature=0.5, gather=False)),
    "byol": (lambda: _two(16, 8), byol_loss),
    "moco": (lambda: _two(16, 8), lambda q, k: moco_loss(q, k, QUEUE, temperature=0.2)),
    "reconstruction": (lambda: [torch.nn.Parameter(torch.randn(4, 1, 4, 4)), torch.randn(4, 1, 4, 4)],
                       reconstruction_loss),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_has_finite_grads_and_falls_when_optimised(name):
    torch.manual_seed(0)
    make, loss_fn = CASES[name]
    tensors = make()
    params = [t for t in tensors if isinstance(t, torch.nn.Parameter)]
    opt = torch.optim.Adam(params, lr=0.05)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = loss_fn(*tensors)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        first = loss.item() if first is None else first
        opt.step()
    assert loss_fn(*tensors).item() < 0.8 * first


# --- DDP: gathering over 2 gloo ranks equals the single-process loss on the concatenated batch ---------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GATHERED = {"barlow": partial(barlow_twins_loss, lambd=0.0051),
            "vicreg": partial(vicreg_loss, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
            "nt_xent": partial(nt_xent_loss, temperature=0.5),
            "mocov3": partial(mocov3_loss, temperature=0.2)}


def _ddp_worker(rank, world, port, z1, z2, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = len(z1) // world
        for name, fn in GATHERED.items():
            a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
            b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
            loss = fn(a, b, gather=True)
            loss.backward()
            out[f"{name}_{rank}"] = (loss.detach(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_gather_equals_global_batch_loss():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    world = 2
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(world, _free_port(), z1, z2, out), nprocs=world, join=True)
    for name, fn in GATHERED.items():
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        full = fn(a, b, gather=False)
        full.backward()
        rank_losses = [out[f"{name}_{r}"][0] for r in range(world)]
        # Barlow/VICReg: every rank computes the global loss; NT-Xent: the global loss is the mean over ranks.
        assert torch.stack(rank_losses).mean().item() == pytest.approx(full.item(), rel=1e-9)
        for r in range(world):
            _, ga, gb = out[f"{name}_{r}"]
            # Gradients are summed over ranks' losses; DDP's averaging then divides by world size.
            assert torch.allclose(ga / world, a.grad[r * 4:(r + 1) * 4]), name
            if name == "mocov3":  # the keys are constants
                assert gb is None and b.grad is None
            else:
                assert torch.allclose(gb / world, b.grad[r * 4:(r + 1) * 4]), name


def test_simsiam_is_the_negative_mean_cosine_and_stops_the_target_gradient():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g, requires_grad=True)
    expected = -sum(float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(6)) / 6
    loss = simsiam_loss(p, z, stop_gradient=True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    p.grad = None
    simsiam_loss(p, z, stop_gradient=False).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the ablation lets it through


def test_nnclr_neighbour_is_the_most_cosine_similar_support_row_and_the_loss_is_its_infonce():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(10, 4, generator=g)
    z = torch.randn(5, 4, generator=g, requires_grad=True)
    nn = nearest_neighbours(z, support)
    for i in range(5):
        cos = [float(z[i] @ q / (z[i].norm() * q.norm())) for q in support]
        assert torch.equal(nn[i], support[max(range(10), key=cos.__getitem__)])
    p = torch.randn(5, 4, generator=g, requires_grad=True)
    loss = nnclr_loss(nn, p, temperature=0.3, gather=False)
    unit = lambda v: v / v.norm()  # noqa: E731
    expected = 0.0
    for i in range(5):
        logits = [float(unit(nn[i]) @ unit(p[k])) / 0.3 for k in range(5)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad.abs().sum() > 0  # the neighbour is a constant for the gradient


# --- MoCo v3, DINO, MAE: each against a loop over its formula, values and gradients -------------------------


def ref_mocov3(q, k, t):
    """-log exp(cos(q_i, k_i) / t) / sum_j exp(cos(q_i, k_j) / t), averaged, times 2t; torch ops for autograd."""
    total = 0
    for i in range(len(q)):
        logits = torch.stack([torch.nn.functional.cosine_similarity(q[i], k[j], dim=0) / t for j in range(len(k))])
        total = total - (logits[i] - torch.logsumexp(logits, dim=0))
    return total / len(q) * 2 * t


def test_mocov3_matches_its_formula_in_value_and_gradient_and_keys_get_none(z):
    for t in (1.0, 0.2):
        q, k = z[0].clone().requires_grad_(), z[1].clone().requires_grad_()
        loss = mocov3_loss(q, k, temperature=t, gather=False)
        q_ref = z[0].clone().requires_grad_()
        expected = ref_mocov3(q_ref, z[1], t)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
        loss.backward()
        expected.backward()
        assert torch.allclose(q.grad, q_ref.grad) and k.grad is None


def ref_dino(student, teacher, center, ts, tt):
    total, pairs = 0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            for b in range(len(t)):
                target = torch.exp((t[b] - center[0]) / tt) / torch.exp((t[b] - center[0]) / tt).sum()
                log_p = s[b] / ts - torch.log(torch.exp(s[b] / ts).sum())
                total = total - (target * log_p).sum() / len(t)
            pairs += 1
    return total / pairs


def test_dino_matches_its_formula_pairs_no_view_with_itself_and_the_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    student = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    center = torch.randn(1, 5, generator=g, dtype=torch.float64)
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    ref_student = [s.detach().clone().requires_grad_() for s in student]
    expected = ref_dino(ref_student, [t.detach() for t in teacher], center, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    loss.backward()
    expected.backward()
    for got, want in zip(student, ref_student, strict=True):
        assert torch.allclose(got.grad, want.grad)
    assert all(t.grad is None for t in teacher)


def test_dino_centre_removes_a_shift_shared_by_teacher_and_centre_and_moves_as_an_ema():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(4, 6, generator=g) for _ in range(2)]
    student = [torch.randn(4, 6, generator=g) for _ in range(3)]
    center = torch.randn(1, 6, generator=g)
    shift = torch.randn(1, 6, generator=g)
    base = dino_loss(student, teacher, center, 0.1, 0.04)
    assert dino_loss(student, [t + shift for t in teacher], center + shift, 0.1, 0.04).item() == \
        pytest.approx(base.item(), rel=1e-5)
    assert not math.isclose(dino_loss(student, teacher, center + shift, 0.1, 0.04).item(), base.item(),
                            rel_tol=1e-3)
    mean = torch.randn(1, 6, generator=g)
    assert torch.allclose(dino_center(center, mean, 0.9), 0.9 * center + 0.1 * mean)


def test_masked_patch_loss_averages_normalised_errors_over_removed_patches_only():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    patches = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.float64)
    for normalise in (False, True):
        errors = []
        for b in range(2):
            for n in range(4):
                if mask[b, n]:
                    target = patches[b, n].tolist()
                    if normalise:
                        mean = sum(target) / 6
                        var = sum((x - mean) ** 2 for x in target) / 5  # unbiased, as the official code
                        target = [(x - mean) / math.sqrt(var + 1e-6) for x in target]
                    errors.append(_mean([(p - t) ** 2 for p, t in zip(pred[b, n].tolist(), target, strict=True)]))
        got = masked_patch_loss(pred, patches, mask, normalise_targets=normalise).item()
        assert got == pytest.approx(_mean(errors), rel=1e-9)
    changed = pred.clone()
    changed[0, 1] += 5  # a visible patch: no effect
    assert masked_patch_loss(changed, patches, mask, True).item() == pytest.approx(
        masked_patch_loss(pred, patches, mask, True).item(), rel=1e-12)
