"""Pooling: token states -> one vector per text.

Every pooling has the signature ``(hidden [B,T,H], attention_mask [B,T]) -> [B,H]`` and reads the
attention mask, so left- and right-padded batches give the same vectors. ``st_mode`` is the name of
the matching sentence-transformers pooling mode, written when a model is saved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check(hidden: Tensor, attention_mask: Tensor) -> None:
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pooling expects hidden [B,T,H] and attention_mask [B,T]; got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )


class Mean(nn.Module):
    """Mean of the token states over non-padding tokens (Reimers & Gurevych 2019, SBERT §3).

    Returns [B,H]. A row with an all-zero mask gives zeros rather than NaN.
    """

    st_mode = "mean"

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        _check(hidden, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


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
