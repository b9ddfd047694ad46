"""Hinge: the positive must beat every negative by a margin."""

from __future__ import annotations

from torch import Tensor, nn

from embtune.losses.preference import preference_gaps


class Hinge(nn.Module):
    """Pairwise hinge (margin ranking) loss, as in the Ranking SVM (Joachims 2002, "Optimizing Search
    Engines using Clickthrough Data"), on similarities:

        loss = mean over pairs of  max(0, m − (s_p − s_n))

    margin m = 0 gives the plain form max(0, s_n − s_p): only mis-ordered pairs cost anything.
    No temperature: the margin is in units of similarity (cosine).

    Input kind "scores"; data formats: pairwise (in-batch negatives), triplet and multi_negative
    (hard negatives). Needs no negatives in the data.

    Args:
        margin: m >= 0 (0.2).
    Inputs:
        scores [B,C]: similarities of each anchor to C candidates.
        target [B]: int64 column of each anchor's positive; every other column is a negative.
        Candidates scored -inf (padding) take no part.
    Returns:
        The mean over all (positive, real negative) pairs; 0 when there is none (C = 1).
    Raises:
        ValueError: m < 0.
    """

    name = "hinge"
    input_kind = "scores"
    needs_negatives = False
    temperature = None

    def __init__(self, margin: float = 0.2):
        super().__init__()
        if margin < 0:
            raise ValueError(f"loss.margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        gap, is_negative = preference_gaps(scores, target)  # [B,C]: s_p − s_n, real negatives
        per_pair = (self.margin - gap).clamp(min=0)
        return (per_pair * is_negative).sum() / is_negative.sum().clamp(min=1)
