"""What the console shows while a run works: a progress bar in a terminal, a log line every so often elsewhere
(CI, Slurm logs), and none of the harmless warnings and tips that would bury both."""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Known harmless messages, each seen in every run: silenced unless verbose=true.
HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper on torch >= 2.10
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",  # small fractions
    r".*does not have many workers which may be a bottleneck.*",  # the worker count is a config choice
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run's own checkpoints
    r"This DataLoader will create \d+ worker processes in total.*",  # data.num_workers is the user's choice
    r"Found \d+ module\(s\) in eval mode at the start of training.*",  # a frozen backbone stays in eval mode
    r"The image is already gray.*",  # ToGray on a gray view (augmented as one channel) is the no-op it should be
)
# Lightning's per-run chatter (devices found, seed set, checkpoint restored, the LitLogger tip, the stop reason).
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def configure_console(verbose: bool) -> None:
    """Quiet by default: the harmless warnings and Lightning's info lines go, fetalssl's own info stays.
    ``verbose`` brings everything back (and fetalssl's debug lines, such as confusion matrices)."""
    if verbose:
        logging.getLogger("fetalssl").setLevel(logging.DEBUG)
        return
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def is_terminal() -> bool:
    return sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def eta(elapsed: float, done: int, total: int) -> str:
    return format_duration(elapsed / done * (total - done)) if done else "?"


class ConsoleProgress(TQDMProgressBar):
    """Lightning's tqdm bar in a terminal; elsewhere a log line at most every ``log_every_seconds`` and one when
    training ends: epoch, optimiser step of the run's total, loss, elapsed time and ETA."""

    def __init__(self, log_every_seconds: float):
        super().__init__()
        self.log_every_seconds = log_every_seconds
        self.bars = is_terminal()
        if not self.bars:
            self.disable()
        self._start = self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run: ETA from the steps of this session

    def _log_line(self, trainer: L.Trainer, what: str) -> None:
        now = time.monotonic()
        self._last = now
        total = trainer.estimated_stepping_batches
        done = trainer.global_step - self._first_step
        total_text = "?" if math.isinf(total) else str(int(total))
        remaining = None if math.isinf(total) else int(total) - self._first_step
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f", loss {float(loss):.4f}" if loss is not None else ""
        log.info("%s: epoch %d, step %d/%s%s, %s elapsed, ETA %s", what, trainer.current_epoch, trainer.global_step,
                 total_text, loss_text, format_duration(now - self._start),
                 eta(now - self._start, done, remaining) if remaining else "?")

    def _due(self, trainer: L.Trainer) -> bool:
        return not self.bars and trainer.is_global_zero and time.monotonic() - self._last >= self.log_every_seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._due(trainer):
            self._log_line(trainer, "training")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._due(trainer):  # short epochs (a cached-feature probe) would otherwise print one line each
            self._log_line(trainer, "epoch done")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.bars and trainer.is_global_zero:
            self._log_line(trainer, "training done")


def progress(items: Iterable[T], total: int, what: str, log_every_seconds: float) -> Iterator[T]:
    """``items`` with a tqdm bar in a terminal, or a log line at most every ``log_every_seconds`` elsewhere:
    done of total, rate, elapsed, ETA. For the steps outside Lightning (decoding videos, predicting)."""
    if is_terminal():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what, unit="", dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= log_every_seconds or done == total:
            last = now
            log.info("%s: %d/%d, %.1f/s, %s elapsed, ETA %s", what, done, total, done / max(now - start, 1e-9),
                     format_duration(now - start), eta(now - start, done, total))
