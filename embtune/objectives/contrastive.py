"""Contrastive training on candidate scores: each anchor against its positive and the negatives."""

from __future__ import annotations

import random

from torch import Tensor

from embtune.data.batching import candidate_batch
from embtune.objectives.candidates import candidate_loss
from embtune.objectives.matryoshka import truncate
from embtune.objectives.objective import Objective, encoder
from embtune.training import distributed


class Contrastive(Objective):
    """``(query, positive, negatives)`` examples (kind ``scores``), scored against candidates: the batch's
    positives (``negatives=in_batch``), its hard negatives (``hard``), other processes' (``cross_device``),
    a cross-batch memory (``cross_batch``), with the hardest kept (``online_hard``). The candidate pipeline
    is :func:`embtune.objectives.candidates.candidate_loss`; losses: info_nce, simcse, hinge, triplet,
    binary, logistic.

    Batches hold no text twice (a query or positive repeated would be a false in-batch negative); K =
    ``negatives.group_size`` − 1 hard negatives are sampled per anchor and step. Metrics:
    ``train/candidates``, the mean number of real candidates per anchor.
    """

    candidates = in_batch = True
    batch_fields = ("query", "positive")

    @property
    def group_size(self) -> int:
        """Positive + sampled negatives per anchor (1: no negatives are encoded)."""
        return self.negatives.group_size if self.negatives.needs_negatives else 1

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        return candidate_batch(model, examples, self.group_size, rng)

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        normalize = distributed.unwrap(model).normalize
        return candidate_loss(encoder(model, batch, embeddings), batch, self.negatives, self.loss_fn, dims,
                              lambda x, d: truncate(x, d, normalize))
