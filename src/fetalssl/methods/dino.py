"""DINO (Caron et al., 2021): self-distillation from an EMA teacher with centring and sharpening, multi-crop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fetalssl.losses import dino_center, dino_loss
from fetalssl.methods.base import Batch, SSLMethod
from fetalssl.models.ema import EMATarget


class DINO(SSLMethod):
    """Algorithm 1 of the paper, with multi-crop::

        crops = [view1, view2] + locals                      # conf/augment/multicrop.yaml
        s = [head(backbone(x)) for x in crops]               # student: every crop
        t = [teacher(x) for x in (view1, view2)]             # EMA of (backbone, head), no gradient
        loss = mean over pairs i != j of H(softmax((t_i - C) / tau_t), softmax(s_j / tau_s))
        after the optimiser step: teacher <- EMA of the student; C <- m * C + (1 - m) * mean(t)

    tau_t warms up linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    ``warmup_teacher_temp_epochs`` (per step). The centre is a buffer (checkpointed); it moves only after optimiser
    steps, by the mean teacher output over every micro-batch and every rank since the previous step, never in
    validation. The prototypes get no gradient in the first ``freeze_last_layer_epochs`` epochs (the paper's
    stabiliser). Crops of one size go through the networks together, so BatchNorm sees them as one batch.
    """

    def __init__(self, backbone: nn.Module, head: Callable[..., nn.Module], student_temp: float,
                 teacher_temp: float, warmup_teacher_temp: float, warmup_teacher_temp_epochs: float,
                 center_momentum: float, tau_base: float, tau_final: float, freeze_last_layer_epochs: int,
                 **base_kwargs):
        super().__init__(backbone, **base_kwargs)
        self.head = head(in_dim=backbone.num_features)
        self.teacher = EMATarget(nn.Sequential(self.backbone, self.head), tau_base, tau_final)
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.register_buffer("center", torch.zeros(1, self.head.out_dim))
        self._teacher_sums: list[Tensor] = []

    def teacher_temperature(self, step: int) -> float:
        warmup = self.epochs_to_steps(self.warmup_teacher_temp_epochs) if self.warmup_teacher_temp_epochs else 0
        if step >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / warmup

    def student(self, crops: list[Tensor]) -> list[Tensor]:
        """Student outputs of every crop, in order, one forward pass per crop size."""
        outputs: list[Tensor] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            outputs += self.head(self.backbone(torch.cat(crops[start:end]))).chunk(end - start)
            start = end
        return outputs

    def teacher_distribution(self, x: Tensor) -> Tensor:
        """The teacher's centred, sharpened distribution over the prototypes (what the student is trained on)."""
        return F.softmax((self.teacher(x) - self.center) / self.teacher_temperature(self.global_step), dim=-1)

    def loss(self, batch: Batch) -> Tensor:
        globals_ = [batch["view1"], batch["view2"]]
        teacher = self.teacher(torch.cat(globals_)).chunk(2)
        student = self.student(globals_ + list(batch.get("locals", [])))
        if self.training:
            outputs = torch.cat(teacher).float()  # summed in float32, also under bf16 autocast
            self._teacher_sums.append(torch.stack([outputs.sum(dim=0), torch.full_like(outputs[0], len(outputs))]))
        return dino_loss(student, teacher, self.center, self.student_temp,
                         self.teacher_temperature(self.global_step))

    def on_after_backward(self) -> None:
        if self.current_epoch < self.freeze_last_layer_epochs:
            self.head.prototypes.grad = None

    def after_optimizer_step(self, step: int) -> None:
        self.log("tau", self.teacher.update(step, self.total_steps))
        self.log("teacher_temp", self.teacher_temperature(step))
        # Sums and counts of every micro-batch of every rank: the mean teacher output of the global batch.
        total, count = self.all_gather(torch.stack(self._teacher_sums).sum(dim=0)).reshape(-1, 2,
                                                                                           self.head.out_dim).sum(0)
        self.center.copy_(dino_center(self.center, (total / count[0]).unsqueeze(0), self.center_momentum))
        self._teacher_sums.clear()
