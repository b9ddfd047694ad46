"""Several positives per query: the rows of one query are one anchor with a multi-hot target."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from embtune.data.batching import candidate_batch, text_key, tokenize
from embtune.objectives.matryoshka import truncate
from embtune.objectives.objective import Objective, encoder
from embtune.training import distributed


class MultiPositive(Objective):
    """``(query, positive, negatives)`` examples where a query may have several rows (a list of positives,
    or several rows with one query; kind ``multi_positive_scores``, loss: multi_label_softmax).

    The rows of one query are planned into one batch (``batch_group``; no text of another query's rows
    repeats there, ``train.no_duplicates``) and become one anchor: A distinct queries a [A,D] against
    the candidates of the B rows, their positives p [B,D] (and with ``negatives=hard`` their sampled
    negatives [B·K,D]; ``cross_device``: every process's; ``cross_batch``: the memory), scores [A,C], and
    the target [A,C] marks every column whose row has the anchor's query (found by text key, so it holds
    across processes too). A candidate that copies one of the anchor's positive texts but is not one of
    its rows scores -inf. With one row per query this is the :class:`~embtune.objectives.contrastive.
    Contrastive` step with one-way InfoNCE. Matryoshka: the loss at each dim, truncated and re-normalised.
    Metrics: ``train/candidates``, the mean number of real candidates per anchor (positives included).
    """

    candidates = in_batch = True
    batch_fields, group_field = ("query", "positive"), "query"

    @property
    def group_size(self) -> int:
        return self.negatives.group_size if self.negatives.needs_negatives else 1

    def check(self, data_format, teacher) -> None:
        """Raises:
            ValueError: a teacher, or ``negatives=online_hard`` (it keeps the k hardest negatives around
                one positive per anchor)."""
        super().check(data_format, teacher)
        if hasattr(self.negatives, "select"):
            raise ValueError(f"negatives={self.negatives.name} selects the hardest negatives around one positive per "
                             f"anchor, but loss={self.loss_fn.name} gives an anchor several: use negatives=in_batch, "
                             "hard or cross_batch")

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        """:func:`~embtune.data.batching.candidate_batch` of the B rows, except that ``query`` holds the
        A distinct queries (in order of first appearance), with ``anchor_key`` [A] their text keys."""
        batch = candidate_batch(model, examples, self.group_size, rng)
        queries = list(dict.fromkeys(e.query for e in examples))
        batch["query"] = tokenize(model, "query", queries)
        batch["anchor_key"] = torch.tensor([text_key(q) for q in queries])
        return batch

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        normalize = distributed.unwrap(model).normalize

        def cut(x, d):
            return truncate(x, d, normalize)

        negatives, enc = self.negatives, encoder(model, batch, embeddings)
        a, p = enc("query"), enc("positive")
        n = enc("negative").view(p.size(0), -1, p.size(-1)) if "negative" in batch else None
        mask, pos_key, row_query = batch.get("negative_mask"), batch["positive_key"], batch["query_key"]
        neg_key = batch["negative_key"].flatten() if n is not None else pos_key[:0]
        if getattr(negatives, "cross_device", False) and distributed.world()[1] > 1:
            p, pos_key, row_query = distributed.gather(p), distributed.gather_no_grad(pos_key), \
                distributed.gather_no_grad(row_query)
            if n is not None:
                n, mask = distributed.gather(n), distributed.gather_no_grad(mask)
                neg_key = distributed.gather_no_grad(batch["negative_key"]).flatten()
        keys = torch.cat([pos_key, neg_key])  # the text of each candidate column
        rows = batch["anchor_key"][:, None] == row_query[None, :]  # [A,B']: row j is one of anchor i's
        target = torch.cat([rows, rows.new_zeros(rows.size(0), keys.numel() - rows.size(1))], dim=1)  # [A,C]

        def copies(columns: Tensor) -> Tensor:  # [A,C']: the column's text is one of anchor i's positives
            return (rows.float() @ (pos_key[:, None] == columns[None, :]).float()) > 0

        false_negative = copies(keys) & ~target
        memory = negatives.memory() if hasattr(negatives, "memory") else None
        if memory is not None:
            false_negative = torch.cat([false_negative, copies(memory[1])], dim=1)
            target = torch.cat([target, target.new_zeros(target.size(0), memory[1].numel())], dim=1)
        count = []

        def scored(d):
            scores, _ = negatives(cut(a, d), cut(p, d), cut(n, d), mask)  # [A,C]; its 1-D target is not ours
            if memory is not None:
                scores = torch.cat([scores, cut(a, d) @ cut(memory[0], d).T], dim=1)
            scores = scores.masked_fill(false_negative, float("-inf"))
            count.append(torch.isfinite(scores).sum(1).float().mean().item())
            return scores

        loss = sum(w * self.loss_fn(scored(d), target) for d, w in dims)
        if hasattr(negatives, "remember"):
            docs, doc_keys = p, pos_key
            if n is not None:  # padded negatives are not documents
                real = mask.flatten()
                docs, doc_keys = torch.cat([p, n.reshape(-1, n.size(-1))[real]]), torch.cat([pos_key, neg_key[real]])
            negatives.remember(docs, doc_keys)
        return loss, {"train/candidates": count[0]}
