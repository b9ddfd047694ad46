"""Corpus search for mining and retrieval evaluation: the corpus embedded chunk by chunk into a memory-mapped
file (:func:`encoded_corpus`), and inner-product top-k over it (:class:`CorpusSearch`): exact by default
(:func:`search`: torch in blocks on small corpora, faiss beyond :data:`FAISS_MIN_DOCS` documents), or,
opt-in, approximate with a faiss HNSW graph or an IVF index.

Shape letters: Q queries, N documents, D embedding size, k ranking depth.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from embtune.data.cache import cache_dir

# From this many documents on, the exact search runs in faiss (knn_inner_product: BLAS scores and a heap per
# query, over the matrix in place) instead of torch blocks (matmul + topk + merge). Measured with
# `python benchmarks/search_crossover.py --rounds 5` (D 384, k 111, random unit vectors; docs/results.md) on
# the 2-core machine, busy: at torch's default 2 threads faiss took 0.47-0.79x torch's time from N = 4,000 to
# 64,000 (0.51x and 0.63x at 4,000 for 100 and 1,000 queries; one exception, 1.08x at 100 x 64,000) and
# 0.77-0.93x at N = 1,000, where both take milliseconds. With 1 thread torch was faster at every size
# (faiss 1.09-4.39x), so this figure is for the thread count embtune runs with; re-measure on another machine.
FAISS_MIN_DOCS = 4_000
# Corpus texts encoded per chunk into the memory-mapped embedding file (a corpus this size or smaller is
# encoded in one piece, in memory).
CHUNK_SIZE = 16_384
INDEXES = ("flat", "hnsw", "ivf")
# the approximate indexes' settings when left null (faiss's guidance: HNSW M 16-64; IVF nlist 4-16 x sqrt(N))
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, IVF_NPROBE = 32, 200, 128, 32


@contextlib.contextmanager
def encoded_corpus(model, texts: list[str], kind: str = "document", batch_size: int = 64,
                   chunk_size: int = CHUNK_SIZE, **options) -> Iterator[np.ndarray]:
    """The texts' embeddings, float32 [N, D], encoded ``chunk_size`` texts at a time.

    Beyond one chunk the embeddings are written into ``embeddings.npy``, a memory-mapped file in a temporary
    folder under ``$EMBTUNE_CACHE/tmp`` that is removed when the context ends, so memory holds one chunk's
    output at a time and never a second copy of the matrix. ``model`` needs ``encode(texts, kind, batch_size)
    -> float32 [n, D]``; each chunk is one call (which sorts its texts by length), so the embeddings equal
    one-shot encoding up to float32 rounding of differently padded batches. ``options`` (``progress``,
    ``bf16``) are passed on to every ``model.encode`` call.

    Raises:
        ValueError: ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if len(texts) <= chunk_size:
        yield model.encode(texts, kind=kind, batch_size=batch_size, **options)
        return
    folder = cache_dir() / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corpus-", dir=folder) as tmp:
        first = model.encode(texts[:chunk_size], kind=kind, batch_size=batch_size, **options)
        emb = np.lib.format.open_memmap(Path(tmp) / "embeddings.npy", mode="w+", dtype=np.float32,
                                        shape=(len(texts), first.shape[1]))
        emb[:chunk_size] = first
        del first
        for start in range(chunk_size, len(texts), chunk_size):
            emb[start:start + chunk_size] = model.encode(texts[start:start + chunk_size], kind=kind,
                                                         batch_size=batch_size, **options)
        emb.flush()
        yield emb


def _as_array(x) -> np.ndarray:
    """A float32 C-contiguous [n, D] view of a CPU tensor or array (a copy only when its layout needs one)."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else x
    return np.ascontiguousarray(x, dtype=np.float32)


def _order(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted by score descending, then document index ascending; missing results (index -1,
    score -inf) last."""
    pos = np.lexsort((indices, -scores), axis=1)
    return np.take_along_axis(scores, pos, 1), np.take_along_axis(indices, pos, 1)


