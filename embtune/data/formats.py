"""Data formats: map a loader's rows to training examples.

Each format has a ``kind``, the kind of example it yields, which must match the loss's ``input_kind``
(checked before any model loads):

- ``scores``: :class:`Example` ``(query, positive, negatives)``, scored against candidates
  (``pairwise``, ``triplet``, ``multi_negative``).
- ``pair_scores``: :class:`ScoredPair` ``(text1, text2, score)`` (``scored_pairs``, ``pairwise`` with a label).
- ``list_scores``: :class:`RankedList` ``(query, documents, scores)`` (``listwise``).
- ``embeddings``: :class:`LabeledText` ``(text, label)`` (``pointwise``).

Column names are configurable; a column left ``null`` is recognised from the names the common
conventions give that role (:data:`COLUMN_NAMES`: embtune's and FlagEmbedding's ``query``/``pos``/``neg``,
sentence-transformers' ``anchor``/``positive``/``negative``, ``negative_1..n``, ``sentence1``/``sentence2``/``score``
and ``question``/``answer``), and the mapping used is logged in one line. A role that no row has is one error
naming the ``data_format.<role>=<column>`` override. A column missing or wrong-typed in some rows raises a
``ValueError`` naming the file, the row and the field; given a :class:`~embtune.data.checks.DataProblems` that
allows it (``data.drop_bad_rows=true``), the row is dropped with a warning instead.
"""

from __future__ import annotations

import logging
import math
import re
from typing import NamedTuple

log = logging.getLogger(__name__)

# The column names each role goes by, tried in this order when the role's column is null: embtune and
# FlagEmbedding (query/pos/neg), sentence-transformers (anchor/positive/negative, sentence1/sentence2/score,
# question/answer pairs), and the text1/text2 of scored-pair sets.
COLUMN_NAMES = {
    "query": ("query", "anchor", "question", "sentence1", "text1"),
    "positive": ("positive", "pos", "answer", "sentence2", "text2", "document"),
    "negative": ("negative", "neg", "negative_1"),
    "negatives": ("neg", "negatives", "negative"),
    "text1": ("sentence1", "text1", "query", "anchor"),
    "text2": ("sentence2", "text2", "positive", "pos"),
    "score": ("score", "label", "similarity"),
    "documents": ("documents", "docs", "passages"),
    "scores": ("scores", "labels"),
}
_NUMBERED_NEGATIVE = re.compile(r"negative_(\d+)$")  # sentence-transformers' (anchor, positive, negative_1..n)


# Fields read by the query tower (the query prompt, query_max_length): a retrieval query and an STS pair's
# first text. Every other text field is a document. The one place this rule is written.
QUERY_FIELDS = ("query", "text1")


# data_format.kind of the formats whose rows become Example (query, positive, negatives); what each kind
# trains is looked up in embtune.objectives.OBJECTIVES
EXAMPLE_KIND = "scores"


def tower(field: str) -> str:
    """``"query"`` for a query field (:data:`QUERY_FIELDS`), else ``"document"``: the ``kind`` the model
    tokenises and encodes a text column with."""
    return "query" if field in QUERY_FIELDS else "document"


class Example(NamedTuple):
    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    positive_score: float | None = None   # a teacher's score of (query, positive), for distillation
    negative_scores: tuple[float, ...] = ()  # a teacher's score of each negative, aligned with negatives


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
    if value is None:
        raise ValueError(f"{where}: field {col!r} must be {expected}, got NoneType (a JSON null or an empty "
                         "CSV/TSV cell)")
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


