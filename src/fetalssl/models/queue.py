"""A fixed-size FIFO of embeddings (MoCo's negatives; NNCLR's nearest-neighbour support set), kept as buffers so it
is checkpointed with the model."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def enqueue_(queue: Tensor, ptr: Tensor, rows: Tensor) -> None:
    """Write ``rows`` into ``queue`` (K, D) from position ``ptr`` on, wrapping around, and move ``ptr`` (in place).

    More rows than K: only the last K are kept, as a longer FIFO would."""
    rows = rows[-len(queue):]
    idx = (ptr + torch.arange(len(rows), device=rows.device)) % len(queue)
    queue[idx] = rows.to(queue.dtype)
    ptr.copy_((ptr + len(rows)) % len(queue))


class EmbeddingQueue(nn.Module):
    """``size`` x ``dim`` rows, initialised to random unit vectors, plus a write pointer (both buffers).

    Rows are collected with ``add`` during the forward pass (every micro-batch under gradient accumulation) and
    written by ``flush`` after the optimiser step: writing in place during the forward would corrupt the autograd
    graph. ``flush`` all-gathers the collected rows, so every rank writes the rows of the global batch in the same
    order and the queues stay identical across ranks."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.pending: list[Tensor] = []

    def add(self, rows: Tensor) -> None:
        self.pending.append(rows.detach())

    def flush(self, all_gather: Callable[[Tensor], Tensor]) -> None:
        if not self.pending:
            return
        gathered = all_gather(torch.cat(self.pending)).reshape(-1, self.rows.shape[1])
        enqueue_(self.rows, self.ptr, gathered)
        self.pending.clear()
