"""Online hard-negative mining: of each anchor's candidates, keep the k hardest (or semi-hard) ones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from embtune.negatives.hard import Hard
from embtune.negatives.in_batch import InBatch


class OnlineHard(nn.Module):
    """In-batch (and, with ``group_size`` > 1, data) candidates, then per anchor only the k hardest
    negatives kept; every other negative scores -inf, so the loss ignores it. C is unchanged; each row
    has its positive plus at most k real candidates.

    - ``selection="hardest"``: the k negatives most similar to the anchor (hard-negative mining
      within the mini-batch, Hermans et al. 2017, "In Defense of the Triplet Loss", §2 "batch hard").
    - ``selection="semi_hard"``: only negatives farther from the anchor than the positive but within
      the margin, s_p − m < s_n < s_p (FaceNet, Schroff et al. 2015, §3.2), then the k hardest of
      those. Meant for margin losses (hinge, triplet): a negative beyond the margin has zero loss, one
      closer than the positive is often a false negative or too hard early in training. An anchor
      without any semi-hard negative keeps none (it then adds nothing to a margin loss).

    Selection runs after false negatives (copies of the anchor's positive) and padding are masked, so
    they are never among the k. It selects on the detached scores: no gradient flows through the choice.

    Args:
        k: negatives kept per anchor, >= 1.
        selection: "hardest" or "semi_hard".
        margin: m >= 0 for "semi_hard", in units of the scores (cosine); the config defaults it to the
            loss's margin.
        group_size: 1 = in-batch candidates only; > 1 adds group_size − 1 data negatives per anchor
            (as ``negatives=hard``).
        cross_device: candidates from every process under ``torchrun``.
    Raises:
        ValueError: k < 1, an unknown selection, m < 0, or group_size < 1.
    """

    name = "online_hard"

    def __init__(self, k: int = 8, selection: str = "hardest", margin: float = 0.2, group_size: int = 1,
                 cross_device: bool = False):
        super().__init__()
        if k < 1:
            raise ValueError(f"negatives.k must be >= 1, got {k}")
        if selection not in ("hardest", "semi_hard"):
            raise ValueError(f"negatives.selection must be 'hardest' or 'semi_hard', got {selection!r}")
        if margin < 0:
            raise ValueError(f"negatives.margin must be >= 0, got {margin}")
        if group_size < 1:
            raise ValueError(f"negatives.group_size must be >= 1, got {group_size}")
        self.k, self.selection, self.margin = k, selection, float(margin)
        self.group_size, self.cross_device = group_size, cross_device
        self.needs_negatives = group_size > 1
        self.candidates = Hard(group_size) if group_size > 1 else InBatch()

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor | None = None,
                negative_mask: Tensor | None = None, offset: int = 0) -> tuple[Tensor, Tensor]:
        """All candidates, as ``negatives=in_batch`` / ``hard``; :meth:`select` then keeps the k hardest."""
        return self.candidates(anchor, positive, negative, negative_mask, offset)

    def select(self, scores: Tensor, target: Tensor) -> Tensor:
        """scores [B,C] (false negatives and padding already -inf), target [B] -> scores [B,C] with every
        negative but the selected ones set to -inf."""
        s = scores.detach()
        real = torch.isfinite(s)
        eligible = real.scatter(1, target[:, None], False)
        if self.selection == "semi_hard":
            s_pos = s.gather(1, target[:, None])
            eligible &= (s < s_pos) & (s > s_pos - self.margin)
        k = min(self.k, s.size(1))
        top = s.masked_fill(~eligible, float("-inf")).topk(k, dim=1).indices  # [B,k]
        keep = torch.zeros_like(eligible).scatter(1, top, True) & eligible  # rows with < k eligible
        keep.scatter_(1, target[:, None], True)
        return scores.masked_fill(~keep, float("-inf"))
