"""Training rows from a local file (JSON Lines, JSON, CSV, TSV, Parquet, Arrow), a ``save_to_disk`` folder or
a ``datasets`` data set.

Rows are kept as they are, one dict of columns each (for instance FlagEmbedding's
``{"query", "pos": [...], "neg": [...]}``); the ``data_format`` decides which columns to read. Evaluation,
when wanted, comes from a BEIR folder (``test_path``) read by :mod:`embtune.data.beir`.

Text files (JSON Lines, JSON, CSV, TSV) are read here line by line rather than by ``datasets``' builders,
so that every error names ``file:line`` and CSV cells stay strings; the binary forms (Parquet, Arrow,
``save_to_disk`` folders) are read by ``datasets``, their rows numbered from 1.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from embtune.data.beir import load_beir_test, read_json_objects, read_lines, subsample
from embtune.data.checks import DataProblems
from embtune.data.dataset import DevSplit, RetrievalSet, TrainingData

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
) -> TrainingData:
    """Load training rows from a local file, chosen by suffix, or a ``save_to_disk`` folder.

    - ``.jsonl`` (or ``.jsonl.gz``): one JSON object a line; blank lines are skipped.
    - ``.json``: a JSON list of objects (a ``.json`` file holding JSON Lines is read as ``.jsonl``).
    - ``.csv`` / ``.tsv``: a header row naming the columns, then one row a line. Values stay strings
      (no type inference: ``"5.000"`` is not turned into a float). TSV is split on TAB with
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

    Returns:
        TrainingData with the rows as dicts, ``source`` = ``(path, line number)`` per row (the element
        number, from 1, for a ``.json`` list), and ``test`` from ``test_path`` or None.

    Raises:
        FileNotFoundError: ``path`` (or the ``test_path`` test split) does not exist.
        ValueError: unsupported suffix, a folder that is not a ``save_to_disk`` folder (a BEIR folder is named
            as one: ``data=beir``), a DatasetDict without ``split``, a file with no rows, a bad CSV/TSV header,
            and (unless
            ``drop_bad_rows``) a line that is not UTF-8, bad JSON or not an object, or a CSV/TSV row with
            the wrong number of fields, each naming ``file:line``.
    """
    dev = _dev_split(test_path, dev_queries, dev_ratio, seed)
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such training file")
    problems = DataProblems(drop_bad_rows)
    if file.is_dir() or file.name.lower().endswith(_BINARY):
        rows, where = read_with_datasets(file, split)
        if not rows:
            raise ValueError(f"{path}: no rows")
        rows, source = _sample(rows, [(where, i) for i in range(1, len(rows) + 1)], max_train_pairs, seed)
        return TrainingData(rows=rows, test=_test_set(test_path, test_split, problems), name=str(path),
                            source=source, problems=problems, dev=dev)
    rows, lines = read_rows(file, problems)
    if not rows:
        raise ValueError(f"{path}: empty training file (no rows)")
    source = [(str(file), line) for line in lines]
    rows, source = _sample(rows, source, max_train_pairs, seed)
    return TrainingData(rows=rows, test=_test_set(test_path, test_split, problems), name=str(path), source=source,
                        problems=problems, dev=dev)


def read_rows(file: Path, problems: DataProblems) -> tuple[list[dict], list[int]]:
    """Rows of a ``.jsonl``/``.jsonl.gz``/``.json``/``.csv``/``.tsv`` file and the line of each (see
    :func:`load_jsonl`). Raises ValueError for another suffix."""
    name = file.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(file, problems)
    if name.endswith(".json"):
        return _read_json(file, problems)
    if name.endswith((".csv", ".tsv")):
        return _read_table(file, "\t" if name.endswith(".tsv") else ",", problems)
    raise ValueError(f"{file}: unsupported training file type; expected one of {', '.join(_SUFFIXES + _BINARY)} "
                     "or a save_to_disk folder")


def read_with_datasets(path: Path, split: str) -> tuple[list[dict], str]:
    """Rows of a ``.parquet`` / ``.arrow`` file or a ``save_to_disk`` folder, read with ``datasets``, and the
    name that messages give them (``path``, or ``path[split]`` for a DatasetDict).

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
            return ds[split].to_list(), f"{path}[{split}]"
        return ds.to_list(), str(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith(".parquet"):  # read in place: datasets' parquet builder would copy it to its cache
        return pq.read_table(path).to_pylist(), str(path)
    try:  # the Arrow stream format, as save_to_disk and datasets' cache write it
        return datasets.Dataset.from_file(str(path), in_memory=True).to_list(), str(path)
    except pa.ArrowInvalid:  # the Arrow IPC file format (pyarrow.feather, pandas.to_feather)
        with pa.memory_map(str(path)) as f:
            return pa.ipc.open_file(f).read_all().to_pylist(), str(path)


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
) -> TrainingData:
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

    Returns:
        TrainingData with the rows as dicts and ``source`` = ``(name[split], row number from 1)``, or
        ``(file, line)`` for a local text file.

    Raises:
        FileNotFoundError: a local path that does not exist, or the ``test_path`` test split is missing.
        ValueError: the split has no rows, or ``subset`` is given for a local file.
        Whatever ``datasets.load_dataset`` raises for an unknown or unreachable hub data set.
    """
    import datasets  # heavy import; only this loader needs it

    dev = _dev_split(test_path, dev_queries, dev_ratio, seed)
    local = Path(name).expanduser()
    problems = DataProblems(drop_bad_rows)
    if local.is_file() and local.name.lower().endswith(_SUFFIXES):
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        rows, lines = read_rows(local, problems)
        if not rows:
            raise ValueError(f"{name}: empty training file (no rows)")
        rows, source = _sample(rows, [(str(local), line) for line in lines], max_train_pairs, seed)
        return TrainingData(rows=rows, test=_test_set(test_path, "test", problems), name=str(name), source=source,
                            problems=problems, dev=dev)
    saved = local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())
    if saved or (local.is_file() and local.name.lower().endswith(_BINARY)):
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        rows, where = read_with_datasets(local, split)
        if not rows:
            raise ValueError(f"{name}: no rows")
        rows, source = _sample(rows, [(where, i) for i in range(1, len(rows) + 1)], max_train_pairs, seed)
        return TrainingData(rows=rows, test=_test_set(test_path, "test", problems), name=str(name), source=source,
                            problems=problems, dev=dev)
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
    rows = ds.to_list()
    if not rows:
        raise ValueError(f"{name}: split {split!r} has no rows")
    source = [(f"{name}[{split}]", i) for i in range(1, len(rows) + 1)]
    rows, source = _sample(rows, source, max_train_pairs, seed)
    return TrainingData(rows=rows, test=_test_set(test_path, "test", problems), name=str(name), source=source,
                        problems=problems, dev=dev)


def _read_jsonl(file: Path, problems: DataProblems) -> tuple[list[dict], list[int]]:
    pairs = list(read_json_objects(file, problems))
    return [obj for _, obj in pairs], [line for line, _ in pairs]


def _read_json(file: Path, problems: DataProblems) -> tuple[list[dict], list[int]]:
    text = "".join(t for _, t in read_lines(file))  # a JSON list is parsed whole: a byte error cannot be dropped
    if not text.strip():
        return [], []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            return _read_jsonl(file, problems)
        raise ValueError(f"{file}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of objects (or JSON Lines), got one {type(data).__name__}")
    rows, lines = [], []
    for i, row in enumerate(data, 1):
        if isinstance(row, dict):
            rows.append(row), lines.append(i)
        else:
            problems.bad_row(f"{file}: element {i}: expected a JSON object, got {type(row).__name__}")
    return rows, lines


def _read_table(file: Path, delimiter: str, problems: DataProblems) -> tuple[list[dict], list[int]]:
    lines = list(read_lines(file, problems))
    header, records = _parse_table(file, lines, delimiter, csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    if header is None:
        return [], []
    if delimiter == "\t" and any(len(v) != len(header) for _, v in records):
        try:  # quoted TSV (pandas, csv.writer): fields that hold a TAB or a newline are in double quotes
            quoted = _parse_table(file, lines, delimiter, csv.QUOTE_MINIMAL)
        except (ValueError, csv.Error):
            quoted = None, []
        if quoted[0] == header and all(len(v) == len(header) for _, v in quoted[1]):
            records = quoted[1]
    rows, starts = [], []
    for start, values in records:
        if len(values) != len(header):
            tip = " (a TAB or newline inside a TSV field must be quoted)" if delimiter == "\t" else ""
            problems.bad_row(f"{file}:{start}: expected {len(header)} fields ({', '.join(header)}), got "
                             f"{len(values)}{tip}")
            continue
        rows.append(dict(zip(header, values)))
        starts.append(start)
    return rows, starts


def _parse_table(file: Path, lines: list[tuple[int, str]], delimiter: str, quoting: int):
    """``(header, [(first line of the record, values)])`` of CSV/TSV text, or ``(None, [])`` when empty."""
    physical: list[int] = []  # line numbers of the lines fed so far (dropped lines leave gaps)

    def feed():
        for n, text in lines:
            physical.append(n)
            yield text

    reader = csv.reader(feed(), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader, None)
        if header is None:
            return None, []
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or "" in header:
            raise ValueError(f"{file}:{physical[0]}: header {header} has an empty or repeated column name")
        records, consumed = [], reader.line_num
        for values in reader:
            if values:  # not a blank line
                records.append((physical[consumed], values))
            consumed = reader.line_num
    except csv.Error as e:
        raise ValueError(f"{file}:{physical[-1]}: {e}") from None
    return header, records


def _sample(rows: list[dict], source: list, k: int | None, seed: int) -> tuple[list[dict], list]:
    keep = subsample(list(range(len(rows))), k, seed)
    return [r for i, r in enumerate(rows) if i in keep], [s for i, s in enumerate(source) if i in keep]


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
