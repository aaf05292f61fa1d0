"""Standard-plane classifier: a (pretrained) backbone plus a linear head, trained in one of three modes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fetalssl.finetune.metrics import SCALAR_METRICS, metric_collection
from fetalssl.finetune.modes import frozen_subtrees, set_trainable
from fetalssl.models.optim import parameter_groups, warmup_cosine

log = logging.getLogger(__name__)


def linear_head(num_features: int, num_classes: int, feature_norm: bool) -> nn.Sequential:
    """The classifier head; with `feature_norm` a BatchNorm without affine parameters standardises the features
    first (as in MAE's linear probe), so one learning rate suits backbones whose features differ in scale."""
    norm = nn.BatchNorm1d(num_features, affine=False) if feature_norm else nn.Identity()
    return nn.Sequential(norm, nn.Linear(num_features, num_classes))


class PlaneClassifier(L.LightningModule):
    """Backbone -> (dropout) -> (feature norm) -> linear head over `classes`.

    trainable: "none" (linear probe: backbone frozen and always in eval mode, BN statistics untouched),
    "last_stage" (partial) or "all" (full); see fetalssl.finetune.modes. The backbone may be `nn.Identity()`
    when batches already hold features (cached linear probe); `num_features` is then the feature size.
    Optimiser: ``optimizer`` (a partial, conf/finetune.yaml classifier.optimizer: AdamW) with separate head /
    backbone learning rates; biases and norm weights get no weight decay; per-step linear warm-up over `warmup_fraction` of all steps, then cosine decay to 0.
    `class_weights` (N / N_c) weight the cross-entropy; None means unweighted. `init_weights` is the provenance
    of the backbone's starting weights (fetalssl.finetune.init.build_backbone), stored in every checkpoint.
    Logs {train,val,test}/loss and {val,test}/{macro_f1, balanced_accuracy, accuracy, f1_<class>}.
    """

    def __init__(self, backbone: nn.Module, num_features: int, classes: Sequence[str], trainable: str,
                 head_lr: float, backbone_lr: float, optimizer: Callable[..., Optimizer], warmup_fraction: float,
                 head_dropout: float, feature_norm: bool, class_weights: torch.Tensor | None,
                 init_weights: dict[str, str] | None):
        super().__init__()
        if head_dropout > 0 and trainable != "all":
            raise ValueError(f"head_dropout={head_dropout}: dropout is only used with full fine-tuning "
                             f"(trainable=all), not trainable={trainable}")
        if class_weights is not None and len(class_weights) != len(classes):
            raise ValueError(f"{len(class_weights)} class weights for {len(classes)} classes")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "class_weights", "init_weights"])
        self.optimizer_factory = optimizer
        self.init_weights = init_weights
        self.classes = list(classes)
        self.backbone = backbone
        self.trained_backbone_parameters = set_trainable(backbone, trainable)
        # Plain list, not a ModuleList: these modules are already registered under self.backbone.
        self._frozen = frozen_subtrees(backbone)
        self.dropout = nn.Dropout(head_dropout)
        self.head = linear_head(num_features, len(classes), feature_norm)
        self.register_buffer("class_weights", None if class_weights is None else class_weights.float())
        self.metrics = nn.ModuleDict({stage: metric_collection(len(classes)) for stage in ("val", "test")})
        self.confusion_matrices: dict[str, torch.Tensor] = {}
        # Lightning never calls train() at fit start (modules are in train mode from construction), so the
        # frozen parts must be switched to eval here as well as in train().
        self.train(self.training)

    def train(self, mode: bool = True) -> PlaneClassifier:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["init_weights"] = self.init_weights
        if not self.trained_backbone_parameters and self.init_weights is not None:
            # A frozen backbone is exactly its init file (path + sha256 recorded): store the head only, not a
            # copy of the backbone per sweep point.
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("backbone.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        if not any(k.startswith("backbone.") for k in state):  # head-only (above): the frozen backbone as it is
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.trained_backbone_parameters)):
            features = self.backbone(x)
        return self.head(self.dropout(features))

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.class_weights)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self._loss(logits, y), on_epoch=True, batch_size=len(y))
        self.metrics[stage].update(logits.argmax(1), y)

    def _eval_epoch_end(self, stage: str) -> None:
        computed = self.metrics[stage].compute()
        self.metrics[stage].reset()
        for name in SCALAR_METRICS:
            self.log(f"{stage}/{name}", computed[name])
        for name, value in zip(self.classes, computed["per_class_f1"], strict=True):
            self.log(f"{stage}/f1_{name}", value)
        self.confusion_matrices[stage] = computed["confusion_matrix"].cpu()
        # In the console only with verbose=true: run.py saves the test matrix as CSV and PNG.
        log.debug("%s confusion matrix (rows true, cols pred, %s):\n%s", stage, self.classes,
                  self.confusion_matrices[stage].numpy())

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self(x).softmax(1)

    def configure_optimizers(self):
        hp = self.hparams
        groups = []
        for module, lr in ((self.head, hp.head_lr), (self.backbone, hp.backbone_lr)):
            groups += [{**g, "lr": lr} for g in parameter_groups([module]) if g["params"]]
        optimizer = self.optimizer_factory(groups, lr=hp.head_lr)
        total_steps = int(self.trainer.estimated_stepping_batches)
        warmup_steps = round(hp.warmup_fraction * total_steps)
        scheduler = LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
