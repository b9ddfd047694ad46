"""Hard negatives from the data, added to the in-batch candidates."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Hard(nn.Module):
    """Hard negatives from the data, added to the in-batch candidates (DPR §3.2, "gold + BM25"):
    anchor i is scored against all B' positives and all B'·K negatives of the batch. C = B' + B'·K.

    Args:
        group_size: positive + negatives per anchor per step (FlagEmbedding's ``train_group_size``):
            K = group_size − 1 negatives are sampled from each row's list; rows with fewer are padded
            and masked.
        cross_device: under ``torchrun``, score against the positives and negatives of every process.
    Raises:
        ValueError: ``negative`` is None or not [B',K,D]; group_size < 2.
    """

    name = "hard"
    needs_negatives = True

    def __init__(self, group_size: int = 2, cross_device: bool = False):
        super().__init__()
        self.cross_device = cross_device
        if group_size < 2:
            raise ValueError(f"negatives.group_size must be >= 2 (a positive and at least one negative), got {group_size}")
        self.group_size = group_size

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None,
                negative_mask: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
        if negative is None or negative.dim() != 3 or negative.size(0) != positive.size(0):
            raise ValueError("negatives=hard needs negative embeddings of shape [B,K,D]")
        candidates = torch.cat([positive, negative.reshape(-1, negative.size(-1))])
        scores = anchor @ candidates.T
        if negative_mask is not None:
            valid = torch.cat([torch.ones(positive.size(0), dtype=torch.bool, device=scores.device),
                               negative_mask.reshape(-1).to(scores.device)])
            scores = scores.masked_fill(~valid, float("-inf"))
        return scores, offset + torch.arange(anchor.size(0), device=anchor.device)