class _RowFormat:
    """The loop every format shares: rows -> examples one row at a time (``_row``), so that each bad row
    is raised or dropped on its own and every example knows the row it came from.

    ``roles`` names the attributes that hold one column each; ``_row`` reads the columns resolved for
    them (``self.columns``: role -> column, see :meth:`resolve_columns`).
    """

    roles: tuple[str, ...] = ()
    columns: dict = {}
    _logged: str | None = None  # the last columns line logged

    def resolve_columns(self, rows: list[dict]) -> dict:
        """Role -> column for these rows: the configured column, or for a null one the first name of
        :data:`COLUMN_NAMES` that some row has (and no other role took). Logs the mapping in one line, once while it stays
        the same.

        Raises:
            ValueError: a role with no column in any row (configured or recognised), naming the
                ``data_format.<role>=<column>`` override and the columns the rows have.
        """
        present = getattr(rows, "columns", None)  # a RowTable knows its columns; a list is looked through
        if present is None:
            present = list(dict.fromkeys(k for row in rows for k in row))
        columns: dict = {}
        for role in self.roles:
            col = getattr(self, role)
            if col is None:
                taken = set(columns.values())
                col = next((c for c in COLUMN_NAMES[role] if c in present and c not in taken), None)
                if col is None and role == "negatives":
                    numbered = sorted((int(m[1]), c) for c in present if (m := _NUMBERED_NEGATIVE.match(c)))
                    col = [c for _, c in numbered] or None
                if col is None:
                    raise ValueError(f"data_format={self.name}: no column for {role!r} among the data's columns "
                                     f"{present} (recognised: {', '.join(COLUMN_NAMES[role])}); name it with "
                                     f"data_format.{role}=<column>")
            elif col not in present:
                raise ValueError(f"data_format={self.name}: column {col!r} ({role}) is in no row; the data's "
                                 f"columns are {present}: name the right one with data_format.{role}=<column>")
            columns[role] = col
        used = {c for v in columns.values() for c in (v if isinstance(v, list) else [v])} | self._extra_columns()
        unread = [c for c in present if c not in used]
        line = (f"data_format={self.name} columns: "
                + ", ".join(f"{r} <- {'+'.join(c) if isinstance(c, list) else c}" for r, c in columns.items())
                + (f" (not read: {', '.join(unread)})" if unread else ""))
        if line != self._logged:  # the dev split resolves the rows, then the examples the rows kept: one line
            log.info("%s", line)
            self._logged = line
        return columns

    def _extra_columns(self) -> set:
        """Columns read besides the roles' (labels, teacher scores)."""
        return set()

    def convert(self, rows: list[dict], source: list[tuple[str, int]] = (), problems=None) -> tuple[list, list[int]]:
        """Returns ``(examples, origins)``: ``origins[j]`` is the index in ``rows`` of example j.

        Raises:
            ValueError: a role no row has (see :meth:`resolve_columns`), or the bad rows (``file:line: field
                ...``, with those ``problems`` collected while the file was read, in one error), unless
                ``problems`` allows dropping them.
        """
        self.prepare(rows)
        out, origins = [], []
        collect = problems is not None and problems.collect
        if problems is not None:
            problems.collect = True  # every bad row, then one error
        try:
            for example, i in self.iter_examples(rows, source, problems):
                out.append(example)
                origins.append(i)
        finally:
            if problems is not None:
                problems.collect = collect
        if problems is not None and not collect:  # with those met reading the file
            problems.raise_bad()
        return out, origins

    def prepare(self, rows) -> None:
        """Resolve the columns for ``rows`` (and reset what a format numbers per data set), before
        :meth:`iter_examples`."""
        if rows and self.roles:
            self.columns = self.resolve_columns(rows)

    def iter_examples(self, rows, source=(), problems=None):
        """``(example, row index)`` for each example of ``rows``, one row read at a time (after
        :meth:`prepare`); a bad row is raised or dropped as in :meth:`convert`."""
        for i, row in enumerate(rows):
            try:
                made = self._row(row, _where(source, i))
            except ValueError as e:
                if problems is None:
                    raise
                problems.bad_row(str(e))
                continue
            for example in made:
                yield example, i

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = (), problems=None) -> list:
        return self.convert(rows, source, problems)[0]


