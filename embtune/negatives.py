"""Negatives: which candidates each anchor is scored against.

Interface: ``(anchor [B,D], positive [B,D], negative [B,K,D] | None) -> (scores [B,C], target [B])``
where ``target[i]`` is the column of anchor i's positive. ``needs_negatives`` tells the loop whether
the data must carry negatives (checked before the model loads) and whether to encode them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InBatch(nn.Module):
    """In-batch negatives: every other anchor's positive is a negative (Henderson et al. 2017;
    Karpukhin et al. 2020, DPR §3.2). C = B. Negatives given in the data are not used."""

    name = "in_batch"
    needs_negatives = False

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None) -> tuple[Tensor, Tensor]:
        scores = anchor @ positive.T
        return scores, torch.arange(anchor.size(0), device=anchor.device)


class Hard(nn.Module):
    """Hard negatives from the data, added to the in-batch candidates (DPR §3.2, "gold + BM25"):
    anchor i is scored against all B positives and all B·K negatives of the batch. C = B + B·K.

    Raises:
        ValueError: ``negative`` is None or not [B,K,D].
    """

    name = "hard"
    needs_negatives = True

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if negative is None or negative.dim() != 3 or negative.size(0) != anchor.size(0):
            raise ValueError("negatives=hard needs negative embeddings of shape [B,K,D]")
        candidates = torch.cat([positive, negative.reshape(-1, negative.size(-1))])
        scores = anchor @ candidates.T
        return scores, torch.arange(anchor.size(0), device=anchor.device)
