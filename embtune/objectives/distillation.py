"""Distillation: the student's scores over each query's positive and hard negatives match a teacher's."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from embtune.data.batching import candidate_batch
from embtune.objectives.matryoshka import truncate
from embtune.objectives.objective import Objective, encoder
from embtune.training import distributed


class Distillation(Objective):
    """``(query, positive, negatives)`` examples with a teacher's score of each pair (kind
    ``teacher_scores``): the candidates of query i are its own positive (column 0) and its K sampled hard
    negatives, scored by the student, s_ic = q_i · d_ic [B,1+K], and the loss compares them with the
    teacher's [B,1+K] under a mask of real candidates (losses: distill_kl, margin_mse). Teacher scores
    come from the data (``data_format.positive_scores``/``negative_scores``) or a cross-encoder
    (``teacher=cross_encoder``). At each Matryoshka dimension both sides are truncated and re-normalised.
    """

    candidates = distils = True
    batch_fields = ("query", "positive")

    def check(self, data_format, teacher) -> None:
        """A distillation loss needs hard negatives (its candidate list) and teacher scores from a teacher
        or the data, not both.

        Raises:
            ValueError: naming the options that clash.
        """
        loss, negatives = self.loss_fn, self.negatives
        if getattr(negatives, "name", None) != "hard":
            raise ValueError(f"loss={loss.name} distils over each query's positive and hard negatives: use "
                             f"negatives=hard (with negatives.group_size > 1), not negatives={negatives.name}")
        if teacher is None and not getattr(data_format, "has_scores", False):
            raise ValueError(f"loss={loss.name} needs teacher scores: set teacher=cross_encoder "
                             f"teacher.name_or_path=MODEL, or read them from the data with "
                             f"data_format.positive_scores=pos_scores data_format.negative_scores=neg_scores "
                             f"(data_format={data_format.name})")
        if teacher is not None and getattr(data_format, "has_scores", False):
            raise ValueError("both a teacher and teacher-score columns are set: pick one (teacher=... or "
                             "data_format.positive_scores/negative_scores)")

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        return candidate_batch(model, examples, self.negatives.group_size, rng, teacher=True)

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        normalize = distributed.unwrap(model).normalize
        enc = encoder(model, batch, embeddings)
        q, p = enc("query"), enc("positive")
        docs = torch.cat([p[:, None], enc("negative").view(q.size(0), -1, q.size(-1))], dim=1)
        mask = torch.cat([torch.ones_like(batch["negative_mask"][:, :1]), batch["negative_mask"]], dim=1)
        return sum(w * self.loss_fn(torch.einsum("bd,bcd->bc", truncate(q, d, normalize), truncate(docs, d, normalize)),
                                    batch["teacher"], mask) for d, w in dims), {}
