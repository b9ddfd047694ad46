"""Examples -> tokenised batches, one collate per example kind (see ``embtune.data.formats``).

Each text column is padded only to its own longest text. Hard negatives are sampled per step: K =
``group_size`` − 1 per anchor, without replacement, padded and masked where a row has fewer.
:func:`make_loader` plans the batches (no repeated text; each process's share under torchrun).
"""

from __future__ import annotations

import hashlib
import random

import torch
from omegaconf import DictConfig

from embtune.data.formats import Example, LabeledText
from embtune.data.sampler import NoDuplicatesBatchSampler, ShuffledBatchSampler
from embtune.training import distributed


def collate(model, examples: list, kind: str, group_size: int = 1, rng: random.Random | None = None) -> dict:
    """Tokenise one batch of examples of ``kind`` for ``model`` (an :class:`embtune.model.embedder.Embedder`).

    Query columns (``query``, ``text1``) get the query prompt and tower, the others the document's.
    Returns a dict of tokenised columns (``{"input_ids", "attention_mask"}`` each) plus:
    ``scores``: ``negative`` [B·K texts], ``negative_mask`` [B,K] bool (only when group_size > 1),
    ``false_negative`` [B,C] bool, candidates (positives, then negatives) equal to the anchor's positive;
    ``positive_key`` [B], ``negative_key`` [B,K] and ``query_key`` [B] int64 text keys (:func:`text_key`),
    to find such copies among candidates from other processes or earlier batches (and, for a symmetric
    loss, copies of an anchor among the anchors);
    ``teacher_scores``: as ``scores``, plus ``teacher`` [B,1+K] float, the teacher's score of the
    positive (column 0) and of each negative (padding 0);
    ``pair_scores``: ``score`` [B] float; ``list_scores``: ``documents`` [B·L texts], ``teacher`` [B,L],
    ``mask`` [B,L]; ``embeddings``: ``label`` [B] int64.
    """
    q_len, d_len = model.query_max_length, model.document_max_length
    if kind in ("scores", "teacher_scores"):
        batch = {"query": model.tokenize([e.query for e in examples], q_len, "query"),
                 "positive": model.tokenize([e.positive for e in examples], d_len),
                 "positive_key": torch.tensor([text_key(e.positive) for e in examples]),
                 "query_key": torch.tensor([text_key(e.query) for e in examples])}
        candidates = [e.positive for e in examples]
        if group_size > 1:
            texts, mask, scores = _sample_negatives(examples, group_size - 1, rng or random.Random(0))
            batch["negative"], batch["negative_mask"] = model.tokenize(texts, d_len), mask
            batch["negative_key"] = torch.tensor([text_key(t) for t in texts]).view(len(examples), -1)
            candidates += texts
            if kind == "teacher_scores":
                batch["teacher"] = torch.cat([torch.tensor([[e.positive_score] for e in examples]), scores], 1)
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


def text_key(text: str) -> int:
    """A stable int64 key of a text (BLAKE2b, 8 bytes): equal texts, equal keys, in every process
    (Python's ``hash`` of a string differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _sample_negatives(examples: list[Example], k: int, rng: random.Random
                      ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """k negatives per example, without replacement: texts [B·K], mask [B,K], teacher scores [B,K]
    (0 where the example has none or for padding)."""
    texts, mask, scores = [], [], []
    for e in examples:
        n = len(e.negatives)
        chosen = rng.sample(range(n), k) if n >= k else list(range(n))
        texts += [e.negatives[j] for j in chosen] + [""] * (k - len(chosen))
        mask.append([True] * len(chosen) + [False] * (k - len(chosen)))
        scores.append([e.negative_scores[j] if e.negative_scores else 0.0 for j in chosen] + [0.0] * (k - len(chosen)))
    return texts, torch.tensor(mask), torch.tensor(scores, dtype=torch.float32)


def as_labeled_texts(examples: list[Example]) -> list[LabeledText]:
    """Pairs as classes, for classification losses (ArcFace) on pair data: a query and its positives
    form one class; examples with the same query text share it."""
    classes: dict[str, int] = {}
    out = []
    for e in examples:
        label = classes.setdefault(e.query, len(classes))
        out += [LabeledText(e.query, label), LabeledText(e.positive, label)]
    return list(dict.fromkeys(out))  # a query with several positives appears once


def make_loader(examples: list, kind: str, t: DictConfig, proc: distributed.Dist, model, group_size: int):
    """``(loader, sampler, rng)``: the DataLoader yields ``(indices, batch)`` (indices into ``examples``,
    kept for messages that name rows); ``sampler.set_epoch(epoch, start)`` plans an epoch from
    ``(seed, epoch)`` alone and starts at batch ``start`` (a resumed run's position); ``rng`` draws the
    hard negatives (a checkpoint saves its state).

    Candidate-scoring kinds get batches without a repeated text (``train.no_duplicates``); under torchrun
    each process takes its equal share of each global batch of W·B (``distributed.ShardedBatchSampler``),
    so cross-device candidates never repeat a text."""
    rng = random.Random(t.seed + proc.rank)  # negative sampling
    global_batch = t.batch_size * proc.world
    drop_last = len(examples) % global_batch == 1  # a batch of one has no in-batch negative
    if kind in ("scores", "teacher_scores") and t.no_duplicates:
        sampler = NoDuplicatesBatchSampler(lambda i: (examples[i].query, examples[i].positive), len(examples),
                                           global_batch, drop_last, t.seed)
    else:
        sampler = ShuffledBatchSampler(len(examples), global_batch, drop_last, t.seed)
    if proc.world > 1:
        sampler = distributed.ShardedBatchSampler(sampler, proc.rank, proc.world)
    # a generator of its own, so creating the iterator never draws from the global torch RNG that dropout
    # uses (a resumed run then equals an uninterrupted one)
    loader = torch.utils.data.DataLoader(range(len(examples)), batch_sampler=sampler,
                                         generator=torch.Generator().manual_seed(t.seed),
                                         collate_fn=lambda idx: (idx, collate(model, [examples[i] for i in idx],
                                                                              kind, group_size, rng)))
    return loader, sampler, rng
