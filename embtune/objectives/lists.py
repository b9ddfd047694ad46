"""Ranked lists: a query's scores over its list of documents against graded relevance."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from embtune.data.batching import tokenize
from embtune.objectives.matryoshka import scores_per_dim
from embtune.objectives.objective import Objective, encoder
from embtune.training import distributed


class Lists(Objective):
    """``(query, documents, scores)`` examples (kind ``list_scores``): s_il = q_i · d_il [B,L] against the
    graded scores [B,L], lists of different lengths padded to the longest (L) and masked (loss:
    listwise). At each Matryoshka dimension both sides are truncated and re-normalised
    (:func:`embtune.objectives.matryoshka.scores_per_dim`).
    """

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        L = max(len(e.documents) for e in examples)
        docs = [e.documents[j] if j < len(e.documents) else "" for e in examples for j in range(L)]
        teacher = torch.tensor([list(e.scores) + [0.0] * (L - len(e.scores)) for e in examples])
        mask = torch.tensor([[j < len(e.documents) for j in range(L)] for e in examples])
        return {"query": tokenize(model, "query", [e.query for e in examples]),
                "documents": tokenize(model, "documents", docs), "teacher": teacher, "mask": mask}

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        enc = encoder(model, batch, embeddings)
        q = enc("query")
        docs = enc("documents").view(q.size(0), -1, q.size(-1))
        scores = scores_per_dim(q, docs, [d for d, _ in dims], distributed.unwrap(model).normalize)
        return sum(w * self.loss_fn(scores[d], batch["teacher"], batch["mask"]) for d, w in dims), {}
