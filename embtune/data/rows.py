"""A loader's rows in an Arrow file, read back as dicts one at a time, and cached by the file's content.

A :class:`RowTable` is a sequence of row dicts like the list a loader used to return (``len``, ``rows[i]``,
iteration, ``==`` with a list), stored in ``$EMBTUNE_CACHE/rows/<key>/rows.arrow``: column ``row`` holds each
row's JSON (its keys in the file's order), column ``line`` its line (or row number) for messages. A full
pass reads one record batch at a time; ``rows[i]`` reads one row through the memory map.

The key is the sha256 of the training file's bytes (every file of a folder) and of the loader's options
that change the rows, so an edited file is read again and an unchanged one is not parsed at all: the
second run of a sweep opens the table, its fingerprint and the problems the first read met
(``meta.json``). Building streams: one record batch of rows in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embtune.data.cache import cache_dir
from embtune.data.tables import BATCH_ROWS, Writer, digest, iter_batches, numbers, open_table, read_json, write_json

log = logging.getLogger(__name__)

VERSION = 2  # 2: an empty CSV/TSV cell is null. Bump when the layout changes: old tables are then built again
_SCHEMA = pa.schema([("row", pa.large_string()), ("line", pa.int64())])


class RowTable(Sequence):
    """Rows (dicts) stored in an Arrow file; see the module docstring.

    Args:
        path: the ``rows.arrow`` file.
        where: the name messages give the rows' file (``path`` or ``path[split]``).
        columns: the column names of the rows, in order of first appearance.
        index: the rows kept, ascending indices into the file's rows (None: all).
    """

    def __init__(self, path: str | Path, where: str, columns: list[str], index: np.ndarray | None = None):
        self.path, self.where, self.columns = Path(path), where, list(columns)
        self._table = open_table(self.path)
        self._lines = numbers(self._table.column("line"), np.int64)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self._rows = None  # the JSON column, opened on first random access

    def __len__(self) -> int:
        return len(self._lines) if self.index is None else len(self.index)

    def _file_row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        i %= n
        return i if self.index is None else int(self.index[i])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._rows is None:
            from embtune.data.tables import StringColumn

            self._rows = StringColumn(self._table.column("row"))
        return json.loads(self._rows[self._file_row(i)])

    def __iter__(self) -> Iterator[dict]:
        start = 0
        for batch in iter_batches(self.path, ["row"]):
            n = batch.num_rows
            if self.index is None:
                texts = batch.column(0).to_pylist()
            else:
                lo, hi = np.searchsorted(self.index, [start, start + n])
                texts = batch.column(0).take(pa.array(self.index[lo:hi] - start)).to_pylist()
            for text in texts:
                yield json.loads(text)
            start += n

    def __eq__(self, other) -> bool:
        if isinstance(other, (RowTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def lines(self) -> np.ndarray:
        """The line (or row number) of each row, int64 [N]."""
        return self._lines if self.index is None else self._lines[self.index]

    def subset(self, keep: Sequence[int]) -> RowTable:
        """The rows at ``keep`` (ascending positions in this table), sharing the file."""
        keep = np.asarray(keep, dtype=np.int64)
        index = keep if self.index is None else self.index[keep]
        return RowTable(self.path, self.where, self.columns, index)

    @property
    def source(self) -> SourceLines:
        """``(file, line)`` of each row, for messages."""
        return SourceLines(self.where, self.lines())


class SourceLines(Sequence):
    """``(file, line)`` per row without a tuple per row: ``source[i]`` -> ``(where, line)``."""

    def __init__(self, where: str, lines: np.ndarray):
        self.where, self._lines = where, lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.where, int(self._lines[i])

    def __eq__(self, other) -> bool:
        if isinstance(other, (SourceLines, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def subset(self, keep: Sequence[int]) -> SourceLines:
        return SourceLines(self.where, self._lines[np.asarray(keep, dtype=np.int64)])


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of every file under a folder (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" if path.is_dir() else b"")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def rows_key(kind: str, files: Iterable[Path], **options) -> str:
    """The cache key of a loader's rows: its kind, the content of its files and its options."""
    return digest(VERSION, kind, [content_hash(Path(f)) for f in files], options)


def cached(key: str) -> tuple[RowTable, dict] | None:
    """The rows and ``meta`` built before under ``key``, or None."""
    folder = cache_dir() / "rows" / key
    meta = read_json(folder / "meta.json")
    if meta is None or meta.get("version") != VERSION or not (folder / "rows.arrow").is_file():
        return None
    try:
        return RowTable(folder / "rows.arrow", meta["where"], meta["columns"]), meta
    except (OSError, pa.ArrowException, KeyError) as e:  # a broken entry only costs time: build again
        log.warning("unreadable rows cache %s (%s); reading the data again", folder, e)
        return None


def build(key: str | None, where: str, rows: Iterable[tuple[int, dict]]) -> tuple[RowTable, hashlib._Hash]:
    """Write ``(line, row)`` pairs to a new table (in ``$EMBTUNE_CACHE/rows/<key>``; a fresh temporary
    folder when ``key`` is None), one record batch at a time.

    Returns:
        The table and the sha256 object fed each row's canonical JSON (sorted keys) and a newline, as
        :func:`embtune.data.dataset.fingerprint` defines it: the caller adds the test set.
    """
    folder = cache_dir() / "rows" / (key or f"tmp-{np.random.default_rng().integers(1 << 62):x}")
    folder.mkdir(parents=True, exist_ok=True)
    writer = Writer(folder / "rows.arrow", _SCHEMA)
    h, columns, texts, lines = hashlib.sha256(), {}, [], []
    try:
        for line, row in rows:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
            columns.update(dict.fromkeys(row))
            texts.append(json.dumps(row, ensure_ascii=False))
            lines.append(line)
            if len(texts) == BATCH_ROWS:
                writer.write({"row": texts, "line": lines})
                texts, lines = [], []
        writer.write({"row": texts, "line": lines})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return RowTable(folder / "rows.arrow", where, list(columns)), h


def save_meta(table: RowTable, key: str, fingerprint: str, test_digest: str, problems: dict) -> None:
    """Record what a later run needs to skip the read: the table's name and columns, the fingerprint
    (valid while the test set's canonical JSON has sha256 ``test_digest``) and the problems met
    (:meth:`~embtune.data.checks.DataProblems.record`)."""
    write_json(cache_dir() / "rows" / key / "meta.json", {
        "version": VERSION, "where": table.where, "columns": table.columns, "rows": len(table),
        "fingerprint": fingerprint, "test_digest": test_digest, "problems": problems})


def sampled(table: RowTable, keep: set[int], key: str | None) -> tuple[RowTable, hashlib._Hash]:
    """A new table (under ``key``) of the rows of ``table`` at ``keep``, in file order, and its rows'
    sha256 object (see :func:`build`); ``table`` itself is discarded."""
    index = np.array(sorted(keep), dtype=np.int64)
    try:
        return build(key, table.where, zip(table.lines()[index].tolist(), table.subset(index)))
    finally:
        discard(table)


def discard(table: RowTable) -> None:
    """Remove a table's folder (a temporary one, or a cache entry that is not wanted)."""
    shutil.rmtree(table.path.parent, ignore_errors=True)
