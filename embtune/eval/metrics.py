"""Retrieval and STS evaluation: exact top-k search, trec_eval metrics, Spearman correlation.

Pure functions over embeddings; the caller encodes the texts. Shape letters: Q queries, N documents,
D embedding size, k ranking depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import ir_measures
import numpy as np
import torch
import torch.nn.functional as F
from ir_measures import RR, R, nDCG
from scipy.stats import spearmanr

from embtune.data import RetrievalSet
from embtune.objectives.matryoshka import truncate

# Output key -> ir_measures measure (nDCG, R: trec_eval via pytrec_eval; RR@10: MS MARCO script).
MEASURES = {"ndcg@10": nDCG @ 10, "mrr@10": RR @ 10, "recall@10": R @ 10, "recall@100": R @ 100}


@torch.no_grad()
def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, block_size: int = 1024):
    """Exact dot-product top-k, in blocks of queries and documents.

    Exact search in plain torch (no ANN index, no extra dependency): each block of at most
    ``block_size`` queries is scored against blocks of ``block_size`` documents, and the running top-k
    is merged with each block's top-k, so memory stays at ``block_size x (block_size + k)`` scores.
    Computed in float32 without autograd, on the inputs' device.

    Args:
        query_emb: [Q, D] query embeddings.
        doc_emb: [N, D] document embeddings.
        k: ranking depth; ``k' = min(k, N)`` results are returned per query.
        block_size: queries and documents per block.

    Returns:
        ``(scores [Q, k'], indices [Q, k'])``: scores in descending order per row, indices into ``doc_emb``.
        The order among exactly tied scores is unspecified.

    Raises:
        ValueError: if the inputs are not 2-D with equal D, or if ``k`` or ``block_size`` is < 1.
    """
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"search needs [Q, D] and [N, D] embeddings, got {tuple(query_emb.shape)} "
                         f"and {tuple(doc_emb.shape)}")
    if k < 1 or block_size < 1:
        raise ValueError(f"k and block_size must be >= 1, got k={k}, block_size={block_size}")
    q, d = query_emb.detach().float(), doc_emb.detach().float()
    k = min(k, d.shape[0])
    scores = q.new_empty(q.shape[0], k)
    indices = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for qs in range(0, q.shape[0], block_size):
        qb = q[qs:qs + block_size]
        best_s, best_i = q.new_empty(qb.shape[0], 0), indices.new_empty(qb.shape[0], 0)
        for ds in range(0, d.shape[0], block_size):
            s, i = (qb @ d[ds:ds + block_size].T).topk(min(k, d.shape[0] - ds, block_size), dim=1)
            # The global top-k is inside (running top-k) ∪ (this block's top-k).
            best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ds], 1)
            best_s, pos = best_s.topk(min(k, best_s.shape[1]), dim=1)
            best_i = best_i.gather(1, pos)
        scores[qs:qs + block_size], indices[qs:qs + block_size] = best_s, best_i
    return scores, indices


def retrieval_metrics(run: dict[str, dict[str, float]],
                      qrels: dict[str, dict[str, int]]) -> dict[str, float | None]:
    """nDCG@10, MRR@10, Recall@10 and Recall@100 with trec_eval's conventions, via ``ir_measures``.

    - nDCG (Järvelin & Kekäläinen 2002, "Cumulated gain-based evaluation of IR techniques", TOIS 20(4)):
      trec_eval's ``ndcg_cut``: gain = the grade itself (linear, not ``2^g - 1``), discount
      ``1 / log2(rank + 1)``, ideal ranking from all judged grades of the query.
    - MRR@10: 1/rank of the first doc with grade > 0 in the top 10, else 0 (ir_measures computes it with
      MS MARCO's reference script; equal to trec_eval's ``recip_rank`` on the top 10).
    - Recall@k: relevant docs (grade > 0) in the top k / all relevant docs of the query.
    - Ranking: by score descending, exact ties by doc id ascending. Why we re-rank first: trec_eval
      breaks ties by doc id descending but the MS MARCO script ascending, so tied scores would give the
      metrics inconsistent rankings; we hand them strictly decreasing rank scores instead.

    Averaged over every qrels query with at least one relevant doc (grade > 0). Such a query missing from
    the run counts 0: pytrec_eval itself drops it, inflating the mean, so we average per-query values
    ourselves. Queries whose judgments are all <= 0 are excluded: nDCG and recall are undefined for
    them. Run queries without qrels are ignored.

    Args:
        run: query id -> {doc id -> score}; higher is better.
        qrels: query id -> {doc id -> relevance grade}.

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@10", "recall@100"}`` -> mean in [0, 1]; all None (missing: they
        cannot be computed) if no query has a relevant doc.
    """
    qids = [qid for qid, judged in qrels.items() if any(g > 0 for g in judged.values())]
    per_query = {key: dict.fromkeys(qids, 0.0) for key in MEASURES}
    if qids:
        by_measure = {m: key for key, m in MEASURES.items()}
        judged = {qid: qrels[qid] for qid in qids}
        scored = {}
        for qid, docs in run.items():
            if qid in judged and docs:
                order = sorted(docs, key=lambda doc: (-docs[doc], doc))
                scored[qid] = {doc: float(len(order) - r) for r, doc in enumerate(order)}
        for m in ir_measures.iter_calc(list(MEASURES.values()), judged, scored):
            per_query[by_measure[m.measure]][m.query_id] = m.value
    return {key: float(np.mean(list(vals.values()))) if vals else None for key, vals in per_query.items()}


def evaluate_retrieval(query_emb: torch.Tensor, doc_emb: torch.Tensor, test: RetrievalSet,
                       query_ids: list[str], doc_ids: list[str], k: int = 100,
                       dims: list[int] | None = None, normalize: bool = True) -> dict[str, float]:
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

    def rank_and_score(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
        scores, indices = search(q, d, k)
        run = {qid: {doc_ids[j]: s for s, j in zip(row_s, row_i)}
               for qid, row_s, row_i in zip(query_ids, scores.tolist(), indices.tolist())}
        return retrieval_metrics(run, test.qrels)

    out = rank_and_score(query_emb, doc_emb)
    for d in dims or []:
        small = rank_and_score(truncate(query_emb.float(), d, normalize), truncate(doc_emb.float(), d, normalize))
        out.update({f"dim{d}/{key}": value for key, value in small.items()})
    return out


@torch.no_grad()
def sts_spearman(emb1: torch.Tensor, emb2: torch.Tensor, gold: Sequence[float]) -> float:
    """Spearman rank correlation between pair cosine similarities and gold scores (SentEval / MTEB STS).

    Args:
        emb1, emb2: [N, D] embeddings of the two sides of N pairs.
        gold: N gold similarity scores (any scale; only ranks matter).

    Returns:
        rho in [-1, 1] (not x100); None (missing) if either side is constant: the correlation is undefined.

    Raises:
        ValueError: if the shapes differ, are not 2-D, ``len(gold) != N`` or N < 2.
    """
    if emb1.ndim != 2 or emb1.shape != emb2.shape or len(gold) != emb1.shape[0] or len(gold) < 2:
        raise ValueError(f"need two [N, D] tensors and N >= 2 gold scores, got {tuple(emb1.shape)}, "
                         f"{tuple(emb2.shape)} and {len(gold)} scores")
    cos = F.cosine_similarity(emb1.float(), emb2.float(), dim=-1)
    rho = float(spearmanr(cos.cpu().numpy(), np.asarray(gold, dtype=np.float64)).statistic)
    return rho if np.isfinite(rho) else None