def _torch_topk(q: torch.Tensor, d: torch.Tensor, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``q @ d.T`` in blocks of ``block_size`` queries x documents: each document block's top-k
    is merged into the running top-k, so memory stays at ``block_size x (block_size + k)`` scores."""
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


def _faiss_threads():
    """faiss, its OpenMP pool set to torch's thread count (``torch.set_num_threads`` governs both)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


@torch.no_grad()
def search(query_emb, doc_emb, k: int, block_size: int = 1024, faiss_min_docs: int | None = None):
    """Exact inner-product top-k, ties in a defined order.

    Below ``faiss_min_docs`` documents (default :data:`FAISS_MIN_DOCS`), or with inputs on a GPU, torch scores
    blocks of ``block_size`` queries x documents and merges each block's top-k (memory ``block_size x
    (block_size + k)`` scores); from it on, faiss's brute-force inner product (``faiss.knn``, what
    ``IndexFlatIP.search`` runs) reads the document matrix in place (a memory-mapped one too) with torch's
    thread count. Both compute in float32 without autograd.

    Order: score descending, then document index ascending, and the lower index wins a tie at the k-th place
    too: when the (k+1)-th score equals the k-th, that query is searched again twice as deep until its tie
    group ends inside the results. So both paths return the same indices wherever their float32 scores are
    equal; two scores within rounding of each other (~1e-7) may order differently between them.

    Args:
        query_emb: [Q, D] tensor or array. doc_emb: [N, D] tensor or array (e.g. :func:`encoded_corpus`'s).
        k: ranking depth; ``k' = min(k, N)`` results are returned per query.
        block_size: queries and documents per torch block.
        faiss_min_docs: from this many documents on, faiss; null: :data:`FAISS_MIN_DOCS`.

    Returns:
        ``(scores [Q, k'] float32, indices [Q, k'] int64)`` tensors on the queries' device.

    Raises:
        ValueError: if the inputs are not 2-D with equal D, or if ``k`` or ``block_size`` is < 1.
    """
    q, d = _check(query_emb, doc_emb, k, block_size)
    n, device = d.shape[0], q.device if torch.is_tensor(q) else torch.device("cpu")
    use_faiss = n >= (FAISS_MIN_DOCS if faiss_min_docs is None else faiss_min_docs) and device.type == "cpu"
    if use_faiss:
        faiss, qa, da = _faiss_threads(), _as_array(q), _as_array(d)

        def raw(rows, depth):
            return faiss.knn(qa[rows], da, depth, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        qt = (q if torch.is_tensor(q) else torch.from_numpy(_as_array(q))).float()
        dt = (d if torch.is_tensor(d) else torch.from_numpy(_as_array(d))).to(qt.device).float()

        def raw(rows, depth):
            s, i = _torch_topk(qt[torch.from_numpy(rows).to(qt.device)], dt, depth, block_size)
            return s.cpu().numpy(), i.cpu().numpy()

    k = min(k, n)
    depth = min(k + 1, n)
    s, i = _order(*raw(np.arange(q.shape[0]), depth))
    scores, indices = s[:, :k].copy(), i[:, :k].copy()
    open_rows = np.flatnonzero(s[:, k] == s[:, k - 1]) if depth > k else np.empty(0, dtype=np.int64)
    while open_rows.size:  # the k-th score's tie group may go on past the results: search deeper
        depth = min(2 * depth, n)
        s, i = _order(*raw(open_rows, depth))
        done = (s[:, -1] < s[:, k - 1]) | (depth == n)
        scores[open_rows[done]], indices[open_rows[done]] = s[done, :k], i[done, :k]
        open_rows = open_rows[~done]
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)


def _check(q, d, k: int, block_size: int):
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"search needs [Q, D] and [N, D] embeddings, got {tuple(q.shape)} and {tuple(d.shape)}")
    if k < 1 or block_size < 1:
        raise ValueError(f"k and block_size must be >= 1, got k={k}, block_size={block_size}")
    return (q.detach() if torch.is_tensor(q) else q), (d.detach() if torch.is_tensor(d) else d)


