"""Data formats: map a loader's rows to training examples.

Each format has a ``kind``, the kind of example it yields, which must match the loss's ``input_kind``
(checked before any model loads):

- ``scores``: :class:`Example` ``(query, positive, negatives)``, scored against candidates
  (``pairwise``, ``triplet``, ``multi_negative``).
- ``pair_scores``: :class:`ScoredPair` ``(text1, text2, score)`` (``scored_pairs``, ``pairwise`` with a label).
- ``list_scores``: :class:`RankedList` ``(query, documents, scores)`` (``listwise``).
- ``embeddings``: :class:`LabeledText` ``(text, label)`` (``pointwise``).

Column names are configurable. A missing or wrong-typed column raises a ``ValueError`` naming the
file, the row and the field.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Example(NamedTuple):
    query: str
    positive: str
    negatives: tuple[str, ...] = ()


class ScoredPair(NamedTuple):
    text1: str
    text2: str
    score: float


class RankedList(NamedTuple):
    query: str
    documents: tuple[str, ...]
    scores: tuple[float, ...]


class LabeledText(NamedTuple):
    text: str
    label: int


def _where(source: list[tuple[str, int]], i: int) -> str:
    if i < len(source):
        file, line = source[i]
        return f"{file}:{line}"
    return f"row {i + 1}"


def _texts(row: dict, col: str, where: str, allow_list: bool = True, allow_empty_list: bool = False) -> list[str]:
    """A column's value as a list of strings (a string or, where allowed, a list of them)."""
    if col not in row:
        raise ValueError(f"{where}: missing field {col!r} (row has {sorted(row)})")
    value = row[col]
    if isinstance(value, str):
        return [value]
    if (allow_list and isinstance(value, (list, tuple)) and (value or allow_empty_list)
            and all(isinstance(v, str) for v in value)):
        return list(value)
    expected = "a string or a non-empty list of strings" if allow_list else "a string"
    raise ValueError(f"{where}: field {col!r} must be {expected}, got {type(value).__name__}: {str(value)[:80]!r}")


