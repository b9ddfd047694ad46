"""Retrieval and STS evaluation: top-k search (:mod:`embtune.eval.index`), trec_eval metrics, Spearman
correlation.

Pure functions over embeddings; the caller encodes the texts. Shape letters: Q queries, N documents,
D embedding size, k ranking depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from embtune.data import RetrievalSet
from embtune.eval.index import CorpusSearch
from embtune.objectives.matryoshka import truncate

# the reported metrics: NDCG and recall at these cut-offs, MRR at 10 (MS MARCO's and MTEB's)
NDCG_AT, MRR_AT, RECALL_AT = 10, 10, (10, 100)
KEYS = (f"ndcg@{NDCG_AT}", f"mrr@{MRR_AT}", *(f"recall@{k}" for k in RECALL_AT))


def trec_ranking(docs: dict[str, float]) -> list[str]:
    """Document ids in the order trec_eval ranks them (what pytrec_eval, BEIR and MTEB score).

    trec_eval stores each score as a C ``float`` (float32) and sorts by score descending, then by document
    id descending (``strcmp``, byte order; Python's code-point order on ``str`` is the same as UTF-8 byte
    order). So scores equal in float32 are ties, and ``{"a": 1.0, "b": 1.0}`` ranks ``b`` first.
    """
    return sorted(docs, key=lambda doc: (np.float32(docs[doc]), doc), reverse=True)


def query_metrics(ranking: list[str], judged: dict[str, int]) -> dict[str, float]:
    """NDCG@10, MRR@10, Recall@10 and Recall@100 of one ranked list, with trec_eval's definitions.

    A document is relevant when its grade is >= 1 (trec_eval's default ``relevance_level``); unjudged
    documents are grade 0.

    - NDCG@10 (Järvelin & Kekäläinen 2002, "Cumulated gain-based evaluation of IR techniques", TOIS 20(4);
      trec_eval's ``ndcg_cut.10``): gain = the grade itself (linear, not ``2^g - 1``; grades <= 0 gain 0),
      discount ``1 / log2(rank + 1)``; the ideal ranking sorts every judged grade of the query, retrieved
      or not. 0 when no grade is positive.
    - MRR@10: ``1 / rank`` of the first relevant document in the top 10, else 0 (trec_eval's ``recip_rank``
      of the top 10: ``recip_rank · success.10``).
    - Recall@k (``recall.k``): relevant documents in the top k / relevant documents judged; 0 when none is.

    Args:
        ranking: document ids, best first (:func:`trec_ranking`).
        judged: document id -> grade for this query.
    """
    gains = [max(judged.get(doc, 0), 0) for doc in ranking[:NDCG_AT]]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:NDCG_AT]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    out = {f"ndcg@{NDCG_AT}": sum(g / math.log2(r + 2) for r, g in enumerate(gains)) / idcg if idcg else 0.0}
    first = next((r for r, doc in enumerate(ranking[:MRR_AT]) if judged.get(doc, 0) >= 1), None)
    out[f"mrr@{MRR_AT}"] = 1.0 / (first + 1) if first is not None else 0.0
    relevant = {doc for doc, g in judged.items() if g >= 1}
    for k in RECALL_AT:
        out[f"recall@{k}"] = len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0
    return out


def retrieval_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                      ignore_identical_ids: bool = True) -> dict[str, float | None]:
    """NDCG@10, MRR@10, Recall@10 and Recall@100 as BEIR and MTEB compute them with pytrec_eval.

    Each query is ranked as trec_eval ranks it (:func:`trec_ranking`: float32 scores, ties by document id
    descending) and scored by :func:`query_metrics`; the result is the mean over every qrels query, as
    BEIR's and MTEB's ``EvaluateRetrieval`` average pytrec_eval's per-query values:

    - a query whose judgments are all 0 is kept and scores 0 (pytrec_eval returns 0 for it);
    - a judged document that is not in the run (e.g. missing from the corpus) can never be retrieved, but
      it still counts in the ideal ranking and in recall's denominator;
    - a qrels query missing from the run counts 0 (pytrec_eval leaves it out; every query the evaluators
      encode is in the run, so the two agree there);
    - run queries without qrels are ignored.

    Args:
        run: query id -> {doc id -> score}; higher is better. Not modified.
        qrels: query id -> {doc id -> relevance grade}.
        ignore_identical_ids: leave a document whose id equals the query id out of that query's ranking,
            as BEIR (``EvaluateRetrieval.evaluate(..., ignore_identical_ids=True)``) and MTEB do: in
            ArguAna-style sets each query is itself a corpus document and would retrieve itself first.

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@10", "recall@100"}`` -> mean in [0, 1]; all None (missing: they
        cannot be computed) when ``qrels`` has no query.
    """
    per_query = []
    for qid, judged in qrels.items():
        docs = run.get(qid, {})
        if ignore_identical_ids and qid in docs:
            docs = {doc: s for doc, s in docs.items() if doc != qid}
        per_query.append(query_metrics(trec_ranking(docs), judged))
    return {key: float(np.mean([m[key] for m in per_query])) if per_query else None for key in KEYS}


def evaluate_retrieval(query_emb: torch.Tensor, doc_emb: torch.Tensor, test: RetrievalSet,
                       query_ids: list[str], doc_ids: list[str], k: int = 100,
                       dims: list[int] | None = None, normalize: bool = True,
                       ignore_identical_ids: bool = True,
                       corpus_search: CorpusSearch | None = None) -> dict[str, float]:
    """Rank every document for every query and score the ranking against ``test.qrels``.

    The full-size embeddings are used as given (normalised already if the model normalises). For each
    Matryoshka dim ``d`` in ``dims`` both sides are truncated to ``[:, :d]`` and L2-re-normalised (when
    ``normalize``, as in training: :func:`embtune.objectives.matryoshka.truncate`), then ranked and scored again
    (Kusupati et al. 2022, "Matryoshka Representation Learning").

    Args:
        query_emb: [Q, D] embeddings of ``query_ids``, in that order.
        doc_emb: [N, D] embeddings of ``doc_ids``; every document is a candidate.
        test: the retrieval set; only its ``qrels`` are read. Qrels queries absent from ``query_ids``
            count 0 (see :func:`retrieval_metrics`).
        query_ids, doc_ids: unique ids, one per row.
        k: ranking depth; must be >= 100 since Recall@100 is reported.
        dims: Matryoshka dims to evaluate as well, each in [1, D].
        ignore_identical_ids: a query's own document (same id) is no candidate for it (BEIR, MTEB; see
            :func:`retrieval_metrics`); the search then goes one deeper, so ``k`` others are still ranked.
        corpus_search: how to rank (:class:`embtune.eval.index.CorpusSearch`); None: exact (``index=flat``).

    Returns:
        The :func:`retrieval_metrics` keys, plus ``f"dim{d}/{key}"`` for each ``d`` in ``dims``.

    Raises:
        ValueError: on shape / id-count mismatch, duplicate ids, ``k < 100`` or a dim outside [1, D].
    """
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"need [Q, D] and [N, D] embeddings, got {tuple(query_emb.shape)} and "
                         f"{tuple(doc_emb.shape)}")
    for name, emb, ids in (("query", query_emb, query_ids), ("doc", doc_emb, doc_ids)):
        if emb.shape[0] != len(ids):
            raise ValueError(f"{name}_emb has {emb.shape[0]} rows but {name}_ids has {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}_ids contains duplicates")
    if k < 100:
        raise ValueError(f"k={k} < 100 would truncate the ranking that recall@100 needs")
    size = query_emb.shape[1]
    bad = [d for d in dims or [] if not 1 <= d <= size]
    if bad:
        raise ValueError(f"Matryoshka dims {bad} must lie in [1, {size}] (the embedding size)")

    # one deeper when a query may find itself: BEIR's search also takes k + 1 and drops the self-hit
    depth = k + 1 if ignore_identical_ids and not set(query_ids).isdisjoint(doc_ids) else k

    ranker = corpus_search or CorpusSearch(option="eval")

    def rank_and_score(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
        scores, indices = ranker(q, d, depth)
        run = {qid: {doc_ids[j]: s for s, j in zip(row_s, row_i) if j >= 0}  # -1: an approximate index's gap
               for qid, row_s, row_i in zip(query_ids, scores.tolist(), indices.tolist())}
        return retrieval_metrics(run, test.qrels, ignore_identical_ids)

    out = rank_and_score(query_emb, doc_emb)
    for d in dims or []:
        small = rank_and_score(truncate(query_emb.float(), d, normalize), truncate(doc_emb.float(), d, normalize))
        out.update({f"dim{d}/{key}": value for key, value in small.items()})
    return out


# Cosines closer than this are one score (a tie) for Spearman: the same text on both sides gives 1 only up
# to rounding (1.0000001, 0.99999994 from float32 embeddings), and a GPU encodes one text slightly differently
# in differently padded batches; no real difference between two pairs' cosines is that small.
TIE_TOLERANCE = 1e-6


def _merge_ties(x: np.ndarray, tol: float) -> np.ndarray:
    """``x`` with each run of sorted values less than ``tol`` apart set to the run's smallest value."""
    order = np.argsort(x, kind="stable")
    ranked = x[order]
    starts = np.flatnonzero(np.r_[True, np.diff(ranked) >= tol])  # where a new tie group begins
    merged = np.empty_like(x)
    merged[order] = ranked[starts[np.searchsorted(starts, np.arange(len(x)), side="right") - 1]]
    return merged


