"""Training queries and the candidate pool for hard-negative mining (:mod:`embtune.mining.miner`): texts are
compared after :func:`normalise`; a query gathers every positive it has in any row; the pool holds each
document once, with all its ids.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from embtune.data import TrainingData


def normalise(text: str) -> str:
    """The form texts are compared in: Unicode NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass
class Query:
    """One training query with every positive it has anywhere in the data (rows are merged by normalised
    query text and by ``query_id``). ``positive_ids`` / ``positive_keys`` are what is never mined."""

    text: str
    query_id: str | None = None
    positives: list[str] = field(default_factory=list)
    positive_ids: set[str] = field(default_factory=set)
    positive_keys: set[str] = field(default_factory=set)
    id_of: dict[str, str] = field(default_factory=dict)  # normalised positive text -> its doc id
    negatives: list[str] = field(default_factory=list)  # the data's own negatives (pool candidates)


def group_queries(data: TrainingData, data_format) -> list[Query]:
    """Training rows -> one :class:`Query` per distinct query, in first-seen order.

    ``data_format`` maps each row to ``(query, positive)`` examples; a row's ``query_id`` / ``doc_id``
    columns (as ``data=beir`` writes them) give the ids (``doc_id`` only where the row has one positive). Two rows are the same query when their
    normalised texts are equal or they share a ``query_id``, so a query judged in several rows keeps
    all its positives.
    """
    by_key: dict[str, Query] = {}
    by_id: dict[str, Query] = {}
    order: list[Query] = []
    source = list(data.source) or [(data.name, i + 1) for i in range(len(data.rows))]
    examples, origins = data_format.convert(data.rows, source)  # the columns resolved (and logged) once
    per_row: dict[int, list] = {}
    for ex, i in zip(examples, origins):
        per_row.setdefault(i, []).append(ex)
    for i, row in enumerate(data.rows):
        qid = row.get("query_id")
        qid = None if qid is None else str(qid)
        examples = per_row.get(i, [])
        did = row.get("doc_id") if len(examples) == 1 else None
        for ex in examples:
            key = normalise(ex.query)
            q = by_key.get(key) or (by_id.get(qid) if qid is not None else None)
            if q is None:
                q = Query(ex.query, qid)
                order.append(q)
            by_key.setdefault(key, q)
            if qid is not None:
                by_id.setdefault(qid, q)
            if normalise(ex.positive) not in q.positive_keys:
                q.positives.append(ex.positive)
                q.positive_keys.add(normalise(ex.positive))
            if did is not None:
                q.positive_ids.add(str(did))
                q.id_of[normalise(ex.positive)] = str(did)
            q.negatives.extend(ex.negatives)
    return order


class CandidatePool:
    """Documents to mine from, one entry per document: texts equal once normalised, or sharing an id,
    are one entry (its first text kept, all its ids recorded), so no document is mined twice.

    Attributes:
        texts: entry -> the first original text seen. ``ids``: entry -> set of document ids (may be empty).
    """

    def __init__(self):
        self.texts: list[str] = []
        self.ids: list[set[str]] = []
        self._by_text: dict[str, int] = {}
        self._by_id: dict[str, int] = {}

    def add(self, text: str, doc_id: str | None = None) -> int:
        key = normalise(text)
        i = self._by_text.get(key, self._by_id.get(doc_id) if doc_id is not None else None)
        if i is None:
            i = len(self.texts)
            self.texts.append(text)
            self.ids.append(set())
        self._by_text.setdefault(key, i)
        if doc_id is not None:
            self.ids[i].add(doc_id)
            self._by_id.setdefault(doc_id, i)
        return i

    def find(self, text: str) -> int | None:
        return self._by_text.get(normalise(text))

    def find_id(self, doc_id: str) -> int | None:
        return self._by_id.get(doc_id)

    def __len__(self) -> int:
        return len(self.texts)
