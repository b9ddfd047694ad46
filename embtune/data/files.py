"""Training rows from a local file (JSON Lines, JSON, CSV, TSV, Parquet, Arrow), a ``save_to_disk`` folder or
a ``datasets`` data set.

Rows are kept as they are, one dict of columns each (for instance FlagEmbedding's
``{"query", "pos": [...], "neg": [...]}``); the ``data_format`` decides which columns to read. Evaluation,
when wanted, comes from a BEIR folder (``test_path``) read by :mod:`embtune.data.beir`.

Text files (JSON Lines, JSON, CSV, TSV) are read here line by line rather than by ``datasets``' builders,
so that every error names ``file:line`` and CSV cells stay strings; the binary forms (Parquet, Arrow,
``save_to_disk`` folders) are read by ``datasets``, their rows numbered from 1.

Rows are streamed into a :class:`~embtune.data.rows.RowTable` (an Arrow file in ``$EMBTUNE_CACHE/rows``),
checked once as they are read; a later run on the same file bytes and options opens that table instead of
reading the file (see :mod:`embtune.data.rows`). A ``.json`` list is parsed whole (JSON has no line to
stop at); every other form is read a batch of rows at a time.
"""

from __future__ import annotations

import atexit
import csv
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from embtune.data import rows as row_tables
from embtune.data.beir import check_sample_size, load_beir_test, read_json_objects, read_lines, subsample
from embtune.data.checks import DataProblems
from embtune.data.dataset import DevSplit, RetrievalSet, TrainingData, feed_test, fingerprint, held_out_digest
from embtune.data.streaming import StreamedData, file_identity, open_stream
from embtune.data.tables import BATCH_ROWS

log = logging.getLogger(__name__)

_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv")
_BINARY = (".parquet", ".arrow")  # read by datasets
_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                ".arrow": "arrow"}


