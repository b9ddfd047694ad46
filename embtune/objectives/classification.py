"""Classification: each text's embedding among learnt class centres (ArcFace)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from embtune.data.batching import tokenize
from embtune.data.formats import Example, LabeledText
from embtune.objectives.objective import Objective, encoder


class Classification(Objective):
    """``(text, label)`` examples (kind ``embeddings``): the loss classifies each embedding e_i [B,D] among
    C class centres W [C,D] that it owns and learns (loss: arcface). Pair data works too: a query and
    its positives form one class (:func:`as_labeled_texts`).

    Before training (:meth:`start`) W is sized to the data's classes, each centre starts at the mean
    embedding of its texts, and per-class margins are set from class frequencies. The class centres
    are full-size, so there is no Matryoshka form (refused before the model loads).
    """

    matryoshka = False
    per_example = False  # pairs merge into classes across rows

    def examples(self, examples: list, origins: list[int] | None, data, data_format) -> tuple[list, list[int] | None]:
        if examples and isinstance(examples[0], Example):
            return as_labeled_texts(examples), None  # texts of several rows merge into classes
        return examples, origins

    @torch.no_grad()
    def start(self, model, examples: list, batch_size: int) -> None:
        """Size the class-weight matrix, set per-class margins from class frequencies, and start each class
        weight at the mean embedding of its texts (encoded ``batch_size`` at a time)."""
        loss_fn = self.loss_fn
        if not hasattr(loss_fn, "build"):
            return
        labels = torch.tensor([e.label for e in examples])
        n_classes = int(labels.max()) + 1
        emb = torch.from_numpy(model.encode([e.text for e in examples], batch_size=batch_size))
        means = torch.zeros(n_classes, emb.size(1)).index_add_(0, labels, emb)
        loss_fn.build(n_classes, emb.size(1))
        loss_fn.set_class_counts(torch.bincount(labels, minlength=n_classes).float())
        loss_fn.init_weights(F.normalize(means, dim=-1))

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        return {"text": tokenize(model, "text", [e.text for e in examples]),
                "label": torch.tensor([e.label for e in examples], dtype=torch.long)}

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(encoder(model, batch, embeddings)("text"), batch["label"]), {}


def as_labeled_texts(examples: list[Example]) -> list[LabeledText]:
    """Pairs as classes, for classification losses (ArcFace) on pair data: a query and its positives
    form one class; examples with the same query text share it."""
    classes: dict[str, int] = {}
    out = []
    for e in examples:
        label = classes.setdefault(e.query, len(classes))
        out += [LabeledText(e.query, label), LabeledText(e.positive, label)]
    return list(dict.fromkeys(out))  # a query with several positives appears once
