"""What the pairwise-preference losses (binary, hinge, logistic, triplet) share: the gaps s_p − s_n."""

from __future__ import annotations

import torch
from torch import Tensor


def preference_gaps(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Score gaps between each anchor's positive and each candidate.

    Args:
        scores [B,C]: similarities; padded candidates score -inf.
        target [B]: int64 column of each anchor's positive.
    Returns:
        gap [B,C] = s_p − s_c (at least float32), and is_negative [B,C] bool: the real negatives, i.e. not
        the positive and not padding (where gap is meaningless and must be masked out).
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    real = scores != float("-inf")
    is_negative = real.scatter(1, target[:, None], False)
    gap = scores.gather(1, target[:, None]) - scores.masked_fill(~real, 0)
    return gap, is_negative