def load_jsonl(
    path: str,
    split: str = "train",
    test_path: str | None = None,
    test_split: str = "test",
    max_train_pairs: int | None = None,
    seed: int = 0,
    drop_bad_rows: bool = False,
    dev_queries: int | None = None,
    dev_ratio: float = 0.1,
    streaming: bool = False,
    shuffle_buffer: int | None = None,
) -> TrainingData | StreamedData:
    """Load training rows from a local file, chosen by suffix, or a ``save_to_disk`` folder.

    - ``.jsonl`` (or ``.jsonl.gz``): one JSON object a line; blank lines are skipped.
    - ``.json``: a JSON list of objects (a ``.json`` file holding JSON Lines is read as ``.jsonl``).
    - ``.csv`` / ``.tsv``: a header row naming the columns, then one row a line. Values stay strings
      (no type inference: ``"5.000"`` is not turned into a float); an empty cell is None, a missing value
      (a required text left empty is a bad row, as a JSON null is). TSV is split on TAB with
      ``csv.QUOTE_NONE``: a quote is an ordinary character, because real TSV text (STS-B, BEIR qrels)
      contains unbalanced quotes. A TSV whose rows only split right with double-quote quoting (as
      pandas and ``csv`` write fields holding a TAB or a newline) is read with that quoting instead.
      CSV uses the standard double-quote quoting, so quoted fields may hold commas and newlines.
    - Every text file is decoded line by line as UTF-8 (a BOM is dropped): a byte that is not UTF-8 is
      reported with its line.
    - ``.parquet`` / ``.arrow`` (Arrow stream or file, as ``datasets`` writes), or a folder written by
      ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks the DatasetDict's split):
      read with ``datasets``; rows are numbered from 1 in messages.

    Args:
        path: the training file or ``save_to_disk`` folder.
        split: the split of a ``DatasetDict`` folder (ignored for a file or a ``Dataset`` folder).
        test_path: a BEIR folder or hub name to evaluate on, or None for no evaluation.
        test_split: the qrels split of ``test_path`` to read (``qrels/{test_split}.tsv``).
        max_train_pairs: keep at most this many rows (deterministic sample, file order kept), None for all.
        seed: seed of that sample.
        drop_bad_rows: drop a bad row (not UTF-8, bad JSON, wrong field count) with a warning instead of
            failing; the data format drops rows with missing or wrong-typed fields under the same switch.
        dev_queries, dev_ratio: without ``test_path``, the dev split to hold out of the rows (by query,
            seeded by ``seed``; see :class:`embtune.data.dataset.DevSplit`; 0: none). It is made once the
            data format names the query and positive columns, in the training recipe.
        streaming: read the rows as training goes instead of into the cache (:mod:`embtune.data.streaming`).
        shuffle_buffer: with ``streaming``, the rows of the shuffle buffer (None: 10000); refused without it.

    Returns:
        TrainingData with the rows as dicts, ``source`` = ``(path, line number)`` per row (the element
        number, from 1, for a ``.json`` list), and ``test`` from ``test_path`` or None; with ``streaming``, a
        :class:`~embtune.data.streaming.StreamedData` (its first rows read and checked, the rest not yet).

    Raises:
        FileNotFoundError: ``path`` (or the ``test_path`` test split) does not exist.
        ValueError: unsupported suffix, a folder that is not a ``save_to_disk`` folder (a BEIR folder is named
            as one: ``data=beir``), a DatasetDict without ``split``, a file with no rows, a bad CSV/TSV header,
            and (unless
            ``drop_bad_rows``) a line that is not UTF-8, bad JSON or not an object, or a CSV/TSV row with
            the wrong number of fields, each naming ``file:line``. With ``streaming``: ``max_train_pairs`` or
            ``dev_queries`` > 0 (both need every row up front), or a bad ``shuffle_buffer``. Before any file is
            read: a ``max_train_pairs`` that is not an integer >= 0, a ``shuffle_buffer`` without ``streaming``.
    """
    check_sample_size(max_train_pairs, "data.max_train_pairs")
    shuffle_buffer = _shuffle_buffer(shuffle_buffer, streaming)
    dev = _dev_split(test_path, dev_queries, dev_ratio, seed)
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such training file")
    problems = DataProblems(drop_bad_rows)
    if streaming:
        _check_streaming(max_train_pairs, dev_queries)
        if file.is_dir() or file.name.lower().endswith(_BINARY):
            where = read_with_datasets(file, split)[1]  # checks the folder now; each pass opens it again
            def open_rows(p):
                return read_with_datasets(file, split)[0]
        else:
            iter_rows(file, problems)  # an unsupported suffix is refused now
            where = str(file)
            def open_rows(p):
                return iter_rows(file, p)
        return open_stream(str(path), where, open_rows, problems, _test_set(test_path, test_split, problems),
                           shuffle_buffer, ["jsonl", file_identity([file]), split], f"{path}: no rows")
    if file.is_dir() or file.name.lower().endswith(_BINARY):
        rows, where = read_with_datasets(file, split)
        empty = f"{path}: no rows"
    else:
        rows, where, empty = iter_rows(file, problems), str(file), f"{path}: empty training file (no rows)"
    return _stored(("jsonl", [file], where), rows, empty, max_train_pairs, seed, problems,
                   lambda: _test_set(test_path, test_split, problems), str(path), dev)


def _stored(what: tuple, rows: Iterator[tuple[int, dict]], empty: str, k: int | None, seed: int,
            problems: DataProblems, test: Callable[[], RetrievalSet | None], name: str, dev: DevSplit | None,
            **options) -> TrainingData:
    """TrainingData over a :class:`~embtune.data.rows.RowTable` of ``rows`` (``(line, row)`` pairs, read only
    when the table is not cached), sampled to ``k`` rows, with the test set ``test()``.

    ``what`` = ``(kind, files, where)``: the files whose bytes key the cache (empty: no cache) and the
    name messages give the rows. Raises ValueError ``empty`` when no row is left.

    The file's bad rows (and the test set's) are collected in ``problems`` rather than raised at the first,
    and raised together once the file is read; the data format's convert (or
    :func:`~embtune.data.checks.make_examples`) then raises its own bad rows (a missing field) the same way."""
    problems.collect = True
    try:
        data = _store(what, rows, empty, k, seed, problems, test, name, dev, **options)
    finally:
        problems.collect = False  # a bad row met from now on raises, with those collected
    problems.raise_bad()  # the file's own bad rows (bad JSON, field counts), every one in one error
    return data


