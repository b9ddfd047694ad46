"""Pooling: token states -> one vector per text.

Every pooling has the signature ``(hidden [B,T,H], attention_mask [B,T]) -> [B,H]`` and reads the
attention mask, so left- and right-padded batches give the same vectors. ``Mean`` and ``WeightedMean``
also take an optional ``prompt_mask [B,T]`` (1 on the tokens of a prepended instruction); with
``exclude_prompt=True`` those tokens get no weight. ``st_mode`` is the matching sentence-transformers
pooling mode, written when a model is saved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check(hidden: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None) -> None:
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pooling expects hidden [B,T,H] and attention_mask [B,T]; got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if prompt_mask is not None and prompt_mask.shape != attention_mask.shape:
        raise ValueError(f"pooling expects prompt_mask [B,T] like attention_mask {tuple(attention_mask.shape)}; "
                         f"got {tuple(prompt_mask.shape)}")


def _kept(attention_mask: Tensor, prompt_mask: Tensor | None, exclude_prompt: bool) -> Tensor:
    """[B,T] bool: real tokens, less the prompt's when it is excluded."""
    keep = attention_mask.bool()
    if exclude_prompt and prompt_mask is not None:
        keep = keep & ~prompt_mask.bool()
    return keep


class Mean(nn.Module):
    """Mean of the token states over non-padding tokens (Reimers & Gurevych 2019, SBERT §3).

    Args:
        exclude_prompt: leave the prompt's tokens (``prompt_mask``) out of the mean, as in INSTRUCTOR
            (Su et al. 2023, §2.3: the instruction is encoded but not pooled).

    Returns [B,H]. A row with no kept token gives zeros rather than NaN.
    """

    st_mode = "mean"

    def __init__(self, exclude_prompt: bool = False):
        super().__init__()
        self.exclude_prompt = exclude_prompt

    def forward(self, hidden: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        _check(hidden, attention_mask, prompt_mask)
        keep = _kept(attention_mask, prompt_mask, self.exclude_prompt).unsqueeze(-1)
        # masked_fill, not a product: a padding state may be NaN (fully masked attention rows) and NaN·0 = NaN
        return hidden.masked_fill(~keep, 0.0).sum(1) / keep.sum(1).clamp(min=1).to(hidden.dtype)


class WeightedMean(nn.Module):
    """Position-weighted mean for causal models (Muennighoff 2022, SGPT, §3.1, eq. 1):
    ``e = sum_i w_i h_i`` with ``w_i = i / sum_j j``, where i = 1..L counts the *real* tokens, so later
    tokens (which have attended to more of the text) weigh more.

    i is the position among the real tokens (a cumulative sum of the attention mask), so left and right
    padding give the same vector. With ``exclude_prompt`` the prompt tokens get weight 0 while the other
    tokens keep their position in the whole text (prompt included), and the weights renormalise over them.

    Returns [B,H]; a row with no kept token gives zeros.
    """

    st_mode = "weightedmean"

    def __init__(self, exclude_prompt: bool = False):
        super().__init__()
        self.exclude_prompt = exclude_prompt

    def forward(self, hidden: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
        _check(hidden, attention_mask, prompt_mask)
        position = attention_mask.long().cumsum(1)  # 1..L on real tokens, whatever the padding side
        keep = _kept(attention_mask, prompt_mask, self.exclude_prompt).unsqueeze(-1)
        weights = (position.unsqueeze(-1) * keep).to(hidden.dtype)
        return (hidden.masked_fill(~keep, 0.0) * weights).sum(1) / weights.sum(1).clamp(min=1)


class Max(nn.Module):
    """Element-wise max of the token states over non-padding tokens (Conneau et al. 2017, InferSent §3.2.2).

    Padding is filled with -inf before the max, so it never wins. Returns [B,H]; a row with an all-zero
    mask gives zeros.
    """

    st_mode = "max"

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        _check(hidden, attention_mask)
        mask = attention_mask.bool().unsqueeze(-1)
        out = hidden.masked_fill(~mask, float("-inf")).amax(1)
        return out.masked_fill(~mask.any(1), 0.0)


class CLS(nn.Module):
    """State of the first non-padding token ([CLS] for BERT-like encoders; Devlin et al. 2019).

    With left padding the first token is a pad, so the index comes from the mask. Returns [B,H].
    """

    st_mode = "cls"

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        _check(hidden, attention_mask)
        first = attention_mask.int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


class LastToken(nn.Module):
    """State of the last non-padding token, as used for decoder LLM embedders (e.g. E5-Mistral,
    Wang et al. 2023, §3.1: the appended EOS token).

    Works for right padding (index = length - 1) and left padding (index = T - 1). Returns [B,H].
    """

    st_mode = "lasttoken"

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        _check(hidden, attention_mask)
        T = attention_mask.size(1)
        # position of the last 1 in each row = T-1 - (first 1 of the flipped row)
        last = T - 1 - attention_mask.flip(1).int().argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
