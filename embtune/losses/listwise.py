"""Listwise: match the student's distribution over a list of documents to the teacher's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.losses.checks import positive, same_shape


class Listwise(nn.Module):
    """Listwise distillation: KL divergence from the teacher's to the student's top-one distribution
    over each query's list of documents (ListNet, Cao et al. 2007, "Learning to Rank: From Pairwise
    Approach to Listwise Approach", top-one probability; as used to distil a cross-encoder into a
    dual encoder by RocketQAv2's dynamic listwise distillation, Ren et al. 2021):

        p = softmax(teacher / τ_t),   q = softmax(scores / τ)      over the unmasked entries of a row
        loss = mean over rows of  KL(p ‖ q) = Σ_j p_j·(log p_j − log q_j)

    ListNet's cross-entropy −Σ p·log q differs from this by the teacher's entropy, a constant. The
    teacher may be a cross-encoder's logits or graded relevance labels (0, 1, 2, ...; τ_t sets how
    much more a grade-2 document weighs than a grade-1). Padded entries (mask False) take no part:
    they get probability 0 in both distributions and no gradient.

    Input kind "list_scores"; data format: listwise (query, [documents], [teacher scores or grades]).
    Needs no negatives (the list holds them).

    Args:
        temperature: τ > 0 (0.05), for the student's similarities.
        teacher_temperature: τ_t > 0 (1.0), for the teacher's scores.
    Inputs:
        scores [B,L]: student similarity of each query to each of its L documents.
        teacher [B,L]: teacher score or relevance grade of each document (any value where masked).
        mask [B,L] bool: True for real documents, False for padding.
    Raises:
        ValueError: τ or τ_t <= 0, shapes that differ, or a row with no unmasked entry.
    """

    name = "listwise"
    input_kind = "list_scores"
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 1.0):
        super().__init__()
        self.temperature = positive("temperature", temperature)
        self.teacher_temperature = positive("teacher_temperature", teacher_temperature)

    def forward(self, scores: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        same_shape("listwise", "[B,L]", scores, teacher, mask)
        mask = mask.bool()
        if not mask.any(dim=1).all():
            rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"listwise: rows {rows[:10]} have every document masked")
        dtype = torch.promote_types(scores.dtype, torch.float32)
        # -inf before the softmax, then 0 in the log-probabilities, so that padding yields 0·0, not NaN
        log_q = F.log_softmax((scores.to(dtype) / self.temperature).masked_fill(~mask, -math.inf), dim=1)
        log_p = F.log_softmax((teacher.to(dtype) / self.teacher_temperature).masked_fill(~mask, -math.inf), dim=1)
        log_q, log_p = log_q.masked_fill(~mask, 0), log_p.masked_fill(~mask, 0)
        kl = (log_p.exp() * mask * (log_p - log_q)).sum(dim=1)
        return kl.mean()
