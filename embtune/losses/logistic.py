"""Logistic: the soft-margin pairwise loss log(1 + exp(−(s_p − s_n)/τ))."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from embtune.losses.checks import positive
from embtune.losses.preference import preference_gaps


class Logistic(nn.Module):
    """Logistic (soft-margin) pairwise loss: a smooth hinge on the gap between the positive's and each
    negative's similarity (the soft-margin triplet loss of Hermans et al. 2017, "In Defense of the
    Triplet Loss for Person Re-Identification", §2, on similarities scaled by 1/τ):

        loss = mean over pairs of  log(1 + exp(−(s_p − s_n) / τ)) = softplus(−(s_p − s_n) / τ)

    Mathematically equal to ``binary`` with label_smoothing 0 (RankNet's cost with P̄ = 1); this is
    the plain form, with no target probability. softplus keeps it finite for small τ.

    Input kind "scores"; data formats: pairwise (in-batch negatives), triplet and multi_negative
    (hard negatives). Needs no negatives in the data.

    Args:
        temperature: τ > 0 (0.05).
    Inputs:
        scores [B,C]: similarities of each anchor to C candidates.
        target [B]: int64 column of each anchor's positive; every other column is a negative.
        Candidates scored -inf (padding) take no part.
    Returns:
        The mean over all (positive, real negative) pairs; 0 when there is none (C = 1).
    Raises:
        ValueError: τ <= 0.
    """

    name = "logistic"
    input_kind = "scores"
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = positive("temperature", temperature)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        gap, is_negative = preference_gaps(scores, target)  # [B,C]: s_p − s_n, real negatives
        per_pair = F.softplus(-gap / self.temperature)
        return (per_pair * is_negative).sum() / is_negative.sum().clamp(min=1)
