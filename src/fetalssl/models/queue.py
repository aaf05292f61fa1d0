"""A fixed-size FIFO of embeddings (MoCo's negatives; nearest-neighbour supports), kept as buffers so it is
checkpointed with the model."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def enqueue_(queue: Tensor, ptr: Tensor, rows: Tensor) -> None:
    """Write ``rows`` into ``queue`` (K, D) from position ``ptr`` on, wrapping around, and move ``ptr`` (in place).

    More rows than K: only the last K are kept, as a longer FIFO would."""
    rows = rows[-len(queue):]
    idx = (ptr + torch.arange(len(rows), device=rows.device)) % len(queue)
    queue[idx] = rows.to(queue.dtype)
    ptr.copy_((ptr + len(rows)) % len(queue))
