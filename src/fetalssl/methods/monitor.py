"""Online representation monitors: linear probe (and optional kNN) on frozen backbone features, and collapse /
rank monitors on the validation views."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fetalssl.evaluation import extract_features, knn_predict

log = logging.getLogger(__name__)

Labelled = tuple[Tensor, Tensor]


class LinearProbeMonitor(L.Callback):
    """Every ``every_n_epochs`` validation epochs: fit a logistic regression on frozen features of
    ``train_images`` and log probe/acc and probe/macro_f1 on ``val_images`` (plus probe/knn_acc with ``knn``).

    Images are ``(X (N,C,H,W) float, y (N,) long)`` or a callable returning that (loaded on first use).
    """

    def __init__(
        self,
        train_images: Labelled | Callable[[], Labelled],
        val_images: Labelled | Callable[[], Labelled],
        every_n_epochs: int,
        knn: bool,
        k: int,
        batch_size: int,
        max_iter: int,
    ):
        self._sources = {"train": train_images, "val": val_images}
        self._data: dict[str, Labelled] = {}
        self.every_n_epochs = every_n_epochs
        self.knn = knn
        self.k = k
        self.batch_size = batch_size
        self.max_iter = max_iter

    def _get(self, split: str) -> Labelled:
        if split not in self._data:
            source = self._sources[split]
            self._data[split] = source() if callable(source) else source
        return self._data[split]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The reference point every later probe is read against: the same probe on the initial weights.
        if trainer.global_step == 0:
            metrics = self.evaluate(pl_module.backbone, pl_module.device)
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({f"{k}_initial": v for k, v in metrics.items()}, step=0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs != 0:
            return
        metrics = self.evaluate(pl_module.backbone, pl_module.device)
        for name, value in metrics.items():
            pl_module.log(name, value)

    def _loader(self, x: Tensor, y: Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)

    def evaluate(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        (x_train, y_train), (x_val, y_val) = self._get("train"), self._get("val")
        f_train, _ = extract_features(backbone, self._loader(x_train, y_train), device)
        f_val, _ = extract_features(backbone, self._loader(x_val, y_val), device)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=self.max_iter))
        probe.fit(f_train.numpy(), y_train.numpy())
        pred = probe.predict(f_val.numpy())
        y_true = y_val.numpy()
        metrics = {
            "probe/acc": float(accuracy_score(y_true, pred)),
            "probe/macro_f1": float(f1_score(y_true, pred, average="macro")),
        }
        if self.knn:
            knn_pred = knn_predict(f_train, y_train, f_val, self.k)
            metrics["probe/knn_acc"] = float((knn_pred == y_val).float().mean())
        log.info("probe: %s", metrics)
        return metrics


def effective_rank(z: Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the embeddings
    (N, D); between 1 (every embedding on one line) and min(N, D) (all directions used alike)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def normalised_std(z: Tensor) -> float:
    """Mean over dimensions of the std of the L2-normalised embeddings: about 1/sqrt(D) for embeddings spread
    over the sphere, 0 when every input maps to one point (SimSiam's collapse measure, Chen & He 2021, fig. 2)."""
    return float(torch.nn.functional.normalize(z.double(), dim=1).std(dim=0).mean())


def entropies(probs: Tensor) -> tuple[float, float]:
    """Mean entropy of the rows of ``probs`` (N, K) and entropy of their mean, both as fractions of log K: DINO's
    teacher collapses to uniform outputs when the first nears 1, onto one prototype when the second nears 0."""
    probs = probs.double()
    log_k = math.log(probs.shape[1])

    def entropy(p: Tensor) -> Tensor:
        return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)

    return float(entropy(probs).mean() / log_k), float(entropy(probs.mean(dim=0)) / log_k)


class CollapseMonitor(L.Callback):
    """On every validation epoch, the embeddings of the first ``max_samples`` validation views (view1), from the
    backbone and, for methods that have one, from the projector (what the loss sees): logs
    ``monitor/<where>_rankme`` and ``monitor/<where>_std_x_sqrt_d`` (normalised std times sqrt(D): 1 for
    embeddings spread over the sphere, about 0.1-0.2 for a ResNet's non-negative pooled features, 0 when
    collapsed), and warns when either falls below its threshold. For methods with a teacher distribution (DINO)
    it logs ``monitor/teacher_entropy`` and ``monitor/teacher_marginal_entropy`` (see :func:`entropies`) and warns
    above ``max_teacher_entropy`` or below ``min_teacher_marginal_entropy``."""

    def __init__(self, max_samples: int, min_rankme: float, min_std_x_sqrt_d: float, max_teacher_entropy: float,
                 min_teacher_marginal_entropy: float):
        self.max_samples = max_samples
        self.min_rankme = min_rankme
        self.min_std_x_sqrt_d = min_std_x_sqrt_d
        self.max_teacher_entropy = max_teacher_entropy
        self.min_teacher_marginal_entropy = min_teacher_marginal_entropy
        self._embeddings: dict[str, list[Tensor]] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._embeddings = {}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if sum(len(z) for z in self._embeddings.get("backbone", [])) >= self.max_samples:
            return
        features = pl_module.backbone(batch["view1"])
        self._embeddings.setdefault("backbone", []).append(features.float().cpu())
        projector = getattr(pl_module, "projector", None)
        if projector is not None:
            self._embeddings.setdefault("projector", []).append(projector(features).float().cpu())
        if hasattr(pl_module, "teacher_distribution"):
            self._embeddings.setdefault("teacher", []).append(pl_module.teacher_distribution(batch["view1"]).cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        teacher = self._embeddings.pop("teacher", None)
        if teacher is not None:
            self._check_teacher(trainer, pl_module, torch.cat(teacher)[: self.max_samples])
        for where, parts in self._embeddings.items():
            z = torch.cat(parts)[: self.max_samples]
            rank, spread = effective_rank(z), normalised_std(z) * z.shape[1] ** 0.5
            pl_module.log(f"monitor/{where}_rankme", rank)
            pl_module.log(f"monitor/{where}_std_x_sqrt_d", spread)
            if rank < self.min_rankme or spread < self.min_std_x_sqrt_d:
                log.warning("epoch %d: the %s embeddings have collapsed: effective rank %.2f (warn below %g), "
                            "normalised std x sqrt(D) %.3f (warn below %g) over %d validation views",
                            trainer.current_epoch, where, rank, self.min_rankme, spread, self.min_std_x_sqrt_d,
                            len(z))

    def _check_teacher(self, trainer: L.Trainer, pl_module: L.LightningModule, probs: Tensor) -> None:
        entropy, marginal = entropies(probs)
        pl_module.log("monitor/teacher_entropy", entropy)
        pl_module.log("monitor/teacher_marginal_entropy", marginal)
        if entropy > self.max_teacher_entropy or marginal < self.min_teacher_marginal_entropy:
            log.warning("epoch %d: the teacher has collapsed: mean entropy %.3f of log K (warn above %g: uniform "
                        "outputs), entropy of the mean %.3f of log K (warn below %g: one prototype) over %d "
                        "validation views", trainer.current_epoch, entropy, self.max_teacher_entropy, marginal,
                        self.min_teacher_marginal_entropy, len(probs))
