"""Training rows from a local file (JSON Lines, JSON, CSV, TSV) or a ``datasets`` data set.

Rows are kept as they are, one dict of columns each (for instance FlagEmbedding's
``{"query", "pos": [...], "neg": [...]}``); the ``data_format`` decides which columns to read. Evaluation,
when wanted, comes from a BEIR folder (``test_path``) read by :mod:`embtune.data.beir`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from embtune.data import RetrievalSet, TrainingData
from embtune.data.beir import load_beir_test, read_json_objects, subsample

_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".tsv")
_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def load_jsonl(
    path: str,
    test_path: str | None = None,
    test_split: str = "test",
    max_train_pairs: int | None = None,
    seed: int = 0,
) -> TrainingData:
    """Load training rows from a local file, chosen by suffix.

    - ``.jsonl`` (or ``.jsonl.gz``): one JSON object a line; blank lines are skipped.
    - ``.json``: a JSON list of objects (a ``.json`` file holding JSON Lines is read as ``.jsonl``).
    - ``.csv`` / ``.tsv``: a header row naming the columns, then one row a line. Values stay strings
      (no type inference: ``"5.000"`` is not turned into a float). TSV is split on TAB with
      ``csv.QUOTE_NONE``: a quote is an ordinary character, because real TSV text (STS-B, BEIR qrels)
      contains unbalanced quotes; a TSV field therefore cannot hold a TAB or a newline. CSV uses the
      standard double-quote quoting, so quoted fields may hold commas and newlines.

    Args:
        path: the training file.
        test_path: a BEIR folder or hub name to evaluate on, or None for no evaluation.
        test_split: the qrels split of ``test_path`` to read (``qrels/{test_split}.tsv``).
        max_train_pairs: keep at most this many rows (deterministic sample, file order kept), None for all.
        seed: seed of that sample.

    Returns:
        TrainingData with the rows as dicts, ``source`` = ``(path, line number)`` per row (the element
        number, from 1, for a ``.json`` list), and ``test`` from ``test_path`` or None.

    Raises:
        FileNotFoundError: ``path`` (or the ``test_path`` test split) does not exist.
        ValueError: unsupported suffix, bad JSON (``file:line``), a row that is not an object, a CSV/TSV row
            with the wrong number of fields, or a file with no rows.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such training file")
    name = file.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        rows, lines = _read_jsonl(file)
    elif name.endswith(".json"):
        rows, lines = _read_json(file)
    elif name.endswith((".csv", ".tsv")):
        rows, lines = _read_table(file, delimiter="\t" if name.endswith(".tsv") else ",")
    else:
        raise ValueError(f"{path}: unsupported training file type; expected one of {', '.join(_SUFFIXES)}")
    if not rows:
        raise ValueError(f"{path}: empty training file (no rows)")
    source = [(str(file), line) for line in lines]
    rows, source = _sample(rows, source, max_train_pairs, seed)
    return TrainingData(rows=rows, test=_test_set(test_path, test_split), name=str(path), source=source)


def load_hf(
    name: str,
    split: str = "train",
    subset: str | None = None,
    test_path: str | None = None,
    max_train_pairs: int | None = None,
    seed: int = 0,
) -> TrainingData:
    """Load training rows with ``datasets.load_dataset``.

    Args:
        name: a hub data set (``sentence-transformers/all-nli``), a local folder that ``datasets`` can read,
            or a local ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file (read with the matching
            builder, TSV with TAB and no quoting, and exposed as ``split``).
        split: the split to read.
        subset: the configuration name (``triplet`` for all-nli), or None.
        test_path: a BEIR folder or hub name to evaluate on (its ``test`` qrels), or None.
        max_train_pairs: keep at most this many rows (deterministic sample, order kept), None for all.
        seed: seed of that sample.

    Returns:
        TrainingData with the rows as dicts and ``source`` = ``(name[split], row number from 1)``.

    Raises:
        FileNotFoundError: a local path that does not exist, or the ``test_path`` test split is missing.
        ValueError: the split has no rows, or ``subset`` is given for a local file.
        Whatever ``datasets.load_dataset`` raises for an unknown or unreachable hub data set.
    """
    import datasets  # heavy import; only this loader needs it

    local = Path(name).expanduser()
    if local.is_file():
        builder = next((b for s, b in _HF_BUILDERS.items() if local.name.lower().endswith(s)), None)
        if builder is None:
            raise ValueError(f"{name}: unsupported file type; expected one of {', '.join(_HF_BUILDERS)}")
        if subset is not None:
            raise ValueError(f"{name}: 'subset' ({subset!r}) applies to hub data sets, not to a local file")
        extra = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if local.name.lower().endswith(".tsv") else {}
        ds = datasets.load_dataset(builder, data_files={split: str(local)}, split=split, **extra)
    elif _looks_local(name) and not local.exists():
        raise FileNotFoundError(f"{name}: no such file or folder")
    else:
        ds = datasets.load_dataset(name, subset, split=split)
    rows = ds.to_list()
    if not rows:
        raise ValueError(f"{name}: split {split!r} has no rows")
    source = [(f"{name}[{split}]", i) for i in range(1, len(rows) + 1)]
    rows, source = _sample(rows, source, max_train_pairs, seed)
    return TrainingData(rows=rows, test=_test_set(test_path, "test"), name=str(name), source=source)


def _read_jsonl(file: Path) -> tuple[list[dict], list[int]]:
    pairs = list(read_json_objects(file))
    return [obj for _, obj in pairs], [line for line, _ in pairs]


def _read_json(file: Path) -> tuple[list[dict], list[int]]:
    text = file.read_text(encoding="utf-8-sig")
    if not text.strip():
        return [], []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            return _read_jsonl(file)
        raise ValueError(f"{file}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of objects (or JSON Lines), got one {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{file}: element {i}: expected a JSON object, got {type(row).__name__}")
    return data, list(range(1, len(data) + 1))


def _read_table(file: Path, delimiter: str) -> tuple[list[dict], list[int]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows, lines = [], []
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or "" in header:
            raise ValueError(f"{file}:1: header {header} has an empty or repeated column name")
        start = reader.line_num + 1
        for values in reader:
            if values:  # blank line
                if len(values) != len(header):
                    raise ValueError(
                        f"{file}:{start}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}"
                    )
                rows.append(dict(zip(header, values)))
                lines.append(start)
            start = reader.line_num + 1
    return rows, lines


def _sample(rows: list[dict], source: list, k: int | None, seed: int) -> tuple[list[dict], list]:
    keep = subsample(list(range(len(rows))), k, seed)
    return [r for i, r in enumerate(rows) if i in keep], [s for i, s in enumerate(source) if i in keep]


def _test_set(test_path: str | None, split: str) -> RetrievalSet | None:
    return None if test_path is None else load_beir_test(test_path, split)


def _looks_local(name: str) -> bool:
    """A path a user meant as local: absolute, relative (``./``, ``../``, ``~``) or with a file suffix."""
    return name.startswith(("/", "./", "../", "~")) or name.lower().endswith(tuple(_HF_BUILDERS))
