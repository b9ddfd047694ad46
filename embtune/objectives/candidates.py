"""The candidate-scoring step: encode a batch, gather candidates (other processes, cross-batch memory),
mask false negatives, select hard ones, and score them with the loss at each Matryoshka dimension."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from embtune.training import distributed


def candidate_loss(encode: Callable[[str], Tensor], batch: dict, negatives, loss_fn, dims: list[tuple[int, float]],
                   cut: Callable[[Tensor | None, int], Tensor | None]) -> tuple[Tensor, dict[str, float]]:
    """Loss of one batch of (query, positive, negatives) examples, and ``{"train/candidates": C̄}``, the
    mean number of real candidates per anchor (positive included) at the full dimension.

    Steps (shapes at one process; W processes, M memory entries):
      1. encode: anchor a [B,D], positive p [B,D], data negatives n [B,K,D] (``negatives.group_size`` > 1);
      2. ``negatives.cross_device`` under torchrun: p, n gathered from all processes ([W·B,…], gradient
         to the local part, ``embtune.training.distributed.gather``), anchor i's positive at column rank·B + i;
      3. scores [B,C] from ``negatives``; a cross-batch memory (``negatives=cross_batch``) adds M columns;
      4. candidates whose text equals the anchor's positive (not its own column) score -inf;
      5. ``negatives=online_hard`` keeps the k hardest negatives per anchor;
      6. loss = Σ_d w_d · loss_fn(scores_d, target) (Matryoshka; ``cut`` truncates to d); a symmetric
         loss (``loss.symmetric``) also gets reverse [B,B'], this process's positives against the
         anchors (of every process with cross-device negatives, gradient to each process's own); an
         anchor whose text, or whose positive's text, equals that of positive j's own scores -inf in row j;
      7. the memory stores this step's documents, detached.
    """
    a = encode("query")
    # SimCSE: the anchor's second pass, under a new dropout mask, is its positive
    p = encode("query" if getattr(loss_fn, "same_text_positive", False) else "positive")
    n = encode("negative").view(a.size(0), -1, a.size(-1)) if "negative" in batch else None
    mask, false_negative, offset = batch.get("negative_mask"), batch["false_negative"], 0
    pos_key = batch["positive_key"]
    keys = torch.cat([pos_key, batch["negative_key"].flatten()]) if n is not None else pos_key  # column order
    symmetric = getattr(loss_fn, "symmetric", False)
    own_p, anchors, anchor_keys = p, a, batch["query_key"]
    rank, world = distributed.world()
    if getattr(negatives, "cross_device", False) and world > 1:
        if symmetric:
            anchors, anchor_keys = distributed.gather(a), distributed.gather_no_grad(anchor_keys)
        p, keys = distributed.gather(p), distributed.gather_no_grad(pos_key)
        if n is not None:
            n, mask = distributed.gather(n), distributed.gather_no_grad(mask)
            keys = torch.cat([keys, distributed.gather_no_grad(batch["negative_key"]).flatten()])
        offset = rank * a.size(0)
        false_negative = _same_text(pos_key, keys, offset)
    if symmetric:  # anchor k is no negative of positive j when k's positive is j's text (as above) or k is j's query
        same_anchor = false_negative[:, :anchors.size(0)] | _same_text(batch["query_key"], anchor_keys, offset)
    memory = negatives.memory() if hasattr(negatives, "memory") else None
    if memory is not None:
        false_negative = torch.cat([false_negative, memory[1][None, :] == pos_key[:, None]], dim=1)
    count = []

    def scored(d):
        scores, target = negatives(cut(a, d), cut(p, d), cut(n, d), mask, offset)
        if memory is not None:
            scores = torch.cat([scores, cut(a, d) @ cut(memory[0], d).T], dim=1)
        scores = scores.masked_fill(false_negative, float("-inf"))
        if hasattr(negatives, "select"):
            scores = negatives.select(scores, target)
        count.append(torch.isfinite(scores).sum(1).float().mean().item())
        if not symmetric:
            return scores, target
        reverse = (cut(own_p, d) @ cut(anchors, d).T).masked_fill(same_anchor, float("-inf"))
        return scores, target, reverse

    loss = sum(w * loss_fn(*scored(d)) for d, w in dims)
    if hasattr(negatives, "remember"):
        docs, doc_keys = p, keys[:p.size(0)]
        if n is not None:  # padded negatives are not documents
            real = mask.flatten()
            docs = torch.cat([p, n.reshape(-1, n.size(-1))[real]])
            doc_keys = torch.cat([doc_keys, keys[p.size(0):][real]])
        negatives.remember(docs, doc_keys)
    return loss, {"train/candidates": count[0]}


def _same_text(row_key: Tensor, keys: Tensor, offset: int) -> Tensor:
    """[B,C] bool: candidate c has the text of row i's key (anchor i's positive, or anchor i) but is not
    its column offset + i."""
    same = keys[None, :] == row_key[:, None]
    own = offset + torch.arange(row_key.size(0), device=row_key.device)
    return same.scatter(1, own[:, None], False)