def _store(what, rows, empty, k, seed, problems, test, name, dev, **options) -> TrainingData:
    kind, files, where = what
    key = row_tables.rows_key(kind, files, where=where, k=k, seed=seed, drop_bad_rows=problems.drop_bad_rows,
                              **options) if files else None
    hit = row_tables.cached(key) if key else None
    if hit is not None:
        table, meta = hit
        log.info("data %s: %d rows read from the cache %s (the file's bytes are unchanged)", name, len(table),
                 table.path.parent)
        problems.replay(meta["problems"])
        held_out = test()
        digest = meta["fingerprint"] if meta["test_digest"] == held_out_digest(held_out) else fingerprint(table, held_out)
        return TrainingData(rows=table, test=held_out, name=name, fingerprint=digest, source=table.source,
                            problems=problems, dev=dev)
    table, h = row_tables.build(key if k is None else None, where, rows)
    if key is None:  # nothing to key a cache by (a data set held in memory): the table lives for this run
        atexit.register(row_tables.discard, table)
    if not len(table):
        row_tables.discard(table)
        problems.raise_bad()
        raise ValueError(empty)
    if k is not None:
        table, h = row_tables.sampled(table, subsample(list(range(len(table))), k, seed), key)
        if key is None:
            atexit.register(row_tables.discard, table)
    met = problems.record()  # the rows' problems; the test set's are met again each run
    held_out = test()
    feed_test(h, held_out)
    digest = h.hexdigest()
    if key and not problems.bad:  # with bad rows to report, the next run reads the file again
        row_tables.save_meta(table, key, digest, held_out_digest(held_out), met)
    return TrainingData(rows=table, test=held_out, name=name, fingerprint=digest, source=table.source,
                        problems=problems, dev=dev)


