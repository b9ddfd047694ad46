"""Training examples kept on disk: every distinct text once in a text table, the examples as text ids.

A folder ``$EMBTUNE_CACHE/examples/<key>/`` (the key: the data's fingerprint, the data format's settings
and the objective, :func:`embtune.data.checks.make_examples`) holds

- ``texts.arrow``: column ``text``, the distinct texts; a text's id is its row (first appearance order);
- ``ids.arrow``: ``towers`` by id (bit 1: a query-tower field holds the text, bit 2: a document-tower
  field), and the texts' 128-bit BLAKE2b keys (:func:`embtune.data.tables.text_key`) in key order,
  ``sorted_hi``/``sorted_lo``, with ``sorted_id``, to find a text's id by binary search;
- ``examples.arrow``: one row per example, one column per field of its kind (:class:`~embtune.data.formats.
  Example`, ``ScoredPair``, ``RankedList``, ``LabeledText``): a text as its id (int64), a tuple of texts as
  a list of ids, numbers as float64 / int64 (an absent score as null), and ``origin``, the row it came from;
- ``meta.json``: the kind, the fields, the counts and the problems the conversion met.

:class:`ExampleTable` reads it back as a sequence of the same named tuples the data format made, memory-
mapped: a batch reads its own rows and texts, nothing else. :class:`TextMap` is a mapping ``"d0".."dN"``
-> text over a text table (a dev split's candidates).
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embtune.data.formats import Example, LabeledText, RankedList, ScoredPair, tower
from embtune.data.tables import (
    BATCH_ROWS,
    BatchCache,
    ListColumn,
    StringColumn,
    Writer,
    iter_batches,
    key_halves,
    lexicographic,
    numbers,
    open_table,
    read_json,
    read_table,
    text_key,
    write_json,
)

VERSION = 1  # bump when the layout changes: old folders are then built again
KINDS = {c.__name__: c for c in (Example, ScoredPair, RankedList, LabeledText)}
# a field's annotation -> how it is stored
_STORED = {"str": "text", "tuple[str, ...]": "texts", "float": "float", "float | None": "float",
           "tuple[float, ...]": "floats", "int": "int"}
QUERY, DOCUMENT = 1, 2  # tower bits


def fields_of(cls) -> list[tuple[str, str]]:
    """``(field, stored as)`` of a named tuple of :mod:`embtune.data.formats`."""
    return [(name, _STORED[_annotation(cls, name)]) for name in cls._fields]


def _annotation(cls, name: str) -> str:
    a = cls.__annotations__[name]
    return getattr(a, "__forward_arg__", a if isinstance(a, str) else str(a))


class TextTable:
    """The distinct texts of a folder (see the module docstring): ``table[id]`` -> text, :meth:`find`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._texts = StringColumn(open_table(self.folder / "texts.arrow").column("text"))
        self.starts = self._texts.starts
        ids = read_table(self.folder / "ids.arrow")
        self.towers = numbers(ids.column("towers"), np.uint8)
        self._sorted = [numbers(ids.column(c), t) for c, t in
                        (("sorted_hi", np.uint64), ("sorted_lo", np.uint64), ("sorted_id", np.int64))]

    @property
    def key(self) -> str:
        """The folder's name: a digest of what the texts were made from."""
        return self.folder.name

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, i: int) -> str:
        return self._texts[int(i)]

    def find(self, text: str) -> int | None:
        """The id of ``text``, or None when the table does not hold it."""
        hi, lo = key_halves([text_key(text)])
        s_hi, s_lo, s_id = self._sorted
        a, b = np.searchsorted(s_hi, hi[0], "left"), np.searchsorted(s_hi, hi[0], "right")
        for j in range(a, b):  # one, unless two keys share their high half
            if s_lo[j] == lo[0] and self[s_id[j]] == text:
                return int(s_id[j])
        return None

    def ids_of(self, other: TextTable) -> np.ndarray:
        """The id here of each text of ``other``, by 128-bit key (:func:`~embtune.data.tables.text_key`: equal
        keys taken as equal texts, as for counting), or -1 where this table holds no such text: int64
        [len(other)], in ``other``'s id order. One binary search per key over the sorted keys (no text read)."""
        s_hi, s_lo, s_id = self._sorted
        o_hi, o_lo, o_id = other._sorted
        out = np.full(len(other), -1, dtype=np.int64)
        if not len(s_hi) or not len(o_hi):
            return out
        keys = np.empty(len(s_hi), dtype=[("hi", np.uint64), ("lo", np.uint64)])  # sorted as (hi, lo) pairs
        keys["hi"], keys["lo"] = s_hi, s_lo
        wanted = np.empty(len(o_hi), dtype=keys.dtype)
        wanted["hi"], wanted["lo"] = o_hi, o_lo
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        hit = keys[at] == wanted
        out[o_id[hit]] = s_id[at[hit]]
        return out

    def batches(self, towers: int = QUERY | DOCUMENT) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """``(first id, mask, texts)`` a record batch at a time (read, not mapped: a full pass leaves
        nothing behind): ``mask`` [n] marks the batch's texts that a field of ``towers`` holds, ``texts``
        are those texts, in id order."""
        start = 0
        for batch in iter_batches(self.folder / "texts.arrow"):
            n = batch.num_rows
            mask = (self.towers[start:start + n] & towers) > 0
            col = batch.column(0)
            yield start, mask, [col[int(j)].as_py() for j in np.flatnonzero(mask)]
            start += n


