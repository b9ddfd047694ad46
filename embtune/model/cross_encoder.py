"""Distillation from a cross-encoder: teacher scores for every (query, document) pair of the data.

The teacher scores each example's positive and all its negatives once, before training (the data
then looks like FlagEmbedding's files with ``pos_scores``/``neg_scores``); each step's sampled
negatives take their scores along (``embtune.data.batching``). Losses: ``distill_kl``, ``margin_mse``.
"""

from __future__ import annotations

import logging

import torch

from embtune.data.formats import Example

log = logging.getLogger(__name__)


class CrossEncoderTeacher:
    """A sequence-classification model (any ``AutoModelForSequenceClassification``: a local folder or a
    hub name) scoring (query, document) pairs; its score is the logit of its single output, or of
    ``label`` when it has several (e.g. 1 = relevant). Loaded on first use, so a misconfigured run fails
    its cheap checks before any model loads.

    Args:
        name_or_path: model folder or hub name (resolved like the student, ``embtune.model.resolve_model_path``).
        max_length: tokens per (query, document) pair.
        batch_size: pairs per forward pass.
        label: output column used as the score when the model has several outputs.
        device: "auto" (CUDA when available) or a torch device string.
    """

    def __init__(self, name_or_path: str, max_length: int = 256, batch_size: int = 32, label: int = 1,
                 device: str = "auto"):
        self.name_or_path, self.max_length, self.batch_size, self.label = name_or_path, max_length, batch_size, label
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model = self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from embtune.model.resolve import resolve_model_path

        path = resolve_model_path(self.name_or_path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, queries: list[str], documents: list[str]) -> list[float]:
        """Scores of the pairs (queries[i], documents[i]), in the model's logit units."""
        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(queries), self.batch_size):
            enc = self._tokenizer(queries[i:i + self.batch_size], documents[i:i + self.batch_size], padding=True,
                                  truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
            logits = self._model(**enc).logits.float()
            out += (logits[:, 0] if logits.size(1) == 1 else logits[:, self.label]).tolist()
        return out


def score_examples(teacher, examples: list[Example]) -> list[Example]:
    """Each example with its teacher scores filled in: (query, positive) and (query, negative) for every
    negative. Each distinct pair is scored once."""
    pairs = list(dict.fromkeys((e.query, d) for e in examples for d in (e.positive, *e.negatives)))
    log.info("teacher %s: scoring %d (query, document) pairs", teacher.name_or_path, len(pairs))
    score = dict(zip(pairs, teacher([q for q, _ in pairs], [d for _, d in pairs])))
    return [e._replace(positive_score=score[e.query, e.positive],
                       negative_scores=tuple(score[e.query, d] for d in e.negatives)) for e in examples]
