"""Examples -> tokenised batches: the pieces every objective's ``collate`` is made of, and the loader.

Each text column is padded only to its own longest text and tokenised for its tower
(:func:`embtune.data.formats.tower`). Hard negatives are sampled per step: K = ``group_size`` − 1 per
anchor, without replacement, padded and masked where a row has fewer. :func:`plan_batches` plans the
batches (no repeated text where the objective asks for it; each process's share under torchrun).
"""

from __future__ import annotations

import hashlib
import random

import torch
from omegaconf import DictConfig

from embtune.data.formats import Example, tower
from embtune.data.sampler import NoDuplicatesBatchSampler
from embtune.training import distributed


def tokenize(model, column: str, texts: list[str]) -> dict:
    """``texts`` tokenised for ``column``'s tower: the query prompt and ``query_max_length`` for a query
    column, the document's otherwise (``{"input_ids", "attention_mask"}`` [N,T], maybe ``prompt_mask``)."""
    return model.tokenize(texts, kind=tower(column))


def candidate_batch(model, examples: list[Example], group_size: int = 1, rng: random.Random | None = None,
                    teacher: bool = False) -> dict:
    """One batch of ``(query, positive, negatives)`` examples, tokenised (``query``, ``positive``, and
    ``negative`` [B·K texts] when group_size > 1), plus:
    ``negative_mask`` [B,K] bool (only when group_size > 1);
    ``false_negative`` [B,C] bool, candidates (positives, then negatives) equal to the anchor's positive;
    ``positive_key`` [B], ``negative_key`` [B,K] and ``query_key`` [B] int64 text keys (:func:`text_key`),
    to find such copies among candidates from other processes or earlier batches (and, for a symmetric
    loss, copies of an anchor among the anchors);
    with ``teacher``: ``teacher`` [B,1+K] float, the teacher's score of the positive (column 0) and of
    each negative (padding 0).
    """
    batch = {"query": tokenize(model, "query", [e.query for e in examples]),
             "positive": tokenize(model, "positive", [e.positive for e in examples]),
             "positive_key": torch.tensor([text_key(e.positive) for e in examples]),
             "query_key": torch.tensor([text_key(e.query) for e in examples])}
    candidates = [e.positive for e in examples]
    if group_size > 1:
        texts, mask, scores = _sample_negatives(examples, group_size - 1, rng or random.Random(0))
        batch["negative"], batch["negative_mask"] = tokenize(model, "negative", texts), mask
        batch["negative_key"] = torch.tensor([text_key(t) for t in texts]).view(len(examples), -1)
        candidates += texts
        if teacher:
            batch["teacher"] = torch.cat([torch.tensor([[e.positive_score] for e in examples]), scores], 1)
    batch["false_negative"] = _false_negatives(examples, candidates)
    return batch


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


def plan_batches(examples: list, objective, t: DictConfig, proc: distributed.Dist):
    """``(sampler, rng)`` for ``examples``, made before any model loads (so a data set too small for the
    batch floor is refused first); :func:`make_loader` then serves the batches. ``sampler.set_epoch(epoch,
    start)`` plans an epoch from ``(seed, epoch)`` alone and starts at batch ``start`` (a resumed run's
    position); ``sampler.unbatched_in(epoch)`` counts the rows left out of that epoch's plan; ``rng``
    draws the hard negatives (a checkpoint saves its state).

    Batches are planned by :class:`~embtune.data.sampler.NoDuplicatesBatchSampler`: with
    ``train.no_duplicates``, an objective that names the texts of an example (``objective.batch_texts``)
    gets batches in which none of them repeats; one that groups examples (``objective.batch_group``,
    e.g. the rows of one query) gets each group in one batch. No batch is smaller than
    ``train.min_batch_size`` (null: half of ``train.batch_size``, at least 2, or every example when there
    are fewer). Examples kept on disk
    (:class:`~embtune.data.examples.ExampleTable`) are planned from their text ids, never their texts: the
    ids are equal exactly where the texts are, so the plan is the same. Under torchrun every
    global batch holds a multiple of W rows and each process takes its equal share
    (``distributed.ShardedBatchSampler``), so cross-device candidates never repeat a text either."""
    rng = random.Random(t.seed + proc.rank)  # negative sampling
    floor = t.get("min_batch_size", 1)  # 1 (no floor): a config saved before the floor existed (resumed)
    if floor is None:  # half a batch, at least 2; a data set smaller than that is one batch of all of it
        floor = min(max(2, -(-t.batch_size // 2)), max(2, len(examples) // proc.world))
    texts_of = group_of = None
    if hasattr(examples, "ids"):  # an ExampleTable: its text ids (equal text, equal id) plan the same batches
        fields = objective.batch_fields or ()
        if t.no_duplicates and fields:
            columns = [examples.ids(f) for f in fields]
            texts_of = lambda i: tuple(int(c[i]) for c in columns)  # noqa: E731
        if objective.group_field is not None:
            groups = examples.ids(objective.group_field)
            group_of = lambda i: int(groups[i])  # noqa: E731
    else:
        if t.no_duplicates and objective.batch_texts(examples[0]) is not None:
            texts_of = lambda i: objective.batch_texts(examples[i])  # noqa: E731
        if objective.batch_group(examples[0]) is not None:
            group_of = lambda i: objective.batch_group(examples[i])  # noqa: E731
    sampler = NoDuplicatesBatchSampler(texts_of, len(examples), t.batch_size * proc.world, seed=t.seed,
                                       min_size=min(floor, t.batch_size) * proc.world, multiple=proc.world,
                                       group_of=group_of)
    if not len(sampler):
        raise ValueError(f"no batch of at least {min(floor, t.batch_size)} examples (train.min_batch_size) can be "
                         f"made from the {len(examples)} examples without repeating a text: set train.min_batch_size "
                         "lower or train.no_duplicates=false")
    if proc.world > 1:
        sampler = distributed.ShardedBatchSampler(sampler, proc.rank, proc.world)
    return sampler, rng


def make_loader(examples: list, objective, t: DictConfig, model, sampler, rng) -> torch.utils.data.DataLoader:
    """The DataLoader over ``examples`` in the batches ``sampler`` plans (:func:`plan_batches`): it yields
    ``(indices, batch)`` (indices into ``examples``, kept for messages that name rows; ``batch`` from
    ``objective.collate(model, examples, rng)``)."""
    # a generator of its own, so creating the iterator never draws from the global torch RNG that dropout
    # uses (a resumed run then equals an uninterrupted one)
    loader = torch.utils.data.DataLoader(range(len(examples)), batch_sampler=sampler,
                                         generator=torch.Generator().manual_seed(t.seed),
                                         collate_fn=lambda idx: (idx, objective.collate(
                                             model, [examples[i] for i in idx], rng)))
    return loader