class TextMap(Mapping):
    """``f"{prefix}{id}"`` -> text over a :class:`TextTable`: a dict-like corpus that stays on disk."""

    def __init__(self, texts: TextTable, prefix: str = "d"):
        self.texts, self.prefix = texts, prefix

    def _id(self, key) -> int | None:
        if not isinstance(key, str) or not key.startswith(self.prefix):
            return None
        digits = key[len(self.prefix):]
        if not digits.isdigit() or (digits != "0" and digits.startswith("0")) or not digits.isascii():
            return None
        i = int(digits)
        return i if i < len(self.texts) else None

    def __getitem__(self, key: str) -> str:
        i = self._id(key)
        if i is None:
            raise KeyError(key)
        return self.texts[i]

    def __contains__(self, key) -> bool:
        return self._id(key) is not None

    def __iter__(self) -> Iterator[str]:
        return (f"{self.prefix}{i}" for i in range(len(self.texts)))

    def __len__(self) -> int:
        return len(self.texts)

    def sorted_items(self) -> Iterator[tuple[str, str]]:
        """``(key, text)`` in sorted key order (as ``sorted(mapping)``), reading the texts a record batch at a
        time instead of through the map, so a full pass (the fingerprint's) leaves no mapped pages behind."""
        cache = BatchCache(self.texts.folder / "texts.arrow", self.texts.starts)
        try:
            for i in lexicographic(len(self.texts)):
                yield f"{self.prefix}{i}", cache[i]
        finally:
            cache.close()


