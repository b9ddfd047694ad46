"""Data formats: map a loader's rows to training examples ``(query, positive, negatives)``.

Column names are configurable. A missing or wrong-typed column raises a ``ValueError`` naming the
file, the row and the field.
"""

from __future__ import annotations

from typing import NamedTuple


class Example(NamedTuple):
    query: str
    positive: str
    negatives: tuple[str, ...] = ()


def _where(source: list[tuple[str, int]], i: int) -> str:
    if i < len(source):
        file, line = source[i]
        return f"{file}, row {line}"
    return f"row {i + 1}"


def _texts(row: dict, col: str, where: str, allow_list: bool = True) -> list[str]:
    """A column's value as a non-empty list of strings (a string or, where allowed, a list of them)."""
    if col not in row:
        raise ValueError(f"{where}: missing field {col!r} (row has {sorted(row)})")
    value = row[col]
    if isinstance(value, str):
        return [value]
    if allow_list and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    expected = "a string or a non-empty list of strings" if allow_list else "a string"
    raise ValueError(f"{where}: field {col!r} must be {expected}, got {type(value).__name__}: {str(value)[:80]!r}")


class Pairwise:
    """``(query, positive)`` rows. A list of positives gives one example per positive.

    Args:
        query, positive: column names.
    """

    name = "pairwise"
    has_negatives = False

    def __init__(self, query: str = "query", positive: str = "positive"):
        self.query, self.positive = query, positive

    def __call__(self, rows: list[dict], source: list[tuple[str, int]] = ()) -> list[Example]:
        out, source = [], list(source)
        for i, row in enumerate(rows):
            where = _where(source, i)
            q = _texts(row, self.query, where, allow_list=False)[0]
            out.extend(Example(q, p) for p in _texts(row, self.positive, where))
        return out


class Triplet:
    """``(query, positive, negative)`` rows: one negative per example.

    Where a row holds lists (e.g. FlagEmbedding's ``{"query", "pos": [...], "neg": [...]}``), positive
    i is paired with negative i mod n, one example per positive.

    Args:
        query, positive, negative: column names.
    """

    name = "triplet"
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
