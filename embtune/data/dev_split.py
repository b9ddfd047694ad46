"""A dev split held out of the user's own training rows, for data that brings no test set.

Queries are held out whole (every row of a held-out query goes to the dev side), chosen by the sha256 of
``seed:query`` so the split depends on neither the row order nor the machine. The dev set is ranked as
retrieval against every positive and negative text of the whole data set (train and dev rows), each
one a candidate; a dev query's relevant documents are its positives.

No leakage: a training row is dropped when its query or one of its positives is a dev query or a dev
positive, so no query text and no positive text is on both sides (negatives may be: a text that is a
negative for a training query is fair game as a dev candidate).
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

from embtune.data.cache import cache_dir
from embtune.data.dataset import RetrievalSet, TrainingData
from embtune.data.examples import DOCUMENT, TextMap, TextTable, TextWriter
from embtune.data.formats import EXAMPLE_KIND
from embtune.data.rows import RowTable
from embtune.data.tables import Writer, digest, numbers, read_json, read_table, write_json

VERSION = 1  # bump when the split or its files change: old splits are then made again

log = logging.getLogger(__name__)


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _well_formed(row: dict, q_col: str, p_col: str, n_col: str | None) -> bool:
    """A string query, a string or non-empty list of strings as positive, and (when named) negatives of
    strings. Only such rows can go to the dev side: any other row stays in training, where the data
    format reports it (or drops it) with its file:line."""
    def strings(v, empty_ok):
        return isinstance(v, str) or (isinstance(v, (list, tuple)) and (empty_ok or bool(v))
                                      and all(isinstance(x, str) for x in v))

    return (isinstance(row.get(q_col), str) and strings(row.get(p_col), False)
            and (n_col is None or strings(row.get(n_col), True)))


def distinct_queries(rows: list[dict], columns: dict[str, str | None]) -> list[str]:
    """The queries of the well-formed rows, in order of first appearance: those a dev split may hold out."""
    q, p, n = columns["query"], columns["positive"], columns.get("negatives")
    return list(dict.fromkeys(r[q] for r in rows if _well_formed(r, q, p, n)))


def split_dev(rows: list[dict], columns: dict[str, str | None], n: int, seed: int = 0
              ) -> tuple[list[int], RetrievalSet, int]:
    """Hold out ``n`` distinct queries of ``rows`` as a retrieval dev set.

    Args:
        rows: training rows (dicts of column -> value).
        columns: ``{"query": column, "positive": column, "negatives": column or None}``; a positive or
            negatives value is a string or a list of strings. A row with a query that is not a string or
            a missing or wrong-typed positive or negatives value stays on the training side (never
            dropped here), for the data format to report with its file:line.
        n: distinct queries to hold out (0 < n < distinct queries).
        seed: the held-out queries are the n smallest sha256(f"{seed}:{query}").

    Returns:
        ``(train_indices, dev, dropped)``: indices into ``rows`` kept for training (in order), the dev
        set (query ids ``q0..``, document ids ``d0..`` in order of first appearance), and how many
        training rows were dropped for sharing a query or positive text with the dev side.
    """
    train, dev, dropped, _ = _split(rows, columns, lambda _: n, seed)
    return train, dev, dropped


def _split(rows, columns: dict[str, str | None], size_of, seed: int, folder: Path | None = None):
    """:func:`split_dev` in three passes over ``rows``, each reading one row at a time; ``size_of(distinct
    queries)`` gives n. The candidates go to a dict, or with ``folder`` to a text table there (the corpus
    is then a :class:`~embtune.data.examples.TextMap` over it, and no Python object per text is held).
    A query is known by the first 16 bytes of sha256(f"{seed}:{query}"), which order the queries as the
    full hex digests do. Returns ``(train, dev, dropped, distinct queries)``."""
    q_col, p_col, n_col = columns["query"], columns["positive"], columns.get("negatives")

    def candidates(r) -> list[str]:
        return _texts(r.get(p_col)) + (_texts(r.get(n_col)) if n_col else [])

    def query_key(q: str) -> bytes:
        return hashlib.sha256(f"{seed}:{q}".encode()).digest()[:16]

    docs = TextWriter(folder) if folder is not None else None
    doc_ids: dict[str, int] = {}
    keys = bytearray()  # the query key of each well-formed row, in row order
    try:
        for r in rows:  # pass 1: the distinct queries; every positive and negative of the data is a candidate
            if _well_formed(r, q_col, p_col, n_col):
                keys += query_key(r[q_col])
            for t in candidates(r):
                if docs is not None:
                    docs.add(t, DOCUMENT)
                else:
                    doc_ids.setdefault(t, len(doc_ids))
        corpus = TextMap(docs.close()) if docs is not None else {f"d{k}": t for t, k in doc_ids.items()}
    except BaseException:
        if docs is not None:
            docs.abort()
        raise
    distinct = np.unique(np.frombuffer(bytes(keys), dtype="S16")) if keys else []  # sorted, as the digests
    held = set(distinct[:size_of(len(distinct))].tolist())
    held = {k.ljust(16, b"\0") for k in held}  # numpy's S16 drops trailing zero bytes
    query_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    dev_rows: set[int] = set()
    dev_texts: set[str] = set()
    occurrence = well = 0  # candidates numbered as in pass 1; well-formed rows, whose keys pass 1 kept
    for i, r in enumerate(rows):  # pass 2: the held queries' rows, their positives relevant
        texts = candidates(r)
        dev_row = False
        if _well_formed(r, q_col, p_col, n_col):  # its query's key: pass 1's (no second sha256 a row)
            dev_row, well = bytes(keys[16 * well:16 * well + 16]) in held, well + 1
        if dev_row:
            q = r[q_col]
            dev_rows.add(i)
            qid = query_ids.setdefault(q, f"q{len(query_ids)}")  # in order of first appearance
            positives = _texts(r[p_col])
            dev_texts.update([q, *positives])
            grades = qrels.setdefault(qid, {})
            for j, t in enumerate(positives):
                grades[f"d{docs.ids[occurrence + j] if docs is not None else doc_ids[t]}"] = 1
        occurrence += len(texts)
    del keys
    train, dropped = array("q"), 0
    for i, r in enumerate(rows):  # pass 3: no query or positive text of the dev side trains
        if i in dev_rows:
            continue
        if not _well_formed(r, q_col, p_col, n_col):  # stays, for the data format to report with its file:line
            train.append(i)
        elif dev_texts.intersection([r[q_col], *_texts(r[p_col])]):
            dropped += 1
        else:
            train.append(i)
    dev = RetrievalSet(queries={qid: q for q, qid in query_ids.items()}, corpus=corpus, qrels=qrels)
    return train.tolist() if docs is None else np.frombuffer(train, dtype=np.int64), dev, dropped, len(distinct)


def hold_out_dev(data: TrainingData, data_format) -> TrainingData:
    """``data`` with a dev split as its test set, when it has no test set, asks for one (``data.dev``)
    and its format names query and positive columns (``pairwise`` without a label, ``triplet``,
    ``multi_negative``); otherwise ``data`` itself. The rows keep their ``file:line`` sources; the
    fingerprint is that of the training rows and the dev set.

    Rows kept on disk (a :class:`~embtune.data.rows.RowTable`) are split a row at a time, the candidates
    written to ``$EMBTUNE_CACHE/dev/<key>`` (key: the data's fingerprint, the columns and the split's
    settings) and read from there by a later run, with the split itself.

    Raises:
        ValueError: an explicit ``data.dev_queries`` at or above the number of distinct queries.
    """
    spec = data.dev
    if data.test is not None or spec is None or spec.off or getattr(data_format, "kind", None) != EXAMPLE_KIND:
        return data
    # the format's columns as it will read them: configured, or recognised from the rows' names
    roles = data_format.resolve_columns(data.rows) if getattr(data_format, "roles", ()) else {}
    q_col, p_col = roles.get("query"), roles.get("positive")
    if not isinstance(q_col, str) or not isinstance(p_col, str):
        return data
    n_col = roles.get("negatives", roles.get("negative"))
    if isinstance(n_col, (list, tuple)):  # sentence-transformers' negative_1..n columns: not candidates here
        log.info("dev split: negatives spread over columns %s are not ranking candidates (only a single "
                 "negatives column is); the dev set ranks against the positives", n_col_names(roles))
    if not isinstance(n_col, str):
        n_col = None
    columns = {"query": q_col, "positive": p_col, "negatives": n_col}
    if isinstance(data.rows, RowTable):
        return _stored_split(data, columns, spec)
    n_queries = len(distinct_queries(data.rows, columns))
    n = spec.size(n_queries)
    if n == 0:
        return _no_split(data, n_queries)
    keep, dev, dropped = split_dev(data.rows, columns, n, spec.seed)
    source = [data.source[i] for i in keep] if data.source else []
    record = {"dev_queries": len(dev.qrels), "of_queries": n_queries, "candidates": len(dev.corpus),
              "dropped_train_rows": dropped, "seed": spec.seed}
    return TrainingData(rows=[data.rows[i] for i in keep], test=dev, name=data.name, source=source,
                        problems=data.problems, held_out=record)


def n_col_names(roles: dict) -> str:
    """The negatives' columns of ``roles`` as one string, for a log line."""
    cols = roles.get("negatives", roles.get("negative"))
    return ", ".join(map(str, cols)) if isinstance(cols, (list, tuple)) else str(cols)


