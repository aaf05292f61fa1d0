"""Self-supervised losses as pure functions. Their coefficients have no defaults here: the method configs
(conf/method/*.yaml) are the one place that sets them, with the papers' values.

Each loss follows its paper's formula. Losses that need batch statistics (Barlow Twins, VICReg) or in-batch
negatives (NT-Xent) take ``gather``: when True and torch.distributed is initialised with more than one rank,
embeddings are all-gathered *with gradients* so statistics/negatives cover the global batch. All ranks must
then pass equally sized batches (use drop_last in DDP). Without an initialised process group it is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_BN_EPS = 1e-5  # nn.BatchNorm1d default, as used by the official Barlow Twins code


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (VICReg's FullGatherLayer;
    torch.distributed.nn.functional.all_gather does the same but is deprecated)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        summed = torch.stack(grads)
        dist.all_reduce(summed)
        return summed[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0; gradients flow back to every rank's slice."""
    if not _distributed():
        return x
    return torch.cat(_AllGather.apply(x), dim=0)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _off_diagonal(m: Tensor) -> Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _standardise(z: Tensor) -> Tensor:
    """Batch-normalise without affine: zero mean, unit (biased) variance per dimension."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + _BN_EPS)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float, gather: bool) -> Tensor:
    """Zbontar et al. 2021: push the cross-correlation of the two views' embeddings to the identity."""
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    c = _standardise(z1).T @ _standardise(z2) / z1.shape[0]
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float,
    std_coeff: float,
    cov_coeff: float,
    gather: bool,
    eps: float = 1e-4,  # the official code's constant, not a tuning knob
) -> Tensor:
    """Bardes et al. 2022, as in the official code: invariance + variance + covariance terms."""
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    std1 = torch.sqrt(z1.var(dim=0) + eps)
    std2 = torch.sqrt(z2.var(dim=0) + eps)
    variance = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1 = z1.T @ z1 / (n - 1)
    cov2 = z2.T @ z2 / (n - 1)
    covariance = _off_diagonal(cov1).pow(2).sum() / d + _off_diagonal(cov2).pow(2).sum() / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, gather: bool) -> Tensor:
    """Chen et al. 2020 (SimCLR) NT-Xent over 2N views.

    Each anchor's positive is the other view of the same image; the remaining 2N-2 views are negatives.
    With ``gather`` the local anchors are contrasted against the views of all ranks and positives are
    matched by global index.
    """
    n = z1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)  # local (2n, D): [view1; view2]
    if gather:
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    else:
        all1, all2 = z1, z2
    n_global = all1.shape[0]
    candidates = F.normalize(torch.cat([all1, all2]), dim=1)  # (2N, D): [view1 of all; view2 of all]
    logits = anchors @ candidates.T / temperature

    # Global index of each local sample, then of each anchor itself and of its positive.
    local = torch.arange(n, device=z1.device) + _rank() * n if gather else torch.arange(n, device=z1.device)
    self_idx = torch.cat([local, local + n_global])
    pos_idx = torch.cat([local + n_global, local])
    self_mask = F.one_hot(self_idx, 2 * n_global).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Grill et al. 2020: 2 - 2 cos(p, z) averaged over the batch; the target projection gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def simsiam_loss(p: Tensor, z: Tensor, stop_gradient: bool) -> Tensor:
    """Chen & He 2021: D(p, stopgrad(z)) = -cos(p, z) averaged over the batch. stop_gradient=False is the paper's
    collapsing ablation (section 4.1), kept only to show that the collapse monitor catches it."""
    return -F.cosine_similarity(p, z.detach() if stop_gradient else z, dim=1).mean()


def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """NNCLR's NN(z, Q): for each row of z, the most cosine-similar row of the support set (no gradient)."""
    similarity = F.normalize(z.detach(), dim=1) @ F.normalize(support, dim=1).T
    return support[similarity.argmax(dim=1)]


def nnclr_loss(neighbours: Tensor, p: Tensor, temperature: float, gather: bool) -> Tensor:
    """Dwibedi et al. 2021 (NNCLR), one direction: InfoNCE with each sample's support-set neighbour as the anchor,
    its other view's prediction as the positive and the other predictions of the batch as negatives:
    -log exp(nn_i . p_i / t) / sum_k exp(nn_i . p_k / t), on L2-normalised vectors. The neighbours get no
    gradient. With ``gather`` the predictions of all ranks are the candidates (the global batch)."""
    n = p.shape[0]
    anchors = F.normalize(neighbours.detach(), dim=1)
    candidates = F.normalize(gather_with_grad(p) if gather else p, dim=1)
    positives = torch.arange(n, device=p.device) + (_rank() * n if gather else 0)
    return F.cross_entropy(anchors @ candidates.T / temperature, positives)


def mocov3_loss(q: Tensor, k: Tensor, temperature: float, gather: bool) -> Tensor:
    """Chen, Xie & He 2021 (MoCo v3), one direction: InfoNCE of each query against the keys of the batch, its own
    key the positive, scaled by 2 * temperature as in the official code. Keys get no gradient; with ``gather``
    the keys of all ranks are the candidates (the global batch)."""
    n = q.shape[0]
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    if gather:
        k = gather_with_grad(k)  # detached: no gradient flows back through the gather
    positives = torch.arange(n, device=q.device) + (_rank() * n if gather else 0)
    return F.cross_entropy(q @ k.T / temperature, positives) * 2 * temperature


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """He et al. 2020 / Chen et al. 2020 (MoCo v2) InfoNCE.

    Each query's positive is its own key; the negatives are the queue rows (K, D). Keys and queue get no
    gradient. No ``gather`` is needed: the queue is made global by enqueuing all-gathered keys (see
    methods/moco.py), as in the official implementation.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = F.normalize(queue.detach(), dim=1)
    positives = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positives, negatives], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, student_temp: float,
              teacher_temp: float) -> Tensor:
    """Caron et al. 2021 (DINO) with multi-crop: the cross-entropy H(P_t, P_s) between the teacher's centred and
    sharpened distribution softmax((t - center) / teacher_temp) of each global view and the student's
    softmax(s / student_temp) of every other view, averaged over those (teacher view, student view) pairs.
    ``teacher`` holds the global views' outputs (no gradient), ``student`` every view's, globals first in the
    same order."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [-(q * lp).sum(dim=-1).mean() for i, q in enumerate(targets) for v, lp in enumerate(log_probs) if v != i]
    return torch.stack(terms).mean()


def dino_center(center: Tensor, batch_mean: Tensor, momentum: float) -> Tensor:
    """DINO's centre: an EMA of the teacher's mean output over the (global) batch."""
    return center * momentum + batch_mean * (1 - momentum)


def masked_patch_loss(pred: Tensor, patches: Tensor, mask: Tensor, normalise_targets: bool) -> Tensor:
    """He et al. 2022 (MAE): mean squared error per patch (B, N, P), averaged over the removed patches only
    (mask 1). ``normalise_targets``: each target patch standardised by its own mean and variance (the paper's
    normalised pixels, its default)."""
    if normalise_targets:
        patches = (patches - patches.mean(dim=-1, keepdim=True)) / (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - patches).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error against the clean frame."""
    return F.mse_loss(pred, target)
