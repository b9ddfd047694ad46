"""InfoNCE: softmax cross-entropy of the positive against all candidates."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.losses.checks import positive


class InfoNCE(nn.Module):
    """InfoNCE / multiple-negatives ranking loss (van den Oord et al. 2018, "Representation Learning
    with Contrastive Predictive Coding", eq. 4; as used for dense retrieval by Karpukhin et al. 2020, DPR).

        loss = CE(scores / τ, target)   with label smoothing ε (Szegedy et al. 2016):
        q = (1-ε)·onehot(target) + ε/C

    That is the loss with ``symmetric=False`` (sentence-transformers' MultipleNegativesRankingLoss).
    The default is symmetric (CLIP, Radford et al. 2021, §2.3 and Fig. 3; GTE, Li et al. 2023): the mean
    of the loss above and of the same loss with the roles swapped, each positive scored against the anchors
    (README, Results: better on SciFact at each of six seeds, worse on the standard-library set):

        loss = ½·CE(scores / τ, target) + ½·CE(reverse / τ, target),   reverse = scores[:, target]ᵀ
        by default; the training step passes reverse itself when the anchors come from several
        processes (cross-device negatives), so that each positive meets every anchor.

    Args:
        temperature: τ > 0; logits = similarity / τ (τ = 0.05 is sentence-transformers' scale 20).
        label_smoothing: ε in [0, 1).
        learnable: learn log(1/τ) as a parameter (CLIP, Radford et al. 2021, §2.5). The loop calls
            :meth:`clamp_temperature` after each optimiser step, which keeps τ in [min_temperature,
            max_temperature] (CLIP's rule, as in OpenCLIP's training loop: the parameter is clamped, never
            the value in the forward pass, where the clamp would make the gradient 0 outside the bounds).
        symmetric: also score each anchor's positive against the anchors (documents find their
            query). The columns ``target`` must be the anchors' positives, as every ``negatives`` option
            gives them.
    Inputs:
        scores [B,C]: similarities (cosine when embeddings are normalised) of each anchor to C candidates.
        target [B]: int64 index of each anchor's positive among the candidates.
        reverse [B,B'] (symmetric only, optional): positive i against B' >= B anchors, its own anchor at
            column target[i]; default scores[:, target]ᵀ (B' = B, own anchor at column i; where scores
            masks positive j for anchor i, reverse masks anchor i for positive j).
        Candidates scored -inf (padding) take no part, also not in the smoothing.
    Raises:
        ValueError: τ <= 0, ε outside [0, 1), min/max temperature out of order, or a learnable τ that
            starts outside [min_temperature, max_temperature].
    """

    name = "info_nce"
    input_kind = "scores"
    needs_negatives = False
    margin = None

    def __init__(self, temperature: float = 0.05, label_smoothing: float = 0.0, learnable: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, symmetric: bool = True):
        super().__init__()
        temperature = positive("temperature", temperature)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0 < min_temperature <= max_temperature:
            raise ValueError(f"need 0 < loss.min_temperature <= loss.max_temperature, got "
                             f"{min_temperature}, {max_temperature}")
        if learnable and not min_temperature <= temperature <= max_temperature:
            raise ValueError(f"loss.temperature={temperature} with loss.learnable=true must lie in [loss.min_temperature, "
                             f"loss.max_temperature] = [{min_temperature}, {max_temperature}]")
        self.label_smoothing, self.symmetric = label_smoothing, symmetric
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        log_inv = torch.tensor(math.log(1.0 / temperature))
        self.learnable = learnable
        if learnable:
            self.log_inv_temperature = nn.Parameter(log_inv)
        else:
            self.register_buffer("log_inv_temperature", log_inv)

    def inv_temperature(self) -> Tensor:
        """1/τ = exp(log_inv_temperature), unclamped: the gradient reaches the parameter at any value."""
        return self.log_inv_temperature.exp()

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp a learnable log(1/τ) in place to [log(1/max_temperature), log(1/min_temperature)]; call it
        after each optimiser step (CLIP, Radford et al. 2021, §2.5). Nothing to do for a fixed τ."""
        if self.learnable:
            self.log_inv_temperature.clamp_(math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature))

    @property
    def temperature(self) -> float:
        return float(1.0 / self.inv_temperature().detach())

    def forward(self, scores: Tensor, target: Tensor, reverse: Tensor | None = None) -> Tensor:
        loss = self._cross_entropy(self._logits(scores), target)
        if not self.symmetric:
            return loss
        if reverse is None:  # positive j (column target[j]) against anchor i; its own anchor is column j
            reverse, target = scores[:, target].T, torch.arange(len(target), device=target.device)
        return (loss + self._cross_entropy(self._logits(reverse), target)) / 2

    def _logits(self, scores: Tensor) -> Tensor:
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        # masked candidates (-inf) are multiplied as 0 and masked again: -inf·1/τ would make the learnable
        # temperature's gradient −inf·0 = NaN
        real = torch.isfinite(scores)
        return (scores.masked_fill(~real, 0) * self.inv_temperature()).masked_fill(~real, float("-inf"))

    def _cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.label_smoothing == 0:
            return F.cross_entropy(logits, target)
        # smoothing mass over the real candidates only: padded ones (-inf) would make it infinite
        logp = logits.log_softmax(-1)
        valid = torch.isfinite(logits)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        smooth = -logp.masked_fill(~valid, 0).sum(1) / valid.sum(1)
        return ((1 - self.label_smoothing) * nll + self.label_smoothing * smooth).mean()