def _no_split(data: TrainingData, n_queries: int) -> TrainingData:
    return TrainingData(rows=data.rows, test=None, name=data.name, fingerprint=data.fingerprint,
                        source=data.source, problems=data.problems,
                        held_out={"dev_queries": 0, "reason": f"only {n_queries} distinct queries"})


def _stored_split(data: TrainingData, columns: dict, spec) -> TrainingData:
    """:func:`hold_out_dev` for rows on disk, from ``$EMBTUNE_CACHE/dev/<key>`` when it was made before."""
    folder = cache_dir() / "dev" / digest(VERSION, data.fingerprint, columns, spec.queries, spec.ratio, spec.seed)
    meta = read_json(folder / "meta.json")
    if meta is not None and meta.get("version") == VERSION:
        if meta["dev"] is None:
            return _no_split(data, meta["of_queries"])
        keep = numbers(read_table(folder / "keep.arrow").column("row"), np.int64)
        dev = RetrievalSet(queries=meta["dev"]["queries"], corpus=TextMap(TextTable(folder)), qrels=meta["dev"]["qrels"])
        return TrainingData(rows=data.rows.subset(keep), test=dev, name=data.name, fingerprint=meta["fingerprint"],
                            source=data.source.subset(keep), problems=data.problems, held_out=meta["record"])
    sizes = {}

    def size_of(n_queries: int) -> int:
        sizes["of_queries"] = n_queries
        return spec.size(n_queries)

    keep, dev, dropped, n_queries = _split(data.rows, columns, size_of, spec.seed, folder)
    if not dev.qrels:  # too few queries to split
        write_json(folder / "meta.json", {"version": VERSION, "dev": None, "of_queries": n_queries})
        return _no_split(data, n_queries)
    w = Writer(folder / "keep.arrow", pa.schema([("row", pa.int64())]))
    w.write({"row": np.asarray(keep, dtype=np.int64)})
    w.close()
    record = {"dev_queries": len(dev.qrels), "of_queries": n_queries, "candidates": len(dev.corpus),
              "dropped_train_rows": dropped, "seed": spec.seed}
    split = TrainingData(rows=data.rows.subset(keep), test=dev, name=data.name, source=data.source.subset(keep),
                         problems=data.problems, held_out=record)
    write_json(folder / "meta.json", {"version": VERSION, "dev": {"queries": dev.queries, "qrels": dev.qrels},
                                      "record": record, "fingerprint": split.fingerprint, "of_queries": n_queries})
    return split