def iter_rows(file: Path, problems: DataProblems) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` of each row of a ``.jsonl``/``.jsonl.gz``/``.json``/``.csv``/``.tsv`` file (see
    :func:`load_jsonl`), read as iterated. Raises ValueError for another suffix (at once)."""
    name = file.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_json_objects(file, problems)
    if name.endswith(".json"):
        return _read_json(file, problems)
    if name.endswith((".csv", ".tsv")):
        return _read_table(file, "\t" if name.endswith(".tsv") else ",", problems)
    raise ValueError(f"{file}: unsupported training file type; expected one of {', '.join(_SUFFIXES + _BINARY)} "
                     "or a save_to_disk folder")


def read_with_datasets(path: Path, split: str) -> tuple[Iterator[tuple[int, dict]], str]:
    """``(row number, row)`` of a ``.parquet`` / ``.arrow`` file or a ``save_to_disk`` folder, read with
    ``datasets`` / ``pyarrow`` a record batch at a time, and the name that messages give them (``path``,
    or ``path[split]`` for a DatasetDict).

    Raises:
        ValueError: a folder that ``save_to_disk`` did not write (a BEIR folder is named as such), or a
            DatasetDict without ``split`` (naming the splits it has).
    """
    import datasets  # heavy import; only these forms need it

    if path.is_dir():
        if (path / "corpus.jsonl").is_file() and (path / "qrels").is_dir():
            raise ValueError(f"{path}: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/): use data=beir "
                             f"data.path={path}")
        if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            raise ValueError(f"{path}: not a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk "
                             "(no dataset_dict.json or state.json); for a folder of data files use data=hf")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}, not {split!r}: pick one with "
                                 "data.split=<split>")
            return _numbered(_dataset_batches(ds[split])), f"{path}[{split}]"
        return _numbered(_dataset_batches(ds)), str(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith(".parquet"):  # read in place: datasets' parquet builder would copy it to its cache
        return _numbered(b.to_pylist() for b in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)), str(path)
    try:  # the Arrow stream format, as save_to_disk and datasets' cache write it
        ds = datasets.Dataset.from_file(str(path), in_memory=False)
        return _numbered(_dataset_batches(ds)), str(path)
    except pa.ArrowInvalid:  # the Arrow IPC file format (pyarrow.feather, pandas.to_feather)
        def batches():
            with pa.memory_map(str(path)) as f:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i).to_pylist()
        return _numbered(batches()), str(path)


def _dataset_batches(ds) -> Iterator[list[dict]]:
    """The rows of a ``datasets.Dataset``, a list of dicts per batch (as ``to_list`` gives them)."""
    for start in range(0, len(ds), BATCH_ROWS):
        yield ds.select(range(start, min(start + BATCH_ROWS, len(ds)))).to_list()


def _numbered(batches) -> Iterator[tuple[int, dict]]:
    n = 0
    for batch in batches:
        for row in batch:
            n += 1
            yield n, row


def load_hf(
    name: str,
    split: str = "train",
    subset: str | None = None,
    test_path: str | None = None,
    max_train_pairs: int | None = None,
    seed: int = 0,
    drop_bad_rows: bool = False,
    dev_queries: int | None = None,
    dev_ratio: float = 0.1,
    streaming: bool = False,
    shuffle_buffer: int | None = None,
) -> TrainingData | StreamedData:
    """Load training rows with ``datasets.load_dataset``.

    Args:
        name: a hub data set (``sentence-transformers/all-nli``), a local folder that ``datasets`` can read
            (one of data files, or one written by ``save_to_disk``), or a local ``.jsonl``/``.json``/``.csv``/
            ``.tsv`` file (read and checked line by line as in :func:`load_jsonl`, so errors name the line) or
            ``.parquet``/``.arrow`` file, exposed as ``split``.
        split: the split to read.
        subset: the configuration name (``triplet`` for all-nli), or None.
        test_path: a BEIR folder or hub name to evaluate on (its ``test`` qrels), or None.
        max_train_pairs: keep at most this many rows (deterministic sample, order kept), None for all.
        seed: seed of that sample.
        drop_bad_rows: drop bad rows with a warning instead of failing (see :func:`load_jsonl`).
        dev_queries, dev_ratio: without ``test_path``, the dev split to hold out (see :func:`load_jsonl`).
        streaming: read the rows as training goes (:mod:`embtune.data.streaming`): a local file or
            ``save_to_disk`` folder through the same readers as without it, anything else through
            ``datasets.load_dataset(..., streaming=True)`` (no copy in ``datasets``' cache either).
        shuffle_buffer: with ``streaming``, the rows of the shuffle buffer (None: 10000); refused without it.

    Returns:
        TrainingData with the rows as dicts and ``source`` = ``(name[split], row number from 1)``, or
        ``(file, line)`` for a local text file; with ``streaming``, a
        :class:`~embtune.data.streaming.StreamedData`.

    Raises:
        FileNotFoundError: a local path that does not exist, or the ``test_path`` test split is missing.
        ValueError: the split has no rows, or ``subset`` is given for a local file; a bad ``max_train_pairs``
            or ``shuffle_buffer``, and with ``streaming``, as for :func:`load_jsonl`.
        Whatever ``datasets.load_dataset`` raises for an unknown or unreachable hub data set.
    """
    import datasets  # heavy import; only this loader needs it

    check_sample_size(max_train_pairs, "data.max_train_pairs")
    shuffle_buffer = _shuffle_buffer(shuffle_buffer, streaming)
    dev = _dev_split(test_path, dev_queries, dev_ratio, seed)
    local = Path(name).expanduser()
    problems = DataProblems(drop_bad_rows)
    test = (lambda: _test_set(test_path, "test", problems))  # noqa: E731
    if streaming:
        return _stream_hf(name, split, subset, local, problems, test(), shuffle_buffer, max_train_pairs, dev_queries)
    if local.is_file() and local.name.lower().endswith(_SUFFIXES):
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        return _stored(("hf", [local], str(local)), iter_rows(local, problems), f"{name}: empty training file (no rows)",
                       max_train_pairs, seed, problems, test, str(name), dev)
    saved = local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())
    if saved or (local.is_file() and local.name.lower().endswith(_BINARY)):
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        rows, where = read_with_datasets(local, split)
        return _stored(("hf", [local], where), rows, f"{name}: no rows", max_train_pairs, seed, problems, test,
                       str(name), dev)
    if local.is_file():
        builder = next((b for s, b in _HF_BUILDERS.items() if local.name.lower().endswith(s)), None)
        if builder is None:
            raise ValueError(f"{name}: unsupported file type; expected one of {', '.join(_HF_BUILDERS)}")
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        ds = datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
    elif _looks_local(name) and not local.exists():
        raise FileNotFoundError(f"{name}: no such file or folder")
    else:
        ds = datasets.load_dataset(name, subset, split=split)
    files = [Path(f["filename"]) for f in ds.cache_files]  # datasets' own Arrow files: their bytes key our cache
    return _stored(("hf", files, f"{name}[{split}]"), _numbered(_dataset_batches(ds)),
                   f"{name}: split {split!r} has no rows", max_train_pairs, seed, problems, test, str(name), dev,
                   subset=subset)


def _shuffle_buffer(value: int | None, streaming: bool) -> int | None:
    """``data.shuffle_buffer`` as a stream reads it (None: 10000 rows).

    Raises:
        ValueError: a value given without ``data.streaming=true``, where nothing would read it.
    """
    if not streaming:
        if value is not None:
            raise ValueError(f"data.shuffle_buffer={value!r} is only read with data.streaming=true (a run on disk "
                             "shuffles all its rows each epoch); drop it or set data.streaming=true")
        return None
    return 10_000 if value is None else value


def _check_streaming(max_train_pairs: int | None, dev_queries: int | None) -> None:
    """Refuse the loader options a stream cannot honour (both need every row before step 1).

    Raises:
        ValueError: ``max_train_pairs`` set or ``dev_queries`` > 0, naming the option.
    """
    if max_train_pairs is not None:
        raise ValueError(f"data.max_train_pairs={max_train_pairs} with data.streaming=true: a sample of the rows "
                         "needs every row up front; bound the run with train.max_steps instead")
    if dev_queries:
        raise ValueError(f"data.dev_queries={dev_queries} with data.streaming=true: a dev split needs every row up "
                         "front; evaluate on data.test_path, or drop data.dev_queries")


def _stream_hf(name: str, split: str, subset: str | None, local: Path, problems: DataProblems, test, buffer: int,
               max_train_pairs: int | None, dev_queries: int | None) -> StreamedData:
    """:func:`load_hf` with ``streaming=True``."""
    import datasets

    _check_streaming(max_train_pairs, dev_queries)
    is_text = local.is_file() and local.name.lower().endswith(_SUFFIXES)
    saved = local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())
    if (is_text or saved or local.is_file()) and subset is not None:
        raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
    if is_text:
        where = str(local)
        def open_rows(p):
            return iter_rows(local, p)
    elif saved or (local.is_file() and local.name.lower().endswith(_BINARY)):
        where = read_with_datasets(local, split)[1]
        def open_rows(p):
            return read_with_datasets(local, split)[0]
    else:
        if _looks_local(name) and not local.exists():
            raise FileNotFoundError(f"{name}: no such file or folder")
        stream = datasets.load_dataset(name, subset, split=split, streaming=True)
        where = f"{name}[{split}]"
        def open_rows(p):
            return enumerate(stream, 1)
    identity = file_identity([local]) if local.exists() else []  # a hub data set: its name and options only
    return open_stream(str(name), where, open_rows, problems, test, buffer, ["hf", str(name), subset, split, identity],
                       f"{name}: split {split!r} has no rows")


def _read_json(file: Path, problems: DataProblems) -> Iterator[tuple[int, dict]]:
    text = "".join(t for _, t in read_lines(file))  # a JSON list is parsed whole: a byte error cannot be dropped
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            yield from read_json_objects(file, problems)
            return
        raise ValueError(f"{file}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of objects (or JSON Lines), got one {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if isinstance(row, dict):
            yield i, row
        else:
            problems.bad_row(f"{file}: element {i}: expected a JSON object, got {type(row).__name__}")


class _Quiet:
    """Problems of a pass that only looks (lines that are not UTF-8 are skipped here and reported once,
    by the pass that yields the rows)."""

    drop_bad_rows = True

    def bad_row(self, message: str) -> None:
        pass

    warn = bad_row


def _read_table(file: Path, delimiter: str, problems: DataProblems) -> Iterator[tuple[int, dict]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    if delimiter == "\t":  # a first pass: does every row split right without quoting?
        header, records = _parse_table(file, read_lines(file, _Quiet()), delimiter, quoting)
        if header is not None and any(len(v) != len(header) for _, v in records):
            try:  # quoted TSV (pandas, csv.writer): fields that hold a TAB or a newline are in double quotes
                quoted, records = _parse_table(file, read_lines(file, _Quiet()), delimiter, csv.QUOTE_MINIMAL)
                if quoted == header and all(len(v) == len(header) for _, v in records):
                    quoting = csv.QUOTE_MINIMAL
            except (ValueError, csv.Error):
                pass
    header, records = _parse_table(file, read_lines(file, problems), delimiter, quoting)
    if header is None:
        return
    for start, values in records:
        if len(values) != len(header):
            tip = " (a TAB or newline inside a TSV field must be quoted)" if delimiter == "\t" else ""
            problems.bad_row(f"{file}:{start}: expected {len(header)} fields ({', '.join(header)}), got "
                             f"{len(values)}{tip}")
            continue
        yield start, {h: v if v != "" else None for h, v in zip(header, values)}  # an empty cell: no value


def _parse_table(file: Path, lines: Iterator[tuple[int, str]], delimiter: str, quoting: int):
    """``(header, records)`` of CSV/TSV text, records an iterator of ``(first line of the record, values)``,
    or ``(None, [])`` when empty. The header is read (and checked) at once."""
    fed: deque[int] = deque()  # line numbers of the lines fed and not yet consumed (dropped lines leave gaps)
    last = [0]

    def feed():
        for n, text in lines:
            fed.append(n)
            last[0] = n
            yield text

    reader = csv.reader(feed(), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise ValueError(f"{file}:{last[0]}: {e}") from None
    if header is None:
        return None, []
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or "" in header:
        raise ValueError(f"{file}:{fed[0]}: header {header} has an empty or repeated column name")

    def records():
        base, consumed = 0, reader.line_num  # fed[k - base]: the line number of the k-th line fed
        try:
            for values in reader:
                if values:  # not a blank line
                    yield fed[consumed - base], values
                consumed = reader.line_num
                while base < consumed:
                    fed.popleft()
                    base += 1
        except csv.Error as e:
            raise ValueError(f"{file}:{last[0]}: {e}") from None

    return header, records()


def _dev_split(test_path: str | None, dev_queries: int | None, dev_ratio: float, seed: int) -> DevSplit | None:
    """The dev split asked for, None when ``test_path`` brings the test set.

    Raises:
        ValueError: ``dev_queries`` > 0 together with ``test_path``, or a bad ``dev_queries``/``dev_ratio``.
    """
    dev = DevSplit(dev_queries, dev_ratio, seed)  # checks both values
    if test_path is None:
        return dev
    if dev_queries:
        raise ValueError(f"data.dev_queries={dev_queries} with data.test_path={test_path}: the run evaluates on the "
                         "test set; drop one of them")
    return None


def _test_set(test_path: str | None, split: str, problems: DataProblems) -> RetrievalSet | None:
    return None if test_path is None else load_beir_test(test_path, split, problems=problems)


def _looks_local(name: str) -> bool:
    """A path a user meant as local: absolute, relative (``./``, ``../``, ``~``) or with a file suffix."""
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(tuple(_HF_BUILDERS))
