"""What every loader returns: training rows and an optional held-out retrieval set."""


from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from embtune.data.checks import DataProblems

MAX_AUTO = 1000   # the automatic dev size: min(MAX_AUTO, ceil(ratio * queries)) ...
MIN_AUTO = 5      # ... but at least this many, and never more than half of the distinct queries


@dataclass(frozen=True)
class DevSplit:
    """What a loader was asked to hold out (``data.dev_queries``, ``data.dev_ratio``, ``data.seed``).

    ``queries``: exactly this many distinct queries (0: no dev split); None: the automatic size
    min(1000, ceil(ratio · distinct queries)), at least 5, at most half of them. ``ratio``: 0 turns the
    automatic size off.

    Raises:
        ValueError: ``queries`` < 0 or not an integer, ``ratio`` outside [0, 1), naming the option.
    """

    queries: int | None = None
    ratio: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.queries is not None and (not isinstance(self.queries, int) or isinstance(self.queries, bool)
                                         or self.queries < 0):
            raise ValueError(f"data.dev_queries={self.queries!r}: must be an integer >= 0 (0: no dev split) or null "
                             "(the size follows data.dev_ratio)")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"data.dev_ratio={self.ratio!r}: must be a fraction in [0, 1) (0: no dev split)")

    @property
    def off(self) -> bool:
        return self.queries == 0 or (self.queries is None and self.ratio == 0)

    def size(self, n_queries: int) -> int:
        """How many of ``n_queries`` distinct queries to hold out (0 when there are too few to split).

        Raises:
            ValueError: an explicit ``queries`` that leaves no query to train on.
        """
        if self.off:
            return 0
        if self.queries is not None:
            if self.queries >= n_queries:
                raise ValueError(f"data.dev_queries={self.queries}: the data has only {n_queries} distinct queries; "
                                 "hold out fewer (0: no dev split)")
            return self.queries
        return min(MAX_AUTO, max(MIN_AUTO, math.ceil(self.ratio * n_queries)), n_queries // 2)


@dataclass
class RetrievalSet:
    """A retrieval test collection.

    Attributes:
        queries: query id -> query text.
        corpus: document id -> document text (a dict, or a :class:`~embtune.data.examples.TextMap` on disk).
            Every document is a ranking candidate.
        qrels: query id -> {document id -> relevance grade (int, > 0 is relevant)}; every judged query,
            those whose grades are all 0 too (they score 0, as in pytrec_eval). A judged document may be
            missing from the corpus: it can never be retrieved but still counts as relevant.
    """

    queries: dict[str, str]
    corpus: Mapping[str, str]
    qrels: dict[str, dict[str, int]]

    def __len__(self) -> int:
        return len(self.qrels)

    def identical_ids(self) -> int:
        """How many judged queries share their id with a corpus document (ArguAna-style: each query is
        itself a document; ``eval.ignore_identical_ids`` leaves it out of its own ranking)."""
        return sum(qid in self.corpus for qid in self.qrels)


@dataclass
class TrainingData:
    """What a loader returns.

    Attributes:
        rows: training rows, each a dict of column -> value (``data_format`` reads them): a list, or a
            :class:`~embtune.data.rows.RowTable` (the rows of a file, kept on disk).
        test: held-out retrieval set for evaluation, or None when the data has none.
        name: a short description of the source (path or hub name).
        fingerprint: sha256 hex digest of the rows and the test set (see :func:`fingerprint`).
        source: where each row came from, for error messages: ``(file, row number)`` per row.
        problems: bad rows and warnings met so far; the data format adds its own (same drop policy).
        dev: the dev split a loader was asked for when the data has no test set (made once the data
            format is known, :func:`embtune.data.dev_split.hold_out_dev`), or None.
        held_out: the record of the dev split made (sizes, seed), also in ``summary()``, or None.
    """

    rows: Sequence[dict]
    test: RetrievalSet | None
    name: str
    fingerprint: str = ""
    source: Sequence[tuple[str, int]] = field(default_factory=list)
    problems: DataProblems = field(default_factory=DataProblems)
    dev: DevSplit | None = None
    held_out: dict | None = None

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.rows, self.test)

    def summary(self) -> dict:
        """Size, fingerprint and problems (warnings, dropped rows), as recorded in a run's summary.json."""
        out = {"name": self.name, "train_rows": len(self.rows), "fingerprint": self.fingerprint,
               "problems": self.problems.summary()}
        if self.test is not None:
            out.update(test_queries=len(self.test.qrels), test_corpus=len(self.test.corpus),
                       identical_ids=self.test.identical_ids())
        if self.held_out is not None:
            out["dev_split"] = self.held_out
        return out


def fingerprint(rows, test: RetrievalSet | None) -> str:
    """sha256 over a canonical JSON dump of the rows and the test set: equal data, equal digest.

    The bytes hashed: for each row ``json.dumps(row, sort_keys=True, ensure_ascii=False)`` and a newline;
    then, with a test set, ``json.dumps(part, sort_keys=True, ensure_ascii=False)`` of its queries, its
    corpus and its qrels, in that order. Rows are read one at a time and a large mapping (a corpus kept
    on disk) is dumped key by key, with the same bytes as one ``json.dumps``.
    """
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    feed_test(h, test)
    return h.hexdigest()


def feed_test(h, test: RetrievalSet | None) -> None:
    """Add the test set's part of :func:`fingerprint` to the sha256 object ``h``."""
    if test is None:
        return
    for part in (test.queries, test.corpus, test.qrels):
        h.update(b"{")
        items = part.sorted_items() if hasattr(part, "sorted_items") else ((k, part[k]) for k in sorted(part))
        for n, (key, value) in enumerate(items):  # a corpus on disk streams its items in key order
            item = f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, sort_keys=True, ensure_ascii=False)}"
            h.update((", " + item if n else item).encode())
        h.update(b"}")


def held_out_digest(test: RetrievalSet | None) -> str:
    """sha256 of the test set's part of :func:`fingerprint` alone ("" without a test set)."""
    if test is None:
        return ""
    h = hashlib.sha256()
    feed_test(h, test)
    return h.hexdigest()