class TextWriter:
    """Builds a :class:`TextTable` in ``folder`` from texts added one at a time, duplicates included.

    :meth:`add` logs each occurrence (its text to a scratch Arrow file, its 16-byte key to a byte array)
    and returns the occurrence's number; :meth:`close` numbers the distinct keys by first occurrence
    (one sort), writes each distinct text once, in that order, and keeps ``ids`` [occurrences], the id of
    each occurrence. No Python object per text is held: 17 bytes per occurrence while building.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._scratch = Writer(self.folder / f"occurrences.{os.getpid()}.arrow", pa.schema([("text", pa.large_string())]))
        self._keys = bytearray()
        self._towers = bytearray()
        self._pending: list[str] = []
        self.ids: np.ndarray | None = None
        self.occurrences = 0

    def add(self, text: str, towers: int = QUERY | DOCUMENT) -> int:
        self._keys += text_key(text)
        self._towers.append(towers)
        self._pending.append(text)
        if len(self._pending) == BATCH_ROWS:
            self._scratch.write({"text": self._pending})
            self._pending = []
        self.occurrences += 1
        return self.occurrences - 1

    def close(self) -> TextTable:
        self._scratch.write({"text": self._pending})
        scratch = self._scratch.close()
        keys = np.frombuffer(bytes(self._keys), dtype=">u8").astype(np.uint64).reshape(-1, 2)
        self._keys = bytearray()
        hi, lo = keys[:, 0].copy(), keys[:, 1].copy()
        del keys
        order = np.lexsort((lo, hi))  # stable: within a key, occurrences in order, the first one first
        new = np.ones(len(order), dtype=bool)
        new[1:] = (hi[order][1:] != hi[order][:-1]) | (lo[order][1:] != lo[order][:-1])
        group = np.cumsum(new) - 1  # the distinct key of each sorted occurrence, in key order
        first = order[new]  # first occurrence of each distinct key, in key order
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # id = rank of the first occurrence
        self.ids = np.empty(len(order), dtype=np.int64)
        self.ids[order] = rank[group]
        del group, order, new
        towers = np.zeros(len(first), dtype=np.uint8)
        np.bitwise_or.at(towers, self.ids, np.frombuffer(bytes(self._towers), dtype=np.uint8))
        self._towers = bytearray()
        is_first = np.zeros(len(self.ids), dtype=bool)
        is_first[first] = True
        texts = Writer(self.folder / "texts.arrow", pa.schema([("text", pa.large_string())]))
        start = 0
        for batch in iter_batches(scratch):
            n = batch.num_rows
            keep = np.flatnonzero(is_first[start:start + n])
            if len(keep):
                texts.write({"text": batch.column(0).take(pa.array(keep))})
            start += n
        texts.close()
        scratch.unlink()
        w = Writer(self.folder / "ids.arrow", pa.schema([("towers", pa.uint8()), ("sorted_hi", pa.uint64()),
                                                           ("sorted_lo", pa.uint64()), ("sorted_id", pa.int64())]))
        w.write({"towers": towers, "sorted_hi": hi[first], "sorted_lo": lo[first], "sorted_id": rank})
        w.close()
        return TextTable(self.folder)

    def abort(self) -> None:
        self._scratch.abort()


class ExampleTable(Sequence):
    """The examples of a folder (see the module docstring), read back as named tuples.

    Attributes:
        texts: the :class:`TextTable` the text ids point into.
        meta: ``meta.json`` (kind, fields, counts, problems met).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.cls = KINDS[self.meta["kind"]]
        self.fields = [tuple(f) for f in self.meta["fields"]]
        self.texts = TextTable(self.folder)
        table = read_table(self.folder / "examples.arrow")  # ids and numbers: a few bytes an example
        self._columns = {}
        for name, stored in self.fields:
            col = table.column(name)
            if stored in ("texts", "floats"):
                self._columns[name] = ListColumn(col)
            else:
                self._columns[name] = numbers(col, {"text": np.int64, "int": np.int64, "float": np.float64}[stored])
        self._origin = numbers(table.column("origin"), np.int64)
        self._optional = {name for name, _ in self.fields if _annotation(self.cls, name).endswith("| None")}

    @property
    def key(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return len(self._origin)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        i = int(i) % n
        values = []
        for name, stored in self.fields:
            v = self._columns[name][i]
            if stored == "text":
                values.append(self.texts[v])
            elif stored == "texts":
                values.append(tuple(self.texts[j] for j in v.tolist()))
            elif stored == "floats":
                values.append(tuple(v.tolist()))
            elif stored == "int":
                values.append(int(v))
            else:
                values.append(None if name in self._optional and np.isnan(v) else float(v))
        return self.cls(*values)

    def ids(self, field: str) -> np.ndarray:
        """The text id of each example's ``field`` (a text field), int64 [N]."""
        return self._columns[field]

    def origins(self) -> list[int] | None:
        """Each example's row index in the data (None: examples that are not one row each)."""
        return self._origin if self.meta["origins"] else None


class ExampleWriter:
    """Builds an :class:`ExampleTable` in ``folder`` from examples added one at a time (their kind is that
    of the first). Holds a few bytes per example and per text (see :class:`TextWriter`)."""

    def __init__(self, folder: str | Path):
        self.final = Path(folder)  # built beside it, then renamed: processes building the same never mix files
        self.folder = self.final.with_name(f"{self.final.name}.{os.getpid()}.tmp")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.texts = TextWriter(self.folder)
        self.cls = self.fields = None
        self._cols: dict[str, array] = {}
        self._lengths: dict[str, array] = {}
        self._origin = array("q")
        self.origins = True  # each example is one row's (False: the objective merged rows)

    def add(self, example, origin: int | None) -> None:
        if self.cls is None:
            self.cls, self.fields = type(example), fields_of(type(example))
            for name, stored in self.fields:
                self._cols[name] = array("q" if stored in ("text", "texts", "int") else "d")
                if stored in ("texts", "floats"):
                    self._lengths[name] = array("q")
        for (name, stored), v in zip(self.fields, example):
            col = self._cols[name]
            if stored == "text":
                col.append(self.texts.add(v, QUERY if tower(name) == "query" else DOCUMENT))
            elif stored == "texts":
                col.extend(self.texts.add(t, DOCUMENT) for t in v)
                self._lengths[name].append(len(v))
            elif stored == "floats":
                col.extend(v)
                self._lengths[name].append(len(v))
            else:
                col.append(np.nan if v is None else v)
        self._origin.append(-1 if origin is None else origin)

    def close(self, meta: dict) -> ExampleTable:
        self.texts.close()
        columns, schema = {}, []
        for name, stored in self.fields:
            values = np.frombuffer(self._cols[name], dtype=np.int64 if self._cols[name].typecode == "q" else np.float64)
            if stored in ("text", "texts"):  # occurrence numbers -> text ids
                values = self.texts.ids[values]
            if stored in ("texts", "floats"):
                offsets = np.concatenate([[0], np.cumsum(np.frombuffer(self._lengths[name], dtype=np.int64))])
                columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
            elif stored == "float":
                columns[name] = pa.array(values, mask=np.isnan(values))
            else:
                columns[name] = pa.array(values)
            schema.append((name, columns[name].type))
        columns["origin"] = pa.array(np.frombuffer(self._origin, dtype=np.int64))
        schema.append(("origin", pa.int64()))
        w = Writer(self.folder / "examples.arrow", pa.schema(schema))
        w.write(columns)
        w.close()
        write_json(self.folder / "meta.json", {"version": VERSION, "kind": self.cls.__name__,
                                               "fields": self.fields, "examples": len(self._origin), **meta})
        if cached_examples(self.final) is None:  # an unreadable or older entry (or none): ours replaces it
            shutil.rmtree(self.final, ignore_errors=True)
        try:
            os.rename(self.folder, self.final)
        except OSError:  # another process put its (equal) folder there first
            shutil.rmtree(self.folder, ignore_errors=True)
        return ExampleTable(self.final)

    def abort(self) -> None:
        self.texts.abort()
        shutil.rmtree(self.folder, ignore_errors=True)


def cached_examples(folder: Path) -> ExampleTable | None:
    """The examples built before in ``folder``, or None."""
    meta = read_json(folder / "meta.json")
    if meta is None or meta.get("version") != VERSION:
        return None
    try:
        return ExampleTable(folder)
    except (OSError, pa.ArrowException, KeyError, ValueError):  # a broken entry only costs time: build again
        return None
