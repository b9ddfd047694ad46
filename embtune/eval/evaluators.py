"""Evaluators (``eval=``): what "better" means for a run. Each is called with the model and the loaded
data and returns a flat dict of metrics; ``before``/``after`` pick when it runs, ``metric`` names the
number that sweeps report and optimise.

Each evaluation logs one line when it starts (what, how many texts) and one when it ends (seconds and
``metric``); on a terminal a transient bar shows the encoding in between
(:func:`embtune.run.progress.encoding_progress`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import torch

from embtune.data import TrainingData
from embtune.eval.index import CHUNK_SIZE, CorpusSearch, encoded_corpus
from embtune.eval.metrics import KEYS, evaluate_retrieval, sts_spearman
from embtune.objectives.maxsim import evaluate_maxsim
from embtune.run.progress import encoding_progress

log = logging.getLogger(__name__)


def _log_result(what: str, started: float, metric: str, metrics: dict) -> None:
    value = metrics.get(metric)
    shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "missing"
    log.info("evaluated %s in %.1f s: %s %s", what, time.perf_counter() - started, metric, shown)


class _Documents(Sequence):
    """The texts of ``corpus`` in the order of ``ids``, looked up as they are read (``len``, index, slice)."""

    def __init__(self, corpus, ids: list[str]):
        self.corpus, self.ids = corpus, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.corpus[d] for d in self.ids[i]]
        return self.corpus[self.ids[i]]


class Retrieval:
    """NDCG@10, MRR@10, Recall@10 and Recall@100 on the data's held-out retrieval split, every test
    document a candidate, at full size and at each Matryoshka dimension (``dim64/ndcg@10``), scored as
    BEIR and MTEB score them with pytrec_eval (:func:`embtune.eval.metrics.retrieval_metrics`). A
    multi-vector model is ranked by exact MaxSim over its token vectors (``embtune.objectives.maxsim``); a
    single-vector one by inner product over its corpus embeddings, encoded ``chunk_size`` texts at a time into
    a memory-mapped file (:func:`embtune.eval.index.encoded_corpus`) and searched exactly by default.

    Args:
        batch_size: texts per encoding batch.
        k: ranking depth (>= 100: Recall@100 is reported).
        ignore_identical_ids: a document whose id equals the query's is no candidate for that query
            (BEIR's and MTEB's rule: in ArguAna each query is itself a corpus document).
        chunk_size: corpus texts encoded per chunk.
        index, faiss_min_docs, hnsw_m, hnsw_ef_construction, hnsw_ef_search, ivf_nlist, ivf_nprobe: the
            search (:class:`embtune.eval.index.CorpusSearch`): ``flat`` exact, ``hnsw``/``ivf`` approximate
            (metrics from an approximate ranking are not comparable with published exact ones).
        bf16: the encoding's precision (``auto``: bf16 autocast where the device has native bf16; see
            ``embtune.training.precision``).
    Raises:
        ValueError: ``k < 100``, or a search setting out of range or of another index than ``index``.
    """

    uses_data = True  # ranks the data's held-out set (``data.test``)
    metrics = KEYS  # what it reports (and dim<d>/<name> per Matryoshka dimension); eval.metric is one of them

    def __init__(self, batch_size: int = 64, k: int = 100, ignore_identical_ids: bool = True, before: bool = True,
                 after: bool = True, cache_base: bool = True, metric: str = "ndcg@10", every_steps: int | None = None,
                 keep: str = "best", chunk_size: int = CHUNK_SIZE, index: str = "flat",
                 faiss_min_docs: int | None = None, hnsw_m: int | None = None,
                 hnsw_ef_construction: int | None = None, hnsw_ef_search: int | None = None,
                 ivf_nlist: int | None = None, ivf_nprobe: int | None = None, bf16: bool | Literal["auto"] = "auto"):
        if k < 100:
            raise ValueError(f"eval.k={k}: the ranking depth must be >= 100 (Recall@100 is reported)")
        self.batch_size, self.k, self.before, self.after, self.metric = batch_size, k, before, after, metric
        self.ignore_identical_ids, self.bf16 = ignore_identical_ids, bf16
        if chunk_size < 1:
            raise ValueError(f"eval.chunk_size={chunk_size}: must be >= 1")
        self.chunk_size, self.index = chunk_size, index
        self.search = CorpusSearch(index, faiss_min_docs, hnsw_m, hnsw_ef_construction, hnsw_ef_search, ivf_nlist,
                                   ivf_nprobe, option="eval")
        self.cache_base = cache_base  # read by the loop (embtune.eval.base_cache.base_metrics)
        self.every_steps, self.keep = every_steps, keep  # read by the loop (embtune.training.selection)

    def __call__(self, model, data: TrainingData, dims: list[int]) -> dict[str, float]:
        test = data.test
        if test is None:
            return {}
        qids, dids = list(test.qrels), list(test.corpus)
        shared = test.identical_ids()
        if shared and self.ignore_identical_ids:
            log.info("%d of %d test queries are also corpus documents (same id): each is left out of its own "
                     "ranking, as BEIR and MTEB do (eval.ignore_identical_ids=true)", shared, len(qids))
        elif shared:
            log.warning("%d of %d test queries are also corpus documents (same id) and eval.ignore_identical_ids="
                        "false: each may retrieve itself, which BEIR and MTEB do not count", shared, len(qids))
        if model.multi_vector and self.index != "flat":
            raise ValueError(f"eval.index={self.index} with a multi-vector model: MaxSim is searched exactly; use "
                             "eval.index=flat")
        self.search.check_size(len(dids))
        what = f"{data.name} {'dev split' if data.held_out else 'test set'}"
        log.info("evaluating %s: %d queries, %d documents", what, len(qids), len(dids))
        started = time.perf_counter()
        docs = _Documents(test.corpus, dids)  # read a chunk at a time: a corpus on disk stays there
        with encoding_progress(f"evaluate {what}", len(qids) + len(dids)) as advance:
            q = model.encode([test.queries[i] for i in qids], kind="query", batch_size=self.batch_size,
                             progress=advance, bf16=self.bf16)
            if model.multi_vector:
                d = model.encode(docs, kind="document", batch_size=self.batch_size, progress=advance, bf16=self.bf16)
                metrics = evaluate_maxsim(q, d, test, qids, dids, k=self.k + bool(shared and self.ignore_identical_ids),
                                          device=model.device, ignore_identical_ids=self.ignore_identical_ids)
            else:
                with encoded_corpus(model, docs, "document", self.batch_size, self.chunk_size, progress=advance,
                                    bf16=self.bf16) as d:
                    metrics = evaluate_retrieval(torch.from_numpy(q), torch.from_numpy(d), test, qids, dids, k=self.k,
                                                 dims=[x for x in dims if x < model.dim], normalize=model.normalize,
                                                 ignore_identical_ids=self.ignore_identical_ids,
                                                 corpus_search=self.search)
        _log_result(what, started, self.metric, metrics)
        return metrics


class STS:
    """Spearman correlation between cosine similarity and gold scores on a scored-pairs file (STS-B
    style TSV/CSV/JSONL with ``text1``, ``text2``, ``score`` columns), reported as ``spearman``
    (and ``dim64/spearman`` for Matryoshka dimensions). Both sides use the query max length; ``bf16``
    as for :class:`Retrieval`.

    Raises:
        ValueError: from the file's loader and the ``scored_pairs`` format, naming file, row and field.
    """

    uses_data = False  # reads its own file, not the data's held-out set
    metrics = ("spearman",)  # and dim<d>/spearman per Matryoshka dimension

    def __init__(self, path: str, text1: str = "sentence1", text2: str = "sentence2", score: str = "score",
                 batch_size: int = 64, before: bool = True, after: bool = True, cache_base: bool = True,
                 metric: str = "spearman", every_steps: int | None = None, keep: str = "best",
                 bf16: bool | Literal["auto"] = "auto"):
        from embtune.data.files import load_jsonl
        from embtune.data.formats import ScoredPairs

        data = load_jsonl(path)
        self.pairs = ScoredPairs(text1, text2, score)(data.rows, data.source, data.problems)
        self.path = path
        self.batch_size, self.before, self.after, self.metric = batch_size, before, after, metric
        self.cache_base, self.bf16 = cache_base, bf16
        self.every_steps, self.keep = every_steps, keep  # read by the loop (embtune.training.selection)

    def __call__(self, model, data: TrainingData, dims: list[int]) -> dict[str, float]:
        what = f"STS {self.path}"
        log.info("evaluating %s: %d pairs", what, len(self.pairs))
        started = time.perf_counter()
        with encoding_progress(f"evaluate {what}", 2 * len(self.pairs)) as advance:
            e1 = model.encode([p.text1 for p in self.pairs], kind="query", batch_size=self.batch_size, progress=advance,
                              bf16=self.bf16)
            e2 = model.encode([p.text2 for p in self.pairs], kind="query", batch_size=self.batch_size, progress=advance,
                              bf16=self.bf16)
        e1, e2 = torch.from_numpy(e1), torch.from_numpy(e2)
        gold = [p.score for p in self.pairs]
        out = {"spearman": sts_spearman(e1, e2, gold)}
        for d in dims:
            if d < e1.size(1):
                out[f"dim{d}/spearman"] = sts_spearman(e1[:, :d], e2[:, :d], gold)
        _log_result(what, started, self.metric, out)
        return out