def _number(value, col: str, where: str) -> float:
    """A finite float from a number or a numeric string (CSV/TSV cells are strings)."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise ValueError(f"{where}: field {col!r} must be a finite number, got {type(value).__name__}: {str(value)[:80]!r}")
    return x


class Pairwise:
    """``(query, positive)`` rows, or ``(query, document, label)`` rows when ``label`` is set.

    Without a label: one :class:`Example` per positive (a list of positives gives several), kind ``scores``.
    With a label (binary 0/1 or graded): one :class:`ScoredPair` per row, kind ``pair_scores``.

    Args:
        query, positive: column names.
        label: column name of the label, or None.
    """

    name = "pairwise"
    has_negatives = False

    def __init__(self, query: str = "query", positive: str = "positive", label: str | None = None):
        self.query, self.positive, self.label = query, positive, label
        self.kind = "scores" if label is None else "pair_scores"

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            q = _texts(row, self.query, where, allow_list=False)[0]
            if self.label is None:
                out.extend(Example(q, p) for p in _texts(row, self.positive, where))
            else:
                d = _texts(row, self.positive, where, allow_list=False)[0]
                if self.label not in row:
                    raise ValueError(f"{where}: missing field {self.label!r} (row has {sorted(row)})")
                out.append(ScoredPair(q, d, _number(row[self.label], self.label, where)))
        return out


class Triplet:
    """``(query, positive, negative)`` rows: one negative per example, kind ``scores``.

    Where a row holds lists (e.g. FlagEmbedding's ``{"query", "pos": [...], "neg": [...]}``), positive
    i is paired with negative i mod n, one example per positive.
    """

    name = "triplet"
    kind = "scores"
    has_negatives = True

    def __init__(self, query: str = "query", positive: str = "positive", negative: str = "negative"):
        self.query, self.positive, self.negative = query, positive, negative

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[Example]:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            q = _texts(row, self.query, where, allow_list=False)[0]
            negs = _texts(row, self.negative, where)
            out.extend(Example(q, p, (negs[j % len(negs)],)) for j, p in enumerate(_texts(row, self.positive, where)))
        return out


class MultiNegative:
    """``(query, positive, [negative_1 … negative_n])`` rows, n varying by row, kind ``scores``.

    One :class:`Example` per positive, carrying all the row's negatives; ``negatives.group_size`` picks how
    many are used per step. A row with no negatives is allowed (it gets only in-batch negatives).
    """

    name = "multi_negative"
    kind = "scores"
    has_negatives = True

    def __init__(self, query: str = "query", positive: str = "pos", negatives: str = "neg"):
        self.query, self.positive, self.negatives = query, positive, negatives

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[Example]:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            q = _texts(row, self.query, where, allow_list=False)[0]
            negs = tuple(_texts(row, self.negatives, where, allow_empty_list=True))
            out.extend(Example(q, p, negs) for p in _texts(row, self.positive, where))
        return out


class Listwise:
    """A query with a list of documents and their graded relevance or teacher scores, kind ``list_scores``.

    Raises ``ValueError`` when the two lists differ in length.
    """

    name = "listwise"
    kind = "list_scores"
    has_negatives = False

    def __init__(self, query: str = "query", documents: str = "documents", scores: str = "scores"):
        self.query, self.documents, self.scores = query, documents, scores

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[RankedList]:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            q = _texts(row, self.query, where, allow_list=False)[0]
            docs = _texts(row, self.documents, where)
            scores = row.get(self.scores)
            if not isinstance(scores, (list, tuple)) or len(scores) != len(docs):
                raise ValueError(f"{where}: field {self.scores!r} must be a list of {len(docs)} numbers "
                                 f"(one per document), got {str(scores)[:80]!r}")
            out.append(RankedList(q, tuple(docs), tuple(_number(s, self.scores, where) for s in scores)))
        return out


class ScoredPairs:
    """``(sentence1, sentence2, score)`` rows as in STS-B, kind ``pair_scores``.

    Args:
        score_scale: divide scores by this (e.g. 5 for STS-B's 0–5 scale), or None.
    """

    name = "scored_pairs"
    kind = "pair_scores"
    has_negatives = False

    def __init__(self, text1: str = "sentence1", text2: str = "sentence2", score: str = "score",
                 score_scale: float | None = None):
        self.text1, self.text2, self.score, self.score_scale = text1, text2, score, score_scale

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[ScoredPair]:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            if self.score not in row:
                raise ValueError(f"{where}: missing field {self.score!r} (row has {sorted(row)})")
            s = _number(row[self.score], self.score, where)
            out.append(ScoredPair(_texts(row, self.text1, where, allow_list=False)[0],
                                  _texts(row, self.text2, where, allow_list=False)[0],
                                  s / self.score_scale if self.score_scale else s))
        return out


class Pointwise:
    """Texts with a class label, kind ``embeddings``: texts that share a label are positives of each other.

    Every column in ``texts`` gives one :class:`LabeledText` per row with the row's label, so a
    ``(query, document, id)`` row gives a class of two texts. Labels of any type are mapped to
    0..n_classes-1 in order of first appearance.
    """

    name = "pointwise"
    kind = "embeddings"
    has_negatives = False

    def __init__(self, texts: list[str] = ("text",), label: str = "label"):
        self.texts, self.label = list(texts), label

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[LabeledText]:
        out, source, classes = [], list(source), {}
        for i, row in enumerate(rows):
            where = _where(source, i)
            if self.label not in row or isinstance(row[self.label], (list, dict)) or row[self.label] is None:
                raise ValueError(f"{where}: field {self.label!r} must be a class label (a string or an integer), "
                                 f"got {str(row.get(self.label, 'nothing'))[:80]!r}")
            label = classes.setdefault(str(row[self.label]), len(classes))
            out.extend(LabeledText(t, label) for col in self.texts for t in _texts(row, col, where))
        return out


class RawTexts:
    """Unlabelled texts for unsupervised contrastive training (SimCSE), kind ``scores``.

    Every distinct, non-blank text of the ``columns`` (a string or a list of strings per cell) becomes
    one :class:`Example` ``(text, text)``: the loss (``loss=simcse``) encodes it twice, and the two
    dropout masks make the positive pair. Order: first appearance, row by row, column by column.
    """

    name = "raw_texts"
    kind = "scores"
    has_negatives = False

    def __init__(self, columns: list[str] = ("query", "positive")):
        self.columns = list(columns)

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[Example]:
        seen, source = {}, list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            for col in self.columns:
                for text in _texts(row, col, where, allow_empty_list=True):
                    if text.strip():
                        seen.setdefault(text, None)
        return [Example(t, t) for t in seen]