class Pairwise(_RowFormat):
    """``(query, positive)`` rows, or ``(query, document, label)`` rows when ``label`` is set.

    Without a label: one :class:`Example` per positive (a list of positives gives several), kind ``scores``.
    With a label (binary 0/1 or graded): one :class:`ScoredPair` per row, kind ``pair_scores``.

    Args:
        query, positive: column names, or None to recognise them (:data:`COLUMN_NAMES`).
        label: column name of the label, or None.
    """

    name = "pairwise"
    has_negatives = False
    roles = ("query", "positive")

    def __init__(self, query: str | None = None, positive: str | None = None, label: str | None = None):
        self.query, self.positive, self.label = query, positive, label
        self.kind = "scores" if label is None else "pair_scores"

    def _row(self, row: dict, where: str) -> list:
        c = self.columns
        q = _texts(row, c["query"], where, allow_list=False)[0]
        if self.label is None:
            return [Example(q, p) for p in _texts(row, c["positive"], where)]
        d = _texts(row, c["positive"], where, allow_list=False)[0]
        if self.label not in row:
            raise ValueError(f"{where}: missing field {self.label!r} (row has {sorted(row)})")
        return [ScoredPair(q, d, _number(row[self.label], self.label, where))]

    def _extra_columns(self) -> set:
        return {self.label}


def _scores(row: dict, col: str | None, n: int, what: str, where: str) -> list[float] | None:
    """Teacher scores from column ``col``: a list of n numbers (one per text of ``what``), or a number
    when n = 1; None when ``col`` is None (not configured)."""
    if col is None:
        return None
    value = row.get(col)
    if not isinstance(value, (list, tuple)):
        value = [value] if n == 1 and col in row else None
    if value is None or len(value) != n:
        raise ValueError(f"{where}: field {col!r} must be a list of {n} numbers (one per {what}), "
                         f"got {str(row.get(col, 'nothing'))[:80]!r}")
    return [_number(v, col, where) for v in value]


class Triplet(_RowFormat):
    """``(query, positive, negative)`` rows: one negative per example, kind ``scores``.

    Where a row holds lists (e.g. FlagEmbedding's ``{"query", "pos": [...], "neg": [...]}``), positive
    i is paired with negative i mod n, one example per positive. ``positive_scores`` and
    ``negative_scores`` name optional columns of teacher scores (FlagEmbedding's ``pos_scores`` /
    ``neg_scores``, one per text), read for distillation.
    """

    name = "triplet"
    kind = "scores"
    has_negatives = True
    roles = ("query", "positive", "negative")

    def __init__(self, query: str | None = None, positive: str | None = None, negative: str | None = None,
                 positive_scores: str | None = None, negative_scores: str | None = None):
        self.query, self.positive, self.negative = query, positive, negative
        self.positive_scores, self.negative_scores = positive_scores, negative_scores
        self.has_scores = positive_scores is not None and negative_scores is not None

    def _extra_columns(self) -> set:
        return {self.positive_scores, self.negative_scores}

    def _row(self, row: dict, where: str) -> list[Example]:
        c = self.columns
        q = _texts(row, c["query"], where, allow_list=False)[0]
        negs, pos = _texts(row, c["negative"], where), _texts(row, c["positive"], where)
        ps = _scores(row, self.positive_scores, len(pos), "positive", where)
        ns = _scores(row, self.negative_scores, len(negs), "negative", where)
        return [Example(q, p, (negs[j % len(negs)],), ps and ps[j], (ns[j % len(negs)],) if ns else ())
                for j, p in enumerate(pos)]


class MultiNegative(_RowFormat):
    """``(query, positive, [negative_1 … negative_n])`` rows, n varying by row, kind ``scores``.

    One :class:`Example` per positive, carrying all the row's negatives; ``negatives.group_size`` picks how
    many are used per step. A row with no negatives is allowed (it gets only in-batch negatives).
    ``positive_scores`` / ``negative_scores`` name optional columns of teacher scores, one per text
    (FlagEmbedding's ``pos_scores`` / ``neg_scores``), read for distillation.
    """

    name = "multi_negative"
    kind = "scores"
    has_negatives = True
    roles = ("query", "positive", "negatives")

    def __init__(self, query: str | None = None, positive: str | None = None, negatives: str | list[str] | None = None,
                 positive_scores: str | None = None, negative_scores: str | None = None):
        self.query, self.positive, self.negatives = query, positive, negatives
        self.positive_scores, self.negative_scores = positive_scores, negative_scores
        self.has_scores = positive_scores is not None and negative_scores is not None

    def _extra_columns(self) -> set:
        return {self.positive_scores, self.negative_scores}

    def _row(self, row: dict, where: str) -> list[Example]:
        c = self.columns
        q = _texts(row, c["query"], where, allow_list=False)[0]
        cols = c["negatives"] if isinstance(c["negatives"], list) else [c["negatives"]]
        negs = tuple(t for col in cols if not (col in row and row[col] is None)  # an empty cell: fewer negatives
                     for t in _texts(row, col, where, allow_empty_list=True))
        pos = _texts(row, c["positive"], where)
        ps = _scores(row, self.positive_scores, len(pos), "positive", where)
        ns = _scores(row, self.negative_scores, len(negs), "negative", where)
        return [Example(q, p, negs, ps and ps[j], tuple(ns or ())) for j, p in enumerate(pos)]


