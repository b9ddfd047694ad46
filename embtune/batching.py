"""Examples -> tokenised batches, one collate per example kind (see ``embtune.formats``).

Each text column is padded only to its own longest text. Hard negatives are sampled per step: K =
``group_size`` − 1 per anchor, without replacement, padded and masked where a row has fewer.
"""

from __future__ import annotations

import random

import torch

from embtune.formats import Example, LabeledText


def collate(model, examples: list, kind: str, group_size: int = 1, rng: random.Random | None = None) -> dict:
    """Tokenise one batch of examples of ``kind`` for ``model`` (an :class:`embtune.model.Embedder`).

    Query columns (``query``, ``text1``) get the query prompt and tower, the others the document's.
    Returns a dict of tokenised columns (``{"input_ids", "attention_mask"}`` each) plus:
    ``scores``: ``negative`` [B·K texts], ``negative_mask`` [B,K] bool (only when group_size > 1),
    ``false_negative`` [B,C] bool, candidates (positives, then negatives) equal to the anchor's positive;
    ``pair_scores``: ``score`` [B] float; ``list_scores``: ``documents`` [B·L texts], ``teacher`` [B,L],
    ``mask`` [B,L]; ``embeddings``: ``label`` [B] int64.
    """
    q_len, d_len = model.query_max_length, model.document_max_length
    if kind == "scores":
        batch = {"query": model.tokenize([e.query for e in examples], q_len, "query"),
                 "positive": model.tokenize([e.positive for e in examples], d_len)}
        candidates = [e.positive for e in examples]
        if group_size > 1:
            texts, mask = _sample_negatives(examples, group_size - 1, rng or random.Random(0))
            batch["negative"], batch["negative_mask"] = model.tokenize(texts, d_len), mask
            candidates += texts
        batch["false_negative"] = _false_negatives(examples, candidates)
        return batch
    if kind == "pair_scores":
        return {"text1": model.tokenize([e.text1 for e in examples], q_len, "query"),
                "text2": model.tokenize([e.text2 for e in examples], d_len),
                "score": torch.tensor([e.score for e in examples], dtype=torch.float32)}
    if kind == "list_scores":
        L = max(len(e.documents) for e in examples)
        docs = [e.documents[j] if j < len(e.documents) else "" for e in examples for j in range(L)]
        teacher = torch.tensor([list(e.scores) + [0.0] * (L - len(e.scores)) for e in examples])
        mask = torch.tensor([[j < len(e.documents) for j in range(L)] for e in examples])
        return {"query": model.tokenize([e.query for e in examples], q_len, "query"),
                "documents": model.tokenize(docs, d_len), "teacher": teacher, "mask": mask}
    if kind == "embeddings":
        return {"text": model.tokenize([e.text for e in examples], d_len),
                "label": torch.tensor([e.label for e in examples], dtype=torch.long)}
    raise ValueError(f"unknown example kind {kind!r}")


def _false_negatives(examples: list[Example], candidates: list[str]) -> torch.Tensor:
    """[B,C] bool: candidate c is a copy of anchor i's positive in another column (a false negative)."""
    columns: dict[str, list[int]] = {}
    for c, text in enumerate(candidates):
        columns.setdefault(text, []).append(c)
    mask = torch.zeros(len(examples), len(candidates), dtype=torch.bool)
    for i, e in enumerate(examples):
        for c in columns.get(e.positive, ()):
            mask[i, c] = c != i
    return mask


def _sample_negatives(examples: list[Example], k: int, rng: random.Random) -> tuple[list[str], torch.Tensor]:
    texts, mask = [], []
    for e in examples:
        chosen = rng.sample(e.negatives, k) if len(e.negatives) >= k else list(e.negatives)
        texts += chosen + [""] * (k - len(chosen))
        mask.append([True] * len(chosen) + [False] * (k - len(chosen)))
    return texts, torch.tensor(mask)


def as_labeled_texts(examples: list[Example]) -> list[LabeledText]:
    """Pairs as classes, for classification losses (ArcFace) on pair data: a query and its positives
    form one class; examples with the same query text share it."""
    classes: dict[str, int] = {}
    out = []
    for e in examples:
        label = classes.setdefault(e.query, len(classes))
        out += [LabeledText(e.query, label), LabeledText(e.positive, label)]
    return list(dict.fromkeys(out))  # a query with several positives appears once


