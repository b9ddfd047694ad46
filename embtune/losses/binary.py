"""Binary: RankNet's cross-entropy on the probability that the positive outranks each negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.losses.checks import positive
from embtune.losses.preference import preference_gaps


class Binary(nn.Module):
    """Pairwise binary cross-entropy, RankNet's cost (Burges et al. 2005, "Learning to Rank using
    Gradient Descent", §3), for each (positive, negative) pair of an anchor:

        P = σ((s_p − s_n) / τ)                        probability that the positive ranks first
        loss = mean over pairs of  −P̄·log P − (1−P̄)·log(1−P),   P̄ = 1 − ε/2

    With ε = 0 this is the same function as ``logistic`` (−log σ(x) = log(1 + e^(−x))); the two are
    kept apart because this one is a cross-entropy against a target probability P̄, which label
    smoothing ε moves from 1 towards 0.5 (RankNet's P̄ = 0.5 for a tie); ``logistic`` is the plain
    soft-margin form. Computed with BCE-with-logits, stable for small τ.

    Input kind "scores"; data formats: pairwise (in-batch negatives), triplet and multi_negative
    (hard negatives, with or without in-batch ones). Needs no negatives in the data.

    Args:
        temperature: τ > 0 (0.05); logits = (s_p − s_n) / τ.
        label_smoothing: ε in [0, 1) (0.0); target probability P̄ = 1 − ε/2.
    Inputs:
        scores [B,C]: similarities of each anchor to C candidates.
        target [B]: int64 column of each anchor's positive; every other column is a negative.
        Candidates scored -inf (padding) take no part.
    Returns:
        The mean over all (positive, real negative) pairs; 0 when there is none (C = 1).
    Raises:
        ValueError: τ <= 0 or ε outside [0, 1).
    """

    name = "binary"
    input_kind = "scores"
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.temperature, self.label_smoothing = positive("temperature", temperature), float(label_smoothing)

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        gap, is_negative = preference_gaps(scores, target)  # [B,C]: s_p − s_n, real negatives
        logits = gap / self.temperature
        p_bar = torch.full_like(logits, 1 - self.label_smoothing / 2)
        per_pair = F.binary_cross_entropy_with_logits(logits, p_bar, reduction="none")
        return (per_pair * is_negative).sum() / is_negative.sum().clamp(min=1)