@torch.no_grad()
def sts_spearman(emb1: torch.Tensor, emb2: torch.Tensor, gold: Sequence[float]) -> float:
    """Spearman rank correlation between pair cosine similarities and gold scores (SentEval / MTEB STS).

    Cosines (computed in float64) that differ by less than ``TIE_TOLERANCE`` are ties and share their
    average rank, as equal gold scores do (scipy's ``spearmanr``: Pearson correlation of the ranks).

    Args:
        emb1, emb2: [N, D] embeddings of the two sides of N pairs.
        gold: N gold similarity scores (any scale; only ranks matter).

    Returns:
        rho in [-1, 1] (not x100); None (missing) if either side is constant (all cosines tied): the
        correlation is undefined.

    Raises:
        ValueError: if the shapes differ, are not 2-D, ``len(gold) != N`` or N < 2.
    """
    if emb1.ndim != 2 or emb1.shape != emb2.shape or len(gold) != emb1.shape[0] or len(gold) < 2:
        raise ValueError(f"need two [N, D] tensors and N >= 2 gold scores, got {tuple(emb1.shape)}, "
                         f"{tuple(emb2.shape)} and {len(gold)} scores")
    cos = F.cosine_similarity(emb1.double(), emb2.double(), dim=-1).cpu().numpy()
    gold = np.asarray(gold, dtype=np.float64)
    if np.ptp(cos) < TIE_TOLERANCE or np.ptp(gold) == 0:  # constant: scipy would warn and return NaN
        return None
    rho = float(spearmanr(_merge_ties(cos, TIE_TOLERANCE), gold).statistic)
    return rho if np.isfinite(rho) else None