def describe_held_out(data: TrainingData, evaluator) -> str:
    """One line saying what the run evaluates on (a retrieval evaluator reads ``data.test``)."""
    if not hasattr(evaluator, "k"):  # STS and the like bring their own pairs
        return f"evaluating on: eval={type(evaluator).__name__} (its own file)"
    h = data.held_out
    if h and data.test is not None:
        return (f"evaluating on: a dev split of {data.name}: {h['dev_queries']} of its {h['of_queries']} queries "
                f"held out (by sha256 of data.seed={h['seed']} and the query), ranked against all {h['candidates']} "
                f"candidate texts; {h['dropped_train_rows']} training rows dropped for sharing a query "
                "or positive with them (data.dev_queries=0 holds none out and trains on every row)")
    if data.test is not None:
        return (f"evaluating on: the test set of {data.name} ({len(data.test.qrels)} queries, "
                f"{len(data.test.corpus)} documents)")
    why = f" ({h['reason']})" if h else ""
    dev = getattr(data, "dev", None)  # a mixture has none: each source says its own
    if not h and dev is not None and dev.off:  # what was asked, and how to ask otherwise
        why = f" ({'data.dev_queries' if dev.queries == 0 else 'data.dev_ratio'}=0; set it > 0 to hold queries out)"
    return f"evaluating on: nothing: {data.name} has no test set and no dev split{why}"
