"""Matryoshka representation learning (Kusupati et al. 2022, "Matryoshka Representation Learning",
NeurIPS, §3): train so that the first ``d`` coordinates of an embedding are an embedding too.

One rule everywhere (training loss, evaluation, ``embtune.load(path, truncate_dim=d)``, a distillation
teacher's scores): keep the first ``d`` coordinates, *then* L2-normalise when the model normalises.
Normalising before truncating would leave vectors shorter than 1 whose dot products are not cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def matryoshka_dims(dims, weights, size: int) -> list[tuple[int, float]]:
    """(dimension, weight) pairs to train and evaluate at, largest first; ``[(size, 1.0)]`` when ``dims``
    is empty (Matryoshka off).

    Sorting makes the result independent of the order the user lists dims in: each weight stays with
    its dim, and the weighted losses are always summed in the same order (bitwise-equal results).

    Args:
        dims, weights: ``matryoshka.dims`` and ``matryoshka.weights`` (equal lengths).
        size: the model's embedding size D.
    Raises:
        ValueError: dims and weights differ in length, a dim is repeated or outside 1..D, or a weight
            is negative.
    """
    dims, weights = list(dims or []), list(weights or [])
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka.dims {dims} and matryoshka.weights {weights} must have the same length: "
                         f"give one weight per dim, e.g. matryoshka.weights=[{','.join(['1'] * len(dims))}]")
    if not dims:
        return [(size, 1.0)]
    if len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka.dims {dims} repeats a dim (its loss would count twice)")
    bad = [d for d in dims if not 0 < d <= size]
    if bad:
        raise ValueError(f"matryoshka.dims {bad} outside 1..{size} (the model's embedding size)")
    if any(w < 0 for w in weights):
        raise ValueError(f"matryoshka.weights {weights} must be >= 0")
    return sorted(zip(dims, (float(w) for w in weights)), reverse=True)


def truncate(x: Tensor | None, d: int, normalize: bool = True) -> Tensor | None:
    """The first ``d`` coordinates of embeddings ``x`` [..., D], L2-re-normalised when ``normalize``
    (MRL §3: each nested prefix is used as an embedding of its own). ``d >= D`` returns ``x`` unchanged;
    None passes through (no negatives).

    Example: ``truncate([3/13, 4/13, 12/13], 2) = [0.6, 0.8]``.
    """
    if x is None or d >= x.size(-1):
        return x
    return F.normalize(x[..., :d], dim=-1) if normalize else x[..., :d]


def scores_per_dim(query: Tensor, documents: Tensor, dims: list[int], normalize: bool = True) -> dict[int, Tensor]:
    """Dot-product scores at each Matryoshka dim, both sides truncated then re-normalised.

    This is how a teacher that is itself an embedding model scores in Matryoshka distillation: the
    student's loss at dim ``d`` is matched to the teacher's scores at the same ``d``, not at full size
    (a full-size teacher would ask a 64-dim prefix for distinctions it cannot make).

    Args:
        query: [B, D].
        documents: [B, L, D] (a list of L documents per query) or [C, D] (candidates shared by all).
        dims: dims to score at, each in 1..D (larger ones mean full size).
    Returns:
        ``{d: scores}``, scores [B, L] or [B, C].
    Raises:
        ValueError: shapes that do not fit.
    """
    if query.dim() != 2 or documents.dim() not in (2, 3) or documents.size(-1) != query.size(-1) \
            or (documents.dim() == 3 and documents.size(0) != query.size(0)):
        raise ValueError(f"scores_per_dim needs query [B,D] and documents [B,L,D] or [C,D]; got "
                         f"{tuple(query.shape)} and {tuple(documents.shape)}")
    out = {}
    for d in dims:
        q, docs = truncate(query, d, normalize), truncate(documents, d, normalize)
        out[d] = torch.einsum("bd,bld->bl", q, docs) if docs.dim() == 3 else q @ docs.T
    return out
