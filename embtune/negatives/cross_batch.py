"""Cross-batch memory: the document embeddings of recent batches as extra negatives."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embtune.negatives.hard import Hard
from embtune.negatives.in_batch import InBatch


class CrossBatch(nn.Module):
    """In-batch (and, with ``group_size`` > 1, data) candidates plus a FIFO memory of the document
    embeddings (positives and real hard negatives) of the last batches: Cross-Batch Memory (XBM, Wang
    et al. 2020, "Cross-Batch Memory for Embedding Learning", §3). The memory holds detached
    embeddings, so it costs no backward pass; it is worth it once the embeddings drift slowly
    ("slow drift", XBM §3.1), hence the warm-up. C = (batch candidates) + M, M <= ``queue_size``.

    Steps 0 … warmup_steps−1 neither fill nor use the memory; from then on each step scores against
    what earlier steps stored, then stores its own documents, dropping the oldest beyond queue_size.
    A stored text equal to the anchor's positive is a false negative and is masked (by text key).

    Args:
        queue_size: embeddings kept, >= 0 (0: plain in-batch training, exactly).
        warmup_steps: steps before the memory starts, >= 0.
        group_size: 1 = in-batch candidates only; > 1 adds group_size − 1 data negatives per anchor.
        cross_device: candidates (and what is stored) from every process under ``torchrun``.
    Raises:
        ValueError: a negative queue_size or warmup_steps, or group_size < 1.
    """

    name = "cross_batch"

    def __init__(self, queue_size: int = 4096, warmup_steps: int = 100, group_size: int = 1,
                 cross_device: bool = False):
        super().__init__()
        if queue_size < 0 or warmup_steps < 0:
            raise ValueError(f"negatives.queue_size and negatives.warmup_steps must be >= 0, got "
                             f"{queue_size}, {warmup_steps}")
        if group_size < 1:
            raise ValueError(f"negatives.group_size must be >= 1, got {group_size}")
        self.queue_size, self.warmup_steps = queue_size, warmup_steps
        self.group_size, self.cross_device = group_size, cross_device
        self.needs_negatives = group_size > 1
        self.candidates = Hard(group_size) if group_size > 1 else InBatch()
        self.steps = 0
        self._embeddings: Tensor | None = None  # [M,D], oldest first
        self._keys: Tensor | None = None        # [M] int64 text keys

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None,
                negative_mask: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
        """The batch's candidates, as ``negatives=in_batch`` / ``hard``; the memory's come from :meth:`memory`."""
        return self.candidates(anchor, positive, negative, negative_mask, offset)

    def memory(self) -> tuple[Tensor, Tensor] | None:
        """(embeddings [M,D], text keys [M]) to add as candidates this step, or None (warm-up, empty)."""
        if self.steps < self.warmup_steps or self._embeddings is None or len(self._embeddings) == 0:
            return None
        return self._embeddings, self._keys

    @torch.no_grad()
    def remember(self, embeddings: Tensor, keys: Tensor) -> None:
        """End of a step: store the step's documents (embeddings [N,D], keys [N]) once warm-up is over."""
        if self.steps >= self.warmup_steps and self.queue_size > 0:
            e, k = embeddings.detach(), keys.to(embeddings.device)
            if self._embeddings is not None:
                e, k = torch.cat([self._embeddings, e]), torch.cat([self._keys, k])
            self._embeddings, self._keys = e[-self.queue_size:], k[-self.queue_size:]
        self.steps += 1
