"""Offline hard-negative mining: rank a candidate pool with an embedding model, keep a rank window, drop
the query's positives and likely false negatives, optionally rescore with a cross-encoder, sample.

:class:`HardNegativeMiner` (config group ``miner``) does one pass and returns ``multi_negative`` rows
plus a settings record; :func:`write_mined` writes both, never over an existing file. ``embtune-mine``
(:mod:`embtune.recipes.mine`) runs one pass; ``train.rounds`` (:mod:`embtune.recipes.mining_rounds`) re-mines between
fine-tuning rounds. The pool is encoded in chunks to a memory-mapped file and searched by
:class:`embtune.eval.index.CorpusSearch` (exact by default). Shape letters: Q queries, N pool documents, D
embedding size, k search depth.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import torch

from embtune.data import TrainingData
from embtune.eval.index import CHUNK_SIZE, CorpusSearch, encoded_corpus
from embtune.mining.pool import CandidatePool, Query, group_queries, normalise
from embtune.run.progress import encoding_progress

log = logging.getLogger(__name__)

DROP_REASONS = ("positive_id", "positive_text", "query_text", "before_range_min", "relative_margin",
                "max_score", "not_sampled")


class HardNegativeMiner:
    """Mine hard negatives for every training query (one pass).

    Ranks the pool with the model: the pool is encoded ``chunk_size`` texts at a time into a memory-mapped
    file (:func:`embtune.eval.index.encoded_corpus`) and searched by inner product, exactly by default
    (torch in blocks, faiss from ``faiss_min_docs`` documents on; ties: lower pool index first), or with an
    approximate faiss index (``index=hnsw|ivf``, :class:`embtune.eval.index.CorpusSearch`). Then per query,
    walking down its ranking:

    1. never a positive: an entry is skipped when one of its ids is a positive's ``doc_id``
       (``positive_id``) or its normalised text equals a positive's (``positive_text``), and when it equals
       the query (``query_text``); ranks count only the entries left;
    2. rank window: rank 0 is the best-scoring entry left; ranks ``range_min <= r < range_max`` are kept
       (``before_range_min`` counts the ones skipped above the window);
    3. false-negative filters (Moreira et al. 2024, NV-Retriever, §3.2 "TopK-PercPos" and "TopK-Abs"): drop
       a candidate scoring above ``relative_margin`` × the query's positive score (the lowest one, when
       it has several) or above ``max_score``; scores are the model's (cosine when it normalises) or,
       with ``teacher``, the cross-encoder's probability of relevance;
    4. sample ``num_negatives`` of the rest (seeded; all of them when fewer), written in rank order.

    Each dropped candidate is counted once, under the first reason it meets in the order above.

    Args:
        range_min, range_max: the rank window, 0-based, end excluded.
        relative_margin: in (0, 1]; null turns the filter off.
        max_score: absolute score ceiling; null turns it off.
        num_negatives: negatives per query.
        candidates: ``train`` (the training positives and negatives) or ``all`` (also every document of
            the held-out set's corpus: the whole corpus for ``data=beir``, whose corpus both splits share).
        teacher: path or hub name of an ``AutoModelForSequenceClassification`` cross-encoder, or null. One
            logit is read through a sigmoid, two or more through a softmax (the last class = relevant).
        teacher_batch_size, teacher_max_length: pairs per batch and tokens per pair for the teacher.
        batch_size: texts per encoding batch. block_size: queries and documents per torch search block.
        chunk_size: pool texts encoded per chunk into the memory-mapped embedding file.
        index, faiss_min_docs, hnsw_m, hnsw_ef_construction, hnsw_ef_search, ivf_nlist, ivf_nprobe: the
            search (:class:`embtune.eval.index.CorpusSearch`): ``flat`` exact, ``hnsw``/``ivf`` approximate.
        seed: sampling seed.
    Raises:
        ValueError: a setting out of range, or a search setting of an index other than ``index``, named by
            its key.
    """

    def __init__(self, range_min: int = 10, range_max: int = 100, relative_margin: float | None = 0.95,
                 max_score: float | None = None, num_negatives: int = 15, candidates: str = "train",
                 teacher: str | None = None, teacher_batch_size: int = 32, teacher_max_length: int = 512,
                 batch_size: int = 64, block_size: int = 1024, chunk_size: int = CHUNK_SIZE, index: str = "flat",
                 faiss_min_docs: int | None = None, hnsw_m: int | None = None,
                 hnsw_ef_construction: int | None = None, hnsw_ef_search: int | None = None,
                 ivf_nlist: int | None = None, ivf_nprobe: int | None = None, seed: int = 0):
        if not 0 <= range_min < range_max:
            raise ValueError(f"miner.range_min={range_min}, miner.range_max={range_max}: need 0 <= range_min < range_max")
        if relative_margin is not None and not 0 < relative_margin <= 1:
            raise ValueError(f"miner.relative_margin={relative_margin}: must be in (0, 1] or null")
        if num_negatives < 1:
            raise ValueError(f"miner.num_negatives={num_negatives}: must be >= 1")
        if candidates not in ("train", "all"):
            raise ValueError(f"miner.candidates={candidates!r}: must be 'train' or 'all'")
        if chunk_size < 1 or block_size < 1:
            raise ValueError(f"miner.chunk_size={chunk_size}, miner.block_size={block_size}: both must be >= 1")
        self.search = CorpusSearch(index, faiss_min_docs, hnsw_m, hnsw_ef_construction, hnsw_ef_search, ivf_nlist,
                                   ivf_nprobe, block_size=block_size, option="miner")
        self.range_min, self.range_max = range_min, range_max
        self.relative_margin, self.max_score = relative_margin, max_score
        self.num_negatives, self.candidates, self.seed = num_negatives, candidates, seed
        self.teacher, self.teacher_batch_size, self.teacher_max_length = teacher, teacher_batch_size, teacher_max_length
        self.batch_size, self.block_size, self.chunk_size = batch_size, block_size, chunk_size

    def pool(self, data: TrainingData, queries: list[Query]) -> CandidatePool:
        """The candidate pool: training positives (with their ids) and negatives, plus the held-out corpus
        when ``candidates=all``."""
        pool = CandidatePool()
        for q in queries:
            for p in q.positives:
                pool.add(p, q.id_of.get(normalise(p)))
        for q in queries:  # negatives the data already has are candidates too
            for n in q.negatives:
                pool.add(n)
        if self.candidates == "all":
            if data.test is None:
                raise ValueError(f"miner.candidates=all: data {data.name} has no held-out corpus; use miner.candidates=train")
            for doc_id, text in data.test.corpus.items():
                pool.add(text, doc_id)
        return pool

    def __call__(self, model, data: TrainingData, data_format) -> tuple[list[dict], dict]:
        """Mine. ``model`` needs ``encode(texts, kind, batch_size, progress) -> float32 [n, D]`` (``progress``:
        called with each batch's size, see ``Embedder.encode``).

        Returns:
            ``(rows, record)``: one ``multi_negative`` row per query, ``{"query", "pos": [...], "neg":
            [...], "pos_scores", "neg_scores", "neg_ranks", "neg_ids", "query_id"}``, and the counts
            (queries, pool size, dropped per reason, negatives written, queries short of num_negatives).
        Raises:
            ValueError: the data has no (query, positive) example.
        """
        queries = group_queries(data, data_format)
        if not queries:
            raise ValueError(f"data {data.name}: no (query, positive) examples to mine for")
        pool = self.pool(data, queries)
        self.search.check_size(len(pool))
        excluded = [self._excluded(q, pool) for q in queries]
        log.info("mining: %d queries, %d candidate documents", len(queries), len(pool))
        with encoding_progress("mine", len(queries) + len(pool)) as advance:  # the bar goes when the search ends
            q_emb = torch.from_numpy(model.encode([q.text for q in queries], kind="query", batch_size=self.batch_size,
                                                  progress=advance))
            with encoded_corpus(model, pool.texts, "document", self.batch_size, self.chunk_size,
                                progress=advance) as pool_emb:
                d_emb = torch.from_numpy(pool_emb)  # [N, D], memory-mapped beyond one chunk
                k = min(len(pool), self.range_max + max(len(e) for e in excluded))
                scores, indices = self.search(q_emb, d_emb, k)  # [Q, k] each
                pos_scores = [(q_emb[qi] @ d_emb[[pool.find(p) for p in q.positives]].T).tolist()
                              for qi, q in enumerate(queries)]
                del d_emb

        dropped, windows = Counter(), []
        for qi, q in enumerate(queries):
            window, rank = [], 0
            for s, j in zip(scores[qi].tolist(), indices[qi].tolist()):
                if j < 0:  # an approximate index found fewer than k
                    break
                if j in excluded[qi]:
                    dropped[excluded[qi][j]] += 1
                    continue
                if rank >= self.range_max:
                    break
                if rank < self.range_min:
                    dropped["before_range_min"] += 1
                else:
                    window.append((rank, j, s))
                rank += 1
            windows.append((window, pos_scores[qi]))
        if self.teacher:
            windows = self._rescore(queries, pool, windows, getattr(model, "device", "cpu"))

        rng, rows, short = random.Random(self.seed), [], 0
        for q, (window, pos_scores) in zip(queries, windows):
            kept = []
            for rank, j, s in window:
                if self.relative_margin is not None and s > self.relative_margin * min(pos_scores):
                    dropped["relative_margin"] += 1
                elif self.max_score is not None and s > self.max_score:
                    dropped["max_score"] += 1
                else:
                    kept.append((rank, j, s))
            if len(kept) > self.num_negatives:
                dropped["not_sampled"] += len(kept) - self.num_negatives
                kept = sorted(rng.sample(kept, self.num_negatives))
            short += len(kept) < self.num_negatives
            rows.append({"query": q.text, "pos": q.positives, "neg": [pool.texts[j] for _, j, _ in kept],
                         "pos_scores": [round(s, 6) for s in pos_scores],
                         "neg_scores": [round(s, 6) for _, _, s in kept], "neg_ranks": [r for r, _, _ in kept],
                         "neg_ids": [min(pool.ids[j]) if pool.ids[j] else None for _, j, _ in kept],
                         "query_id": q.query_id})
        counts = {"queries": len(queries), "pool": len(pool), "negatives": sum(len(r["neg"]) for r in rows),
                  "queries_short": short, "dropped": {r: dropped[r] for r in DROP_REASONS}}
        return rows, counts

    def settings(self) -> dict:
        """The mining settings, as recorded next to the mined file."""
        return {"window": {"range_min": self.range_min, "range_max": self.range_max},
                "filters": {"relative_margin": self.relative_margin, "max_score": self.max_score},
                "num_negatives": self.num_negatives, "candidates": self.candidates, "teacher": self.teacher,
                "scores": "teacher" if self.teacher else "model", "search": self.search.settings(), "seed": self.seed}

    @staticmethod
    def _excluded(q: Query, pool: CandidatePool) -> dict[int, str]:
        """Pool entries query ``q`` may never get as negatives -> the reason (ids first, then texts)."""
        out = {pool.find_id(d): "positive_id" for d in q.positive_ids if pool.find_id(d) is not None}
        for p in q.positives:
            out.setdefault(pool.find(p), "positive_text")
        j = pool.find(q.text)
        if j is not None:
            out.setdefault(j, "query_text")
        return out

    @torch.no_grad()
    def _rescore(self, queries: list[Query], pool: CandidatePool, windows: list, device) -> list:
        """Replace the model's scores of each window's candidates and positives by the teacher's (run on
        the embedding model's device)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from embtune.model.resolve import resolve_model_path

        path = resolve_model_path(self.teacher)
        tok = AutoTokenizer.from_pretrained(path)
        teacher = AutoModelForSequenceClassification.from_pretrained(path).eval().to(device)
        pairs = [(q.text, pool.texts[j]) for q, (window, _) in zip(queries, windows) for _, j, _ in window]
        pairs += [(q.text, p) for q in queries for p in q.positives]
        probs = []
        for i in range(0, len(pairs), self.teacher_batch_size):
            chunk = pairs[i:i + self.teacher_batch_size]
            enc = tok([a for a, _ in chunk], [b for _, b in chunk], padding=True, truncation=True,
                      max_length=self.teacher_max_length, return_tensors="pt").to(device)
            logits = teacher(**enc).logits.float().cpu()
            probs += (logits[:, 0].sigmoid() if logits.size(1) == 1 else logits.softmax(-1)[:, -1]).tolist()
        it, out = iter(probs), []
        new_windows = [[(r, j, next(it)) for r, j, _ in window] for window, _ in windows]
        for q, window in zip(queries, new_windows):
            out.append((window, [next(it) for _ in q.positives]))
        return out


def settings_path(out: str | Path) -> Path:
    """Where the settings record of mined file ``out`` lives: ``<out>.settings.json``."""
    return Path(str(out) + ".settings.json")


def refuse_existing(out: str | Path) -> None:
    """Raises FileExistsError when the mined file or its settings record exists (never overwritten)."""
    for f in (Path(out), settings_path(out)):
        if f.exists():
            raise FileExistsError(f"{f} exists; embtune never overwrites mined negatives: choose another output")


def write_mined(out: str | Path, rows: list[dict], record: dict) -> None:
    """Write the rows as JSON Lines to ``out`` and ``record`` to ``<out>.settings.json``.

    Both are written to temporary names, then linked into place, which fails if a file appeared there
    meanwhile; nothing existing is ever replaced.
    Raises:
        FileExistsError: ``out`` or its settings file exists.
    """
    out = Path(out)
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
                         (settings_path(out), json.dumps(record, indent=2, ensure_ascii=False) + "\n")):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, target)  # atomic, and refuses an existing target (os.replace would overwrite)
        finally:
            tmp.unlink()


def mine_to_file(miner: HardNegativeMiner, model, model_name: str, data: TrainingData, data_format,
                 out: str | Path) -> dict:
    """One mining pass written to ``out`` with its settings record (model, data, window, filters, counts
    dropped per reason, seed); returns the record. Refuses before encoding anything if ``out`` exists.

    Raises:
        FileExistsError: ``out`` or ``<out>.settings.json`` exists.
    """
    refuse_existing(out)
    rows, counts = miner(model, data, data_format)
    record = {"output": str(out), "model": model_name, "data": data.name, "data_fingerprint": data.fingerprint,
              **miner.settings(), **counts}
    write_mined(out, rows, record)
    log.info("mined %d negatives for %d queries -> %s (dropped: %s)", counts["negatives"], counts["queries"], out,
             counts["dropped"])
    return record
