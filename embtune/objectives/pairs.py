"""Scored text pairs: the cosine of each pair against its gold score (STS, NLI labels)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from embtune.data.batching import tokenize
from embtune.data.checks import check_label_range
from embtune.objectives.matryoshka import truncate
from embtune.objectives.objective import Objective, encoder
from embtune.training import distributed


class Pairs(Objective):
    """``(text1, text2, score)`` examples (kind ``pair_scores``): s_i = cos(e1_i, e2_i) [B] against the
    gold score [B] (losses: cosent, pointwise_bce). ``text1`` goes through the query tower, ``text2``
    through the document tower. At each Matryoshka dimension both embeddings are truncated (and
    re-normalised) before the cosine. Scores outside the loss's ``label_range`` are refused (or dropped,
    ``data.drop_bad_rows=true``) before the model loads.
    """

    def examples(self, examples: list, origins: list[int] | None, data, data_format) -> tuple[list, list[int] | None]:
        field = getattr(data_format, "label", None) or getattr(data_format, "score", "score")
        return check_label_range(examples, origins, data.source, self.loss_fn, field, data.problems)

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        return {"text1": tokenize(model, "text1", [e.text1 for e in examples]),
                "text2": tokenize(model, "text2", [e.text2 for e in examples]),
                "score": torch.tensor([e.score for e in examples], dtype=torch.float32)}

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        normalize = distributed.unwrap(model).normalize
        enc = encoder(model, batch, embeddings)
        e1, e2 = enc("text1"), enc("text2")
        return sum(w * self.loss_fn(F.cosine_similarity(truncate(e1, d, normalize), truncate(e2, d, normalize), dim=-1),
                                    batch["score"]) for d, w in dims), {}
