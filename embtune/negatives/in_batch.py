"""In-batch negatives: every other anchor's positive (see :mod:`embtune.negatives` for the interface)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InBatch(nn.Module):
    """In-batch negatives: every other anchor's positive is a negative (Henderson et al. 2017;
    Karpukhin et al. 2020, DPR §3.2). C = B'. Negatives given in the data are not used.

    Args:
        cross_device: under ``torchrun``, score against the positives of every process (see
            ``embtune.training.distributed``).
    """

    name = "in_batch"
    needs_negatives = False
    group_size = 1

    def __init__(self, cross_device: bool = False):
        super().__init__()
        self.cross_device = cross_device

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None,
                negative_mask: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
        scores = anchor @ positive.T
        return scores, offset + torch.arange(anchor.size(0), device=anchor.device)
