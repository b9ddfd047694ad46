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

from embtune.data.dataset import RetrievalSet, TrainingData
from embtune.data.formats import EXAMPLE_KIND


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
    q_col, p_col, n_col = columns["query"], columns["positive"], columns.get("negatives")
    queries = distinct_queries(rows, columns)
    held = set(sorted(queries, key=lambda q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest())[:n])
    doc_ids: dict[str, str] = {}
    for r in rows:  # every positive and negative of the whole data set is a candidate
        for t in _texts(r.get(p_col)) + (_texts(r.get(n_col)) if n_col else []):
            doc_ids.setdefault(t, f"d{len(doc_ids)}")
    query_ids = {q: f"q{i}" for i, q in enumerate(q for q in queries if q in held)}
    qrels: dict[str, dict[str, int]] = {qid: {} for qid in query_ids.values()}
    dev_rows = [i for i, r in enumerate(rows) if _well_formed(r, q_col, p_col, n_col) and r[q_col] in held]
    for i in dev_rows:
        for t in _texts(rows[i].get(p_col)):
            qrels[query_ids[rows[i][q_col]]][doc_ids[t]] = 1
    dev_texts = held | {t for i in dev_rows for t in _texts(rows[i].get(p_col))}
    dev_set, train, dropped = set(dev_rows), [], 0
    for i, r in enumerate(rows):
        if i in dev_set:
            continue
        if not _well_formed(r, q_col, p_col, n_col):  # stays, for the data format to report with its file:line
            train.append(i)
            continue
        if dev_texts.intersection([r[q_col], *_texts(r[p_col])]):
            dropped += 1
        else:
            train.append(i)
    dev = RetrievalSet(queries={qid: q for q, qid in query_ids.items()},
                       corpus={d: t for t, d in doc_ids.items()}, qrels=qrels)
    return train, dev, dropped


def hold_out_dev(data: TrainingData, data_format) -> TrainingData:
    """``data`` with a dev split as its test set, when it has no test set, asks for one (``data.dev``)
    and its format names query and positive columns (``pairwise`` without a label, ``triplet``,
    ``multi_negative``); otherwise ``data`` itself. The rows keep their ``file:line`` sources; the
    fingerprint is that of the training rows and the dev set.

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
    if not isinstance(n_col, str):  # sentence-transformers' negative_1..n columns: not candidates here
        n_col = None
    columns = {"query": q_col, "positive": p_col, "negatives": n_col}
    n_queries = len(distinct_queries(data.rows, columns))
    n = spec.size(n_queries)
    if n == 0:
        return TrainingData(rows=data.rows, test=None, name=data.name, fingerprint=data.fingerprint,
                            source=data.source, problems=data.problems,
                            held_out={"dev_queries": 0, "reason": f"only {n_queries} distinct queries"})
    keep, dev, dropped = split_dev(data.rows, columns, n, spec.seed)
    source = [data.source[i] for i in keep] if data.source else []
    record = {"dev_queries": len(dev.qrels), "of_queries": n_queries, "candidates": len(dev.corpus),
              "dropped_train_rows": dropped, "seed": spec.seed}
    return TrainingData(rows=[data.rows[i] for i in keep], test=dev, name=data.name, source=source,
                        problems=data.problems, held_out=record)


def describe_held_out(data: TrainingData, evaluator) -> str:
    """One line saying what the run evaluates on (a retrieval evaluator reads ``data.test``)."""
    if not hasattr(evaluator, "k"):  # STS and the like bring their own pairs
        return f"evaluating on: eval={type(evaluator).__name__} (its own file)"
    h = data.held_out
    if h and data.test is not None:
        return (f"evaluating on: a dev split of {data.name}: {h['dev_queries']} of its {h['of_queries']} queries "
                f"held out (by sha256 of data.seed={h['seed']} and the query), ranked against all {h['candidates']} "
                f"positive and negative texts; {h['dropped_train_rows']} training rows dropped for sharing a query "
                "or positive with them (data.dev_queries=0: no dev split)")
    if data.test is not None:
        return (f"evaluating on: the test set of {data.name} ({len(data.test.qrels)} queries, "
                f"{len(data.test.corpus)} documents)")
    why = f" ({h['reason']})" if h else ""
    return f"evaluating on: nothing: {data.name} has no test set and no dev split{why}"
