"""Triplet: the anchor must be closer to its positive than to its (hardest) negative by a margin."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Triplet(nn.Module):
    """Triplet loss (Schroff et al. 2015, "FaceNet", §3.1) on distances derived from the similarity
    scores, with the hardest negative of each anchor ("batch hard", Hermans et al. 2017, "In Defense of
    the Triplet Loss for Person Re-Identification", §2) or the mean over all negatives:

        loss = mean over anchors of  max(0, d(a,p) − min_n d(a,n) + m)          reduction "hardest"
        loss = mean over pairs of    max(0, d(a,p) − d(a,n) + m)                reduction "mean"
        (anchors and pairs that have a real negative: candidates scored -inf are padding)
        d = 1 − cos                                                             distance "cosine"
        d = ‖a − x‖ = sqrt(max(2 − 2·cos, 0) + eps)                             distance "euclidean"

    The Euclidean form is exact only for unit-length embeddings (scores must be cosines of normalised
    vectors, model.normalize=true); eps = 1e-8 keeps its gradient finite at d = 0. FaceNet's
    squared Euclidean distance of unit vectors is 2·(1 − cos): the "cosine" form with margin m/2.

    Input kind "scores"; data formats: triplet and multi_negative (hard negatives), or pairwise with
    in-batch negatives only (the hardest in-batch candidate). Needs no negatives in the data.

    Args:
        margin: m >= 0 (0.2), in units of the distance; 0 gives max(0, d(a,p) − d(a,n)).
        distance: "cosine" (default) or "euclidean".
        reduction_over_negatives: "hardest" (default) or "mean".
    Inputs:
        scores [B,C]: cosine similarities of each anchor to C candidates.
        target [B]: int64 column of each anchor's positive; every other column is a negative.
    Returns:
        A scalar; 0 when no anchor has a negative (C = 1).
    Raises:
        ValueError: m < 0 or an unknown distance or reduction.
    """

    name = "triplet"
    input_kind = "scores"
    needs_negatives = False
    temperature = None
    eps = 1e-8

    def __init__(self, margin: float = 0.2, distance: str = "cosine", reduction_over_negatives: str = "hardest"):
        super().__init__()
        if margin < 0:
            raise ValueError(f"loss.margin must be >= 0, got {margin}")
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"loss.distance must be 'cosine' or 'euclidean', got {distance!r}")
        if reduction_over_negatives not in ("hardest", "mean"):
            raise ValueError(f"loss.reduction_over_negatives must be 'hardest' or 'mean', got "
                             f"{reduction_over_negatives!r}")
        self.margin, self.distance = float(margin), distance
        self.reduction_over_negatives = reduction_over_negatives

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        real = scores != float("-inf")  # padded candidates score -inf: no pair
        is_negative = real.scatter(1, target[:, None], False)
        scores = scores.masked_fill(~real, 0)
        if self.distance == "cosine":
            dist = 1 - scores
        else:
            dist = ((2 - 2 * scores).clamp(min=0) + self.eps).sqrt()
        d_pos = dist.gather(1, target[:, None])  # [B,1]
        if self.reduction_over_negatives == "hardest":
            has_negative = is_negative.any(dim=1)
            d_neg = dist.masked_fill(~is_negative, float("inf")).amin(dim=1, keepdim=True)  # [B,1]
            per_anchor = (d_pos - d_neg + self.margin).clamp(min=0).squeeze(1)
            return per_anchor.masked_fill(~has_negative, 0).sum() / has_negative.sum().clamp(min=1)
        per_pair = (d_pos - dist + self.margin).clamp(min=0)
        return (per_pair * is_negative).sum() / is_negative.sum().clamp(min=1)
