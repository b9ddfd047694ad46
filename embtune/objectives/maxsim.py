"""Late interaction: MaxSim scores between token vectors (Khattab & Zaharia 2020, "ColBERT", SIGIR, §3.3),
for training (scores [B,C] over the same candidates as single vectors) and exact blocked search.

    s(q, d) = (1 / |q|) · Σ_{i ∈ q} max_{j ∈ d} q_i · d_j

over the *real* (non-padding) tokens of query q and document d; token vectors are unit length.

Averaging, not summing (ColBERT sums). For one query the divisor is a constant, so rankings and every
retrieval metric are the same either way. In training the score is a logit: a sum grows with the query's
length (a 30-token query's logits reach 30/τ), so one temperature would mean a different softmax
sharpness for every query length; the mean stays in [-1, 1] like a cosine, so the single-vector losses,
temperatures and margins apply unchanged. The same function scores in training and in evaluation.

Padding: a padded document token is set to ``-inf`` before the max, so it never wins (``0`` would win
whenever every real token scores below 0); a padded query token adds nothing to the sum and is not
counted in the divisor. ColBERT's query augmentation (padding queries with [MASK] tokens that are then
scored) is not used: the tokens summed are exactly the query's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from embtune.objectives.contrastive import Contrastive


def maxsim(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
    """MaxSim of every query against every document.

    Args:
        q: query token vectors [A, Tq, D]; q_mask: [A, Tq], True/1 for real tokens.
        d: document token vectors [B, Td, D]; d_mask: [B, Td].
    Returns:
        scores [A, B], float32. A document without a real token scores ``-inf`` for every query; a query
        without one scores 0.
    Raises:
        ValueError: shapes that do not fit.
    """
    if q.dim() != 3 or d.dim() != 3 or q.size(-1) != d.size(-1) or q_mask.shape != q.shape[:2] \
            or d_mask.shape != d.shape[:2]:
        raise ValueError(f"maxsim needs q [A,Tq,D], q_mask [A,Tq], d [B,Td,D], d_mask [B,Td]; got "
                         f"{tuple(q.shape)}, {tuple(q_mask.shape)}, {tuple(d.shape)}, {tuple(d_mask.shape)}")
    (A, Tq, D), (B, Td, _) = q.shape, d.shape
    q_mask, d_mask = q_mask.bool(), d_mask.bool()
    # one matmul, viewed without a copy; filled in place (autograd keeps the mm's inputs, not its output)
    sim = (q.float().reshape(A * Tq, D) @ d.float().reshape(B * Td, D).T).view(A, Tq, B, Td)
    best = sim.masked_fill_(~d_mask[None, None], float("-inf")).amax(-1)  # [A,Tq,B]
    best = best.masked_fill(~q_mask[:, :, None], 0.0)  # not 0 * -inf (NaN) for an empty document
    return best.sum(1) / q_mask.sum(1, keepdim=True).clamp(min=1)


def maxsim_scores(negatives, anchor: tuple[Tensor, Tensor], positive: tuple[Tensor, Tensor],
                  negative: tuple[Tensor, Tensor] | None = None, negative_mask: Tensor | None = None):
    """The negatives interface (``embtune.negatives.in_batch``) for token vectors: ``(scores [B,C], target [B])``
    over the same candidates in the same order, scored by :func:`maxsim` instead of a dot product.

    Args:
        negatives: the configured module; ``in_batch`` (C = B: the batch's positives) or ``hard``
            (C = B + B·K: the positives, then each row's K negatives; padded ones score ``-inf``).
        anchor, positive: ``(vectors [B,T,D], mask [B,T])``.
        negative: ``(vectors [B·K,T,D], mask [B·K,T])``, rows in the order of the examples.
        negative_mask: [B,K], False for padded negatives.
    Raises:
        ValueError: another negatives option, or ``hard`` without negatives.
    """
    if negatives.name not in ("in_batch", "hard"):
        raise ValueError(f"model=multi_vector supports negatives=in_batch and hard, not {negatives.name}")
    scores = maxsim(*anchor, *positive)
    if negatives.needs_negatives:
        if negative is None:
            raise ValueError("negatives=hard needs negative token vectors [B·K,T,D]")
        extra = maxsim(*anchor, *negative)
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask.reshape(1, -1).to(extra.device), float("-inf"))
        scores = torch.cat([scores, extra], dim=1)
    return scores, torch.arange(scores.size(0), device=scores.device)


class LateInteraction(Contrastive):
    """Contrastive training of a multi-vector model (``model=multi_vector``): the same examples,
    batches and candidates as :class:`~embtune.objectives.contrastive.Contrastive`, scored by
    :func:`maxsim_scores` over token vectors; candidates that copy the anchor's positive score ``-inf``.
    No Matryoshka, no GradCache and no cross-device candidates (refused before the model loads: token
    vectors are neither truncated, cached nor gathered). Metrics: ``train/candidates``.
    """

    matryoshka = False

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        """Raises:
            ValueError: ``embeddings`` given (GradCache caches one vector per text)."""
        if embeddings is not None:
            raise ValueError("a multi-vector model encodes token vectors: it cannot use cached embeddings")
        a, p = model(**batch["query"], kind="query"), model(**batch["positive"])
        n = model(**batch["negative"]) if "negative" in batch else None
        scores, target = maxsim_scores(self.negatives, a, p, n, batch.get("negative_mask"))
        scores = scores.masked_fill(batch["false_negative"], float("-inf"))
        return self.loss_fn(scores, target), {"train/candidates": torch.isfinite(scores).sum(1).float().mean().item()}


@dataclass
class TokenVectors:
    """Token vectors of N texts, stored in chunks of texts of similar length, each chunk padded only to
    its own longest text (so a corpus costs about its real token count, not N × max length).

    Attributes:
        chunks: ``(rows [n] int64: positions in the input order, vectors [n,T,D], mask [n,T] bool)``.
    """

    chunks: list[tuple[Tensor, Tensor, Tensor]]

    def __len__(self) -> int:
        return sum(len(rows) for rows, _, _ in self.chunks)

    @classmethod
    def from_padded(cls, vectors: Tensor, mask: Tensor, chunk_size: int = 64) -> TokenVectors:
        """Split a padded [N,T,D] tensor and its mask [N,T] into length-sorted chunks of ``chunk_size``
        texts, each trimmed to its longest text. Left-padded rows are moved to right padding first, so
        a chunk is as wide as its longest text whatever the padding side."""
        mask = mask.bool()
        # real tokens first, in their order (a stable sort of "is padding")
        pos = torch.argsort((~mask).int(), dim=1, stable=True)
        vectors = vectors.gather(1, pos.unsqueeze(-1).expand_as(vectors))
        mask, lengths = mask.gather(1, pos), mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        chunks = []
        for s in range(0, len(order), chunk_size):
            rows = order[s:s + chunk_size]
            width = int(lengths[rows].max())
            chunks.append((rows, vectors[rows, :width], mask[rows, :width]))
        return cls(chunks)


@torch.no_grad()
def search_maxsim(queries: TokenVectors, docs: TokenVectors, k: int, query_block: int = 16,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Exact MaxSim top-k of every query over every document (no candidate generation, no pruning).

    Documents are visited one stored chunk at a time (moved to ``device`` once), each against blocks of
    ``query_block`` queries; a running top-k per query is merged with each block's scores. Peak memory
    is the [query_block, n, Tq, Td] similarity tensor of one block and chunk, however large the corpus.

    Returns:
        ``(scores [Q,k'], indices [Q,k'])`` with ``k' = min(k, N)``: scores descending, indices into the
        documents' input order (``-1`` only where documents without a real token ran out).
    Raises:
        ValueError: ``k`` or ``query_block`` < 1.
    """
    if k < 1 or query_block < 1:
        raise ValueError(f"k and query_block must be >= 1, got k={k}, query_block={query_block}")
    n_q, k = len(queries), min(k, len(docs))
    device = torch.device(device) if device is not None else queries.chunks[0][1].device
    best_s = torch.full((n_q, k), float("-inf"), device=device)
    best_i = torch.full((n_q, k), -1, dtype=torch.long, device=device)
    blocks = []  # (query rows, vectors, mask), query_block queries each
    for rows, v, m in queries.chunks:
        for s in range(0, len(rows), query_block):
            blocks.append((rows[s:s + query_block].to(device), v[s:s + query_block].to(device),
                           m[s:s + query_block].to(device)))
    for d_rows, d_vec, d_mask in docs.chunks:
        d_rows, d_vec, d_mask = d_rows.to(device), d_vec.to(device), d_mask.to(device)
        for q_rows, q_vec, q_mask in blocks:
            scores = maxsim(q_vec, q_mask, d_vec, d_mask)  # [qb, n]
            # the top-k of the queries so far is inside (their running top-k) ∪ (this chunk's scores)
            s = torch.cat([best_s[q_rows], scores], 1)
            i = torch.cat([best_i[q_rows], d_rows.expand(len(q_rows), -1)], 1)
            top, pos = s.topk(k, dim=1)
            best_s[q_rows], best_i[q_rows] = top, i.gather(1, pos)
    return best_s, best_i


def evaluate_maxsim(queries: TokenVectors, docs: TokenVectors, test, query_ids: list[str], doc_ids: list[str],
                    k: int = 100, device: torch.device | str | None = None,
                    ignore_identical_ids: bool = True) -> dict[str, float]:
    """Rank every test document for every query by exact MaxSim (:func:`search_maxsim`) and score the
    ranking against ``test.qrels``: the keys of :func:`embtune.eval.metrics.retrieval_metrics` (which
    also says what ``ignore_identical_ids`` does).

    Raises:
        ValueError: id counts that differ from the token vectors, or ``k < 100`` (Recall@100 is reported).
    """
    from embtune.eval.metrics import retrieval_metrics

    if len(queries) != len(query_ids) or len(docs) != len(doc_ids):
        raise ValueError(f"{len(queries)} query and {len(docs)} document token sets for {len(query_ids)} "
                         f"query ids and {len(doc_ids)} document ids")
    if k < 100:
        raise ValueError(f"k={k} < 100 would truncate the ranking that recall@100 needs")
    scores, indices = search_maxsim(queries, docs, k, device=device)
    run = {qid: {doc_ids[j]: s for s, j in zip(row_s, row_i) if j >= 0}
           for qid, row_s, row_i in zip(query_ids, scores.tolist(), indices.tolist())}
    return retrieval_metrics(run, test.qrels, ignore_identical_ids)
