"""Test helper callback (on PYTHONPATH in subprocess runs): hard-kill the process after optimiser step `step`,
before that step's checkpoint callback and log flush, as a preemption without warning would."""

import os

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os._exit(17)
