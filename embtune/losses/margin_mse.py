"""Margin-MSE: the student's positive−negative margin regressed onto the teacher's."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embtune.losses.checks import positive, same_shape


class MarginMSE(nn.Module):
    """Margin-MSE distillation (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation", §3, eq. 1):

        loss = mean over (query, real negative j) of  ((s_p − s_j)/τ − (t_p − t_j)/τ_t)²

    Only margins are matched, so the student's scores need not be on the teacher's scale, just their
    differences; τ rescales the student's cosine margins (in [−2, 2]) towards the teacher's logits and
    τ_t rescales the teacher's. Teacher scores come from the data or from ``teacher=cross_encoder``
    (see ``distill_kl``). Needs ``negatives=hard``.

    Args:
        temperature: τ > 0 (0.1): student margin = cosine margin / τ.
        teacher_temperature: τ_t > 0 (1.0): teacher margin = score margin / τ_t.
    Inputs:
        scores [B,1+K], teacher [B,1+K], mask [B,1+K] bool: column 0 the positive, then the negatives.
    Returns:
        A scalar; 0 when no query has a real negative.
    Raises:
        ValueError: τ or τ_t <= 0, or shapes that differ.
    """

    name = "margin_mse"
    input_kind = "teacher_scores"
    needs_negatives = True
    margin = None

    def __init__(self, temperature: float = 0.1, teacher_temperature: float = 1.0):
        super().__init__()
        self.temperature = positive("temperature", temperature)
        self.teacher_temperature = positive("teacher_temperature", teacher_temperature)

    def forward(self, scores: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
        same_shape("margin_mse", "[B,1+K]", scores, teacher, mask)
        dtype = torch.promote_types(scores.dtype, torch.float32)
        s, t = scores.to(dtype), teacher.to(dtype)
        student = (s[:, :1] - s[:, 1:]) / self.temperature
        target = (t[:, :1] - t[:, 1:]) / self.teacher_temperature
        real = mask[:, 1:].bool()
        err = (student - target).masked_fill(~real, 0) ** 2
        return err.sum() / real.sum().clamp(min=1)
