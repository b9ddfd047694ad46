"""PointwiseBCE: each pair's similarity, shifted and scaled, is a logit for its 0/1 label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.losses.checks import positive


class PointwiseBCE(nn.Module):
    """Pointwise binary cross-entropy on pair similarities, the sigmoid loss of SigLIP (Zhai et al.
    2023, "Sigmoid Loss for Language Image Pre-Training") with a fixed scale t = 1/τ and bias
    b = −center/τ, applied to labelled pairs rather than to all pairs of the batch:

        logit = (s − center) / τ
        loss = mean over pairs of  −y·log σ(logit) − (1−y)·log(1 − σ(logit))

    ``center`` is the similarity at which a pair is judged positive with probability 1/2; τ sets how
    sharply the probability rises around it (τ = 0.05: logit ±10 at cos = center ± 0.5). Soft labels
    in [0, 1] (e.g. a teacher's probability, or a 0–5 score divided by 5) are accepted.

    Input kind "pair_scores"; data formats: scored_pairs with scores in [0, 1] (set score_scale), or
    pairwise with a binary ``label`` column (1 = relevant/similar). Needs no negatives.

    Args:
        temperature: τ > 0 (0.05).
        center: similarity mapped to probability 1/2 (0.5, for cosine similarities).
    Inputs:
        scores [B]: similarity of each (text1, text2) pair.
        labels [B]: float label of each pair, in [0, 1].
    Raises:
        ValueError: τ <= 0, shapes other than [B] and [B], or a label outside [0, 1] (or NaN).
    """

    name = "pointwise_bce"
    input_kind = "pair_scores"
    label_range = (0.0, 1.0)  # checked against the data before any model loads
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05, center: float = 0.5):
        super().__init__()
        self.temperature, self.center = positive("temperature", temperature), float(center)

    def forward(self, scores: Tensor, labels: Tensor) -> Tensor:
        if scores.dim() != 1 or labels.shape != scores.shape:
            raise ValueError(f"pointwise_bce needs scores [B] and labels [B], got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        bad = ~((labels >= 0) & (labels <= 1))
        if bad.any():
            raise ValueError(f"pointwise_bce needs labels in [0, 1], got {labels[bad][:5].tolist()} "
                             f"(divide graded scores by their maximum, or use loss=cosent)")
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        logits = (scores - self.center) / self.temperature
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