class CorpusSearch:
    """How a corpus is searched: the settings ``miner.*`` and ``eval.*`` share (``index``, ``faiss_min_docs``,
    ``hnsw_*``, ``ivf_*``), checked by name.

    - ``flat`` (default): exact, :func:`search` (torch below ``faiss_min_docs`` documents, faiss from it on).
    - ``hnsw``: faiss ``IndexHNSWFlat`` (Malkov & Yashunin 2018, "Efficient and robust approximate nearest
      neighbor search using Hierarchical Navigable Small World graphs"), ``hnsw_m`` links per vector,
      ``hnsw_ef_construction`` / ``hnsw_ef_search`` candidates kept while building / searching (at least k).
    - ``ivf``: faiss ``IndexIVFFlat`` (Jégou et al. 2011, "Product quantization for nearest neighbor search",
      §4 inverted file): k-means into ``ivf_nlist`` cells (default 4·√N), ``ivf_nprobe`` cells searched.

    The approximate indexes are approximate: a query's ranking may miss documents the exact search returns
    (a missing place is index -1, score -inf; callers skip it). Their scores are exact inner products.

    Args:
        option: the config node the settings come from, for messages (``miner`` or ``eval``).
    Raises:
        ValueError: an unknown index, a setting < 1, or a setting of another index than the one chosen.
    """

    def __init__(self, index: str = "flat", faiss_min_docs: int | None = None, hnsw_m: int | None = None,
                 hnsw_ef_construction: int | None = None, hnsw_ef_search: int | None = None,
                 ivf_nlist: int | None = None, ivf_nprobe: int | None = None, block_size: int = 1024,
                 option: str = "miner"):
        if index not in INDEXES:
            raise ValueError(f"{option}.index={index!r}: must be one of {', '.join(INDEXES)} (flat: exact; hnsw, "
                             "ivf: approximate faiss indexes)")
        given = {"faiss_min_docs": faiss_min_docs, "hnsw_m": hnsw_m, "hnsw_ef_construction": hnsw_ef_construction,
                 "hnsw_ef_search": hnsw_ef_search, "ivf_nlist": ivf_nlist, "ivf_nprobe": ivf_nprobe}
        for key, value in given.items():
            if value is None:
                continue
            owner = "flat" if key == "faiss_min_docs" else key.split("_")[0]
            if owner != index:
                raise ValueError(f"{option}.{key}={value} is a setting of {option}.index={owner}, not of "
                                 f"{option}.index={index}: remove it or choose {option}.index={owner}")
            if value < (0 if key == "faiss_min_docs" else 1):
                raise ValueError(f"{option}.{key}={value}: must be >= {0 if key == 'faiss_min_docs' else 1}")
        self.index, self.option, self.block_size = index, option, block_size
        self.faiss_min_docs, self.ivf_nlist = faiss_min_docs, ivf_nlist
        self.hnsw_m, self.hnsw_ef_construction = hnsw_m or HNSW_M, hnsw_ef_construction or HNSW_EF_CONSTRUCTION
        self.hnsw_ef_search, self.ivf_nprobe = hnsw_ef_search or HNSW_EF_SEARCH, ivf_nprobe or IVF_NPROBE

    def check_size(self, n_docs: int) -> None:
        """Refuse, before anything is encoded, an IVF index with more cells than documents.

        Raises:
            ValueError: ``ivf_nlist > n_docs``.
        """
        if self.index == "ivf" and self.ivf_nlist is not None and self.ivf_nlist > n_docs:
            raise ValueError(f"{self.option}.ivf_nlist={self.ivf_nlist}: more IVF cells than the {n_docs} documents "
                             "to search; lower it or leave it null (4·√N)")

    def settings(self) -> dict:
        """The search as recorded with mined files (the settings that apply to the chosen index)."""
        if self.index == "flat":
            return {"index": "flat", "faiss_min_docs": self.faiss_min_docs or FAISS_MIN_DOCS}
        if self.index == "hnsw":
            return {"index": "hnsw", "hnsw_m": self.hnsw_m, "hnsw_ef_construction": self.hnsw_ef_construction,
                    "hnsw_ef_search": self.hnsw_ef_search}
        return {"index": "ivf", "ivf_nlist": self.ivf_nlist, "ivf_nprobe": self.ivf_nprobe}

    def __call__(self, query_emb, doc_emb, k: int):
        """Top-k of ``query_emb [Q, D]`` against ``doc_emb [N, D]``: ``(scores [Q, k'], indices [Q, k'])``
        tensors, ``k' = min(k, N)``, ordered as :func:`search` orders them."""
        if self.index == "flat":
            return search(query_emb, doc_emb, k, self.block_size, self.faiss_min_docs)
        q, d = _check(query_emb, doc_emb, k, self.block_size)
        device = q.device if torch.is_tensor(q) else torch.device("cpu")
        scores, indices = _order(*self._approximate(_as_array(q), d, min(k, d.shape[0])))
        return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)

    def _approximate(self, q: np.ndarray, d, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss_threads()
        n, dim = d.shape
        if self.index == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.hnsw_ef_construction
            index.hnsw.efSearch = max(self.hnsw_ef_search, k)
        else:
            # 4·√N cells, but at least 39 training vectors per cell (fewer and faiss's k-means warns)
            nlist = self.ivf_nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on at most 64 vectors per cell, drawn evenly (faiss itself would sample 256 per cell)
            sample = np.linspace(0, n - 1, num=min(n, 64 * nlist)).astype(np.int64)
            index.train(_as_array(d[sample]))
            index.nprobe = min(self.ivf_nprobe, nlist)
        for start in range(0, n, CHUNK_SIZE):  # a chunk of the (memory-mapped) matrix at a time
            index.add(_as_array(d[start:start + CHUNK_SIZE]))
        scores, indices = index.search(q, k)
        scores[indices < 0] = -np.inf
        return scores, indices