class Listwise(_RowFormat):
    """A query with a list of documents and their graded relevance or teacher scores, kind ``list_scores``.

    Raises ``ValueError`` when the two lists differ in length.
    """

    name = "listwise"
    kind = "list_scores"
    has_negatives = False
    roles = ("query", "documents", "scores")

    def __init__(self, query: str | None = None, documents: str | None = None, scores: str | None = None):
        self.query, self.documents, self.scores = query, documents, scores

    def _row(self, row: dict, where: str) -> list[RankedList]:
        c = self.columns
        q = _texts(row, c["query"], where, allow_list=False)[0]
        docs = _texts(row, c["documents"], where)
        scores = row.get(c["scores"])
        if not isinstance(scores, (list, tuple)) or len(scores) != len(docs):
            raise ValueError(f"{where}: field {c['scores']!r} must be a list of {len(docs)} numbers "
                             f"(one per document), got {str(scores)[:80]!r}")
        return [RankedList(q, tuple(docs), tuple(_number(s, c["scores"], where) for s in scores))]


class ScoredPairs(_RowFormat):
    """``(sentence1, sentence2, score)`` rows as in STS-B, kind ``pair_scores``.

    Args:
        text1, text2, score: column names, or None to recognise them (``sentence1``, ``sentence2``, ``score``, ...).
        score_scale: divide scores by this (e.g. 5 for STS-B's 0–5 scale), or None.
    """

    name = "scored_pairs"
    kind = "pair_scores"
    has_negatives = False
    roles = ("text1", "text2", "score")

    def __init__(self, text1: str | None = None, text2: str | None = None, score: str | None = None,
                 score_scale: float | None = None):
        self.text1, self.text2, self.score, self.score_scale = text1, text2, score, score_scale

    def _row(self, row: dict, where: str) -> list[ScoredPair]:
        c = self.columns
        if c["score"] not in row:
            raise ValueError(f"{where}: missing field {c['score']!r} (row has {sorted(row)})")
        s = _number(row[c["score"]], c["score"], where)
        return [ScoredPair(_texts(row, c["text1"], where, allow_list=False)[0],
                           _texts(row, c["text2"], where, allow_list=False)[0],
                           s / self.score_scale if self.score_scale else s)]


class Pointwise(_RowFormat):
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

    def prepare(self, rows) -> None:
        self._classes: dict[str, int] = {}  # labels numbered in order of first appearance, per data set

    def _row(self, row: dict, where: str) -> list[LabeledText]:
        if self.label not in row or isinstance(row[self.label], (list, dict)) or row[self.label] is None:
            raise ValueError(f"{where}: field {self.label!r} must be a class label (a string or an integer), "
                             f"got {str(row.get(self.label, 'nothing'))[:80]!r}")
        texts = [t for col in self.texts for t in _texts(row, col, where)]  # all fields checked before a class is made
        label = self._classes.setdefault(str(row[self.label]), len(self._classes))
        return [LabeledText(t, label) for t in texts]


class RawTexts(_RowFormat):
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

    def prepare(self, rows) -> None:
        self._seen: set[str] = set()  # a text seen in an earlier row is not repeated

    def _row(self, row: dict, where: str) -> list[Example]:
        texts = [t for col in self.columns if not (col in row and row[col] is None)  # empty cells, as blank texts
                 for t in _texts(row, col, where, allow_empty_list=True) if t.strip()]
        new = [t for t in dict.fromkeys(texts) if t not in self._seen]
        self._seen.update(new)
        return [Example(t, t) for t in new]
