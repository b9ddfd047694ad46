"""Arrow tables on disk: written a record batch at a time, read memory-mapped, so that a data set's rows,
texts and token ids never sit in Python objects all at once.

Files are Arrow IPC files (``pyarrow.ipc``; ``pyarrow.ipc.open_file`` and pandas/polars read them),
written to a temporary name and renamed, so parallel jobs of a sweep never read half a file. Reading:

- random access (a batch's rows) goes through a memory map: only the pages touched are read;
- full passes (:func:`iter_batches`) read one record batch at a time with ordinary reads, so a pass over
  a data set larger than memory leaves neither mapped pages nor copies behind.

Text identity is a 128-bit BLAKE2b digest of the UTF-8 text (:func:`text_key`): two distinct texts share
one with probability about n²/2¹²⁹ (n = 10⁸ texts: 10⁻²³), so equal keys are taken as equal texts
where only counting or grouping needs it; lookups of a text's row compare the text itself.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

BATCH_ROWS = 4096  # rows per record batch written: the unit of memory of a full pass


def text_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of ``text`` (its UTF-8 bytes): equal texts, equal keys, in every process."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def key_halves(keys: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """16-byte keys -> (high, low) uint64 arrays [N] (big-endian halves: sorting them sorts the keys)."""
    raw = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
    return raw[0::2].copy(), raw[1::2].copy()


class Writer:
    """Writes an Arrow IPC file batch by batch; the file appears (renamed) on :meth:`close`.

    Args:
        path: the final file name.
        schema: the columns.
    """

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema)
        self.rows = 0

    def write(self, columns: dict) -> None:
        """Append one record batch: column name -> a list or array of equal lengths."""
        batch = pa.record_batch([pa.array(columns[f.name], type=f.type) for f in self.schema], schema=self.schema)
        if batch.num_rows:
            self._writer.write_batch(batch)
            self.rows += batch.num_rows

    def close(self) -> Path:
        self._writer.close()
        self._sink.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def open_table(path: str | Path) -> pa.Table:
    """The table of an Arrow IPC file, memory-mapped (no copy: pages are read when touched), for random
    access (``MADV_RANDOM``: a touched row maps its own page, not the pages around it)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped))).read_all()


def read_table(path: str | Path) -> pa.Table:
    """The whole table of an Arrow IPC file, read into memory (for the small numeric tables: ids, sizes)."""
    with pa.OSFile(str(path), "rb") as f:
        return pa.ipc.open_file(f).read_all()


class BatchCache:
    """``cache[i]`` -> the text in row i of a one-string-column file, read a record batch at a time (not
    mapped) and kept for the ``keep`` most recently used batches: an access order that moves forward
    through a few places at once (as :func:`lexicographic`'s) reads each batch about once.

    Args:
        path: the Arrow IPC file.
        starts: the first row of each record batch, and the number of rows at the end.
    """

    def __init__(self, path: str | Path, starts: np.ndarray, keep: int = 8):
        self._file = pa.OSFile(str(path), "rb")
        self._reader = pa.ipc.open_file(self._file)
        self._starts, self.keep = starts, keep
        self._cache: OrderedDict[int, pa.Array] = OrderedDict()

    def __getitem__(self, i: int) -> str:
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        texts = self._cache.get(b)
        if texts is None:
            texts = self._cache[b] = self._reader.get_batch(b).column(0)
            if len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(b)
        return texts[i - int(self._starts[b])].as_py()

    def close(self) -> None:
        self._cache.clear()
        self._file.close()


def lexicographic(n: int) -> Iterator[int]:
    """0..n−1 in the order their decimal strings sort (0, 1, 10, 100, ..., 11, ...), without sorting."""
    if n > 0:
        yield 0
    stack = list(range(min(9, n - 1), 0, -1))
    while stack:
        x = stack.pop()
        yield x
        stack.extend(c for c in range(min(x * 10 + 9, n - 1), x * 10 - 1, -1) if c >= x * 10)


def iter_batches(path: str | Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file in order, each read (not mapped) and dropped after use."""
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield batch.select(columns) if columns else batch


class StringColumn:
    """Random access to a (large) string column of a memory-mapped table: ``col[i]`` -> str, without
    converting the column to Python objects."""

    def __init__(self, column: pa.ChunkedArray):
        self._chunks = [c.cast(pa.large_string()) if c.type != pa.large_string() else c for c in column.chunks]
        self._starts = self.starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self._offsets = [np.frombuffer(c.buffers()[1], dtype=np.int64)[c.offset:c.offset + len(c) + 1]
                         for c in self._chunks]
        self._data = [c.buffers()[2] for c in self._chunks]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[c])
        lo, hi = int(self._offsets[c][j]), int(self._offsets[c][j + 1])
        data = self._data[c]
        return data[lo:hi].to_pybytes().decode("utf-8") if data is not None else ""


class ListColumn:
    """Random access to a list column of numbers: ``col[i]`` -> numpy array [n_i] (a view into the map),
    or None for a null entry."""

    def __init__(self, column: pa.ChunkedArray):
        self._chunks = list(column.chunks)
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self._offsets = [c.offsets.to_numpy() for c in self._chunks]
        self._values = [c.values.to_numpy(zero_copy_only=True) if len(c.values) else np.zeros(0, dtype=np.int32)
                        for c in self._chunks]
        self._valid = [c.is_valid().to_numpy(zero_copy_only=False) if c.null_count else None for c in self._chunks]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray | None:
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[c])
        if self._valid[c] is not None and not self._valid[c][j]:
            return None
        return self._values[c][int(self._offsets[c][j]):int(self._offsets[c][j + 1])]


def numbers(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """A numeric column as one numpy array (a copy, nulls as NaN for floats)."""
    if column.num_chunks == 1 and column.null_count == 0:
        return column.chunk(0).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return column.to_numpy().astype(dtype, copy=False)


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON, atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable (a cache entry to build again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def digest(*parts) -> str:
    """sha256 hex digest of the parts' JSON: a cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
