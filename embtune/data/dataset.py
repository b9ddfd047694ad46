"""What every loader returns: training rows and an optional held-out retrieval set."""


from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from embtune.data.checks import DataProblems

if TYPE_CHECKING:
    from embtune.data.dev_split import DevSplit


@dataclass
class RetrievalSet:
    """A retrieval test collection.

    Attributes:
        queries: query id -> query text.
        corpus: document id -> document text. Every document is a ranking candidate.
        qrels: query id -> {document id -> relevance grade (int, > 0 is relevant)}; every judged query,
            those whose grades are all 0 too (they score 0, as in pytrec_eval). A judged document may be
            missing from the corpus: it can never be retrieved but still counts as relevant.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
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
        rows: training rows, each a dict of column -> value (``data_format`` reads them).
        test: held-out retrieval set for evaluation, or None when the data has none.
        name: a short description of the source (path or hub name).
        fingerprint: sha256 hex digest of the rows and the test set (see :func:`fingerprint`).
        source: where each row came from, for error messages: ``(file, row number)`` per row.
        problems: bad rows and warnings met so far; the data format adds its own (same drop policy).
        dev: the dev split a loader was asked for when the data has no test set (made once the data
            format is known, :func:`embtune.data.dev_split.hold_out_dev`), or None.
        held_out: the record of the dev split made (sizes, seed), also in ``summary()``, or None.
    """

    rows: list[dict]
    test: RetrievalSet | None
    name: str
    fingerprint: str = ""
    source: list[tuple[str, int]] = field(default_factory=list)
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


def fingerprint(rows: list[dict], test: RetrievalSet | None) -> str:
    """sha256 over a canonical JSON dump of the rows and the test set: equal data, equal digest."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    if test is not None:
        for part in (test.queries, test.corpus, test.qrels):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()
