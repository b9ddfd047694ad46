"""BEIR-format retrieval data: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{split}.tsv``.

The layout is the one of Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of
Information Retrieval Models", NeurIPS 2021 (https://github.com/beir-cellar/beir):

- ``corpus.jsonl``: one object a line, ``{"_id", "title", "text"}``;
- ``queries.jsonl``: one object a line, ``{"_id", "text"}``;
- ``qrels/{split}.tsv``: ``query-id <TAB> corpus-id <TAB> score`` with an optional header line.

Any of them may be gzipped (``.gz``). On the hub, ``BeIR/<name>`` holds the corpus and queries at its root
and ``BeIR/<name>-qrels`` holds ``{split}.tsv`` at its root; both layouts are read. IDs are always strings.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import random
from collections.abc import Hashable, Iterator
from pathlib import Path

from huggingface_hub import snapshot_download

from embtune.data.checks import DataProblems
from embtune.data.dataset import RetrievalSet, TrainingData

log = logging.getLogger(__name__)

_HUB_FILES = ["*.jsonl", "*.jsonl.gz", "*.tsv", "*.tsv.gz", "*.md"]


def load_beir(
    path: str,
    train_split: str | None = "train",
    test_split: str = "test",
    max_train_pairs: int | None = None,
    max_test_queries: int | None = None,
    random_negatives: int = 0,
    seed: int = 0,
    drop_bad_rows: bool = False,
) -> TrainingData:
    """Load a BEIR data set: (query, positive) training pairs and a held-out retrieval set.

    Args:
        path: a local BEIR folder, or a hub data set name such as ``BeIR/scifact`` (its qrels are then
            read from the same repository's ``qrels/`` folder or, as BEIR publishes them, from ``<path>-qrels``).
        train_split: qrels file giving the training pairs, ``qrels/{train_split}.tsv``; None: no training
            pairs and no such file read (evaluation only: most BEIR sets have only a test split).
        test_split: qrels file giving the evaluation queries, ``qrels/{test_split}.tsv``.
        max_train_pairs: keep at most this many training pairs (deterministic sample), None for all.
        max_test_queries: keep at most this many test queries (deterministic sample), None for all.
        random_negatives: add a ``negative`` column of this many corpus documents drawn at random
            (seeded), never one judged relevant to the query, for ``data_format=triplet``/``multi_negative``.
        seed: seed of the samples above.
        drop_bad_rows: drop a bad line (bad JSON, not UTF-8, a missing or wrong-typed field, a duplicate
            id, a qrels line naming an unknown query or document) with a warning instead of failing.

    Returns:
        TrainingData whose rows are ``{"query", "positive", "query_id", "doc_id"}``, one per judged pair
        with score > 0, in file order; ``source`` is ``(qrels file, line number)`` of each row. ``test`` holds
        every judged test query (those judged only 0 too), its grades, and the WHOLE corpus as candidates
        (see :func:`load_beir_test`); it is None (with a warning) when the test qrels file does not exist.
        Document text is ``title + " " + text`` (just ``text`` when the title is empty), stripped.

    Raises:
        FileNotFoundError: the folder, corpus, queries or train qrels file is missing (``no train qrels
            file``: only when ``train_split`` is set), or a hub name could not be fetched.
        ValueError: a malformed line (bad JSON, bytes that are not UTF-8, missing or non-string field,
            wrong column count, non-integer score), a duplicate id, or a qrels line naming an unknown query
            or (in the train split) an unknown document; the message gives ``file:line``, the field and the
            id. Not raised for such lines when ``drop_bad_rows``. A query id that also names a document is
            allowed (ArguAna): evaluation leaves a query's own document out of its ranking
            (``eval.ignore_identical_ids``).
    """
    check_sample_size(max_train_pairs, "data.max_train_pairs")
    check_sample_size(max_test_queries, "data.max_test_queries")
    problems = DataProblems(drop_bad_rows)
    if train_split is None:  # evaluation only: the test split must exist, and no train file is read
        test = load_beir_test(path, test_split, max_test_queries, seed, problems)
        return TrainingData(rows=[], test=test, name=str(path), source=[], problems=problems)
    corpus, queries, qrels_dirs, train_file = _read_collection(path, train_split, "train qrels file", problems)
    judged = [j for j in read_qrels(train_file, queries, corpus, problems) if j[2] > 0]
    keep = subsample([(qid, did) for qid, did, _, _ in judged], max_train_pairs, seed)
    rows, source = [], []
    relevant: dict[str, set[str]] = {}
    for qid, did, _, _ in judged:
        relevant.setdefault(qid, set()).add(did)
    doc_ids, rng = sorted(corpus), random.Random(seed)
    for qid, did, _, line in judged:
        if (qid, did) in keep:
            rows.append({"query": queries[qid], "positive": corpus[did], "query_id": qid, "doc_id": did})
            if random_negatives:
                negs: list[str] = []
                while len(negs) < random_negatives:  # rejection: a query has few relevant docs
                    cand = rng.choice(doc_ids)
                    if cand not in relevant[qid] and corpus[cand] != corpus[did]:
                        negs.append(corpus[cand])
                rows[-1]["negative"] = negs
            source.append((str(train_file), line))

    test_file = _find_qrels(qrels_dirs, test_split)
    if test_file is None:
        log.warning("%s: no test qrels file %s.tsv (looked in %s); no evaluation set", path, test_split,
                    _names(qrels_dirs))
        test = None
    else:
        test = _retrieval_set(test_file, queries, corpus, max_test_queries, seed, problems)
    return TrainingData(rows=rows, test=test, name=str(path), source=source, problems=problems)


def load_beir_test(path: str, split: str = "test", max_test_queries: int | None = None, seed: int = 0,
                   problems: DataProblems | None = None) -> RetrievalSet:
    """Read only the evaluation set of a BEIR folder or hub name (see :func:`load_beir`).

    Scored as BEIR and MTEB score it: every query in ``qrels/{split}.tsv`` is kept with all its grades
    (a query judged only 0 scores 0), and a judgment naming a document missing from the corpus is a
    counted warning, not an error: it stays a relevant document that can never be retrieved, so its
    query scores what pytrec_eval gives it (0 when it has no other relevant document).

    Raises:
        FileNotFoundError: the folder, corpus, queries or ``{split}.tsv`` qrels file is missing.
        ValueError: as :func:`load_beir` (bad lines are dropped instead when ``problems`` allows it).
    """
    check_sample_size(max_test_queries, "data.max_test_queries")
    problems = problems or DataProblems()
    corpus, queries, _, qrels_file = _read_collection(path, split, "qrels file", problems)
    return _retrieval_set(qrels_file, queries, corpus, max_test_queries, seed, problems)


def _read_collection(path: str, split: str, what: str, problems: DataProblems) -> tuple[dict, dict, list[Path], Path]:
    """Corpus, queries, the folders holding qrels, and the ``{split}.tsv`` qrels file, which must exist
    (checked before the corpus is read, so a missing split fails fast)."""
    data_dir, qrels_dirs = resolve_beir(path)
    qrels_file = _find_qrels(qrels_dirs, split)
    if qrels_file is None:
        raise FileNotFoundError(f"{path}: no {what} {split}.tsv (looked in {_names(qrels_dirs)})")
    corpus_file, queries_file = _find(data_dir, "corpus.jsonl"), _find(data_dir, "queries.jsonl")
    corpus = read_corpus(corpus_file, problems)
    queries = read_queries(queries_file, problems)
    return corpus, queries, qrels_dirs, qrels_file


def resolve_beir(path: str) -> tuple[Path, list[Path]]:
    """Find the folder holding corpus and queries, and the folders to search for ``{split}.tsv``.

    A local directory is used as it is; anything else is fetched with ``huggingface_hub.snapshot_download``
    as a data set repository (``<path>-qrels`` too, when ``<path>`` itself has no ``qrels/`` folder).
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local, [local / "qrels", local]
    if local.exists():
        raise FileNotFoundError(f"{path}: expected a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), got a file")
    if path.startswith(("/", "./", "../", "~")):  # meant as local: don't turn a typo into a hub error
        raise FileNotFoundError(f"{path}: no such BEIR folder")
    data_dir = _download(path)
    if (data_dir / "qrels").is_dir():
        return data_dir, [data_dir / "qrels", data_dir]
    qrels_dir = _download(f"{path}-qrels")
    return data_dir, [qrels_dir / "qrels", qrels_dir, data_dir]


def read_corpus(file: Path, problems: DataProblems | None = None) -> dict[str, str]:
    """Read ``corpus.jsonl(.gz)``: id -> ``title + " " + text`` stripped (``text`` alone when no title)."""
    corpus, problems = {}, problems or DataProblems()
    for line, obj, doc_id in _read_objects(file, problems):
        try:
            text = _string_field(obj, "text", file, line)
            title = _string_field(obj, "title", file, line, required=False)
        except ValueError as e:
            problems.bad_row(str(e))
            continue
        corpus[doc_id] = f"{title.strip()} {text.strip()}".strip()
    return corpus


def read_queries(file: Path, problems: DataProblems | None = None) -> dict[str, str]:
    """Read ``queries.jsonl(.gz)``: id -> text stripped."""
    queries, problems = {}, problems or DataProblems()
    for line, obj, query_id in _read_objects(file, problems):
        try:
            queries[query_id] = _string_field(obj, "text", file, line).strip()
        except ValueError as e:
            problems.bad_row(str(e))
    return queries


def read_qrels(file: Path, queries: dict[str, str], corpus: dict[str, str],
               problems: DataProblems | None = None, keep_missing_docs: bool = False) -> list[tuple[str, str, int, int]]:
    """Read a qrels TSV as ``(query id, doc id, score, line number)``, every score kept, ids as strings.

    Line 1 is skipped when its first column is ``query-id`` (BEIR's header). A wrong column count, a
    non-integer score, an id missing from ``queries``/``corpus`` or a repeated pair is a bad row
    (ValueError naming ``file:line`` and the field, or dropped with a warning when ``problems`` allows it).
    With ``keep_missing_docs`` (evaluation) a document missing from ``corpus`` is a warning instead and
    the judgment is kept.
    """
    problems = problems or DataProblems()
    out, seen = [], {}
    for line, raw in read_lines(file, problems):
        if not raw.strip() or (line == 1 and raw.split("\t")[0].strip() == "query-id"):
            continue
        cols = [c.strip() for c in raw.rstrip("\r\n").split("\t")]
        if len(cols) != 3:
            problems.bad_row(f"{file}:{line}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                             f"got {len(cols)}")
            continue
        qid, did, score = cols
        try:
            grade = int(score)
        except ValueError:
            problems.bad_row(f"{file}:{line}: field 'score' must be an integer, got {score!r}")
            continue
        if qid not in queries:
            problems.bad_row(f"{file}:{line}: field 'query-id': unknown query id {qid!r} (not in queries.jsonl)")
        elif did not in corpus and not keep_missing_docs:
            problems.bad_row(f"{file}:{line}: field 'corpus-id': unknown document id {did!r} (not in corpus.jsonl)")
        elif (qid, did) in seen:
            problems.bad_row(f"{file}:{line}: duplicate judgment ({qid!r}, {did!r}), first on line {seen[qid, did]}")
        else:
            if did not in corpus:
                problems.warn(f"{file}:{line}: field 'corpus-id': document id {did!r} is not in corpus.jsonl; the "
                              "judgment is kept: a relevant document never retrieved, as pytrec_eval counts it")
            seen[qid, did] = line
            out.append((qid, did, grade, line))
    return out


def subsample(keys: list[Hashable], k: int | None, seed: int, option: str = "data.max_train_pairs") -> set:
    """A deterministic sample of ``k`` keys: ``random.Random(seed).sample`` over the sorted keys.

    Returns all keys when ``k`` is None or not smaller than their number.

    Raises:
        ValueError: ``k`` is not None or an integer >= 0, naming ``option`` (the setting it came from).
    """
    check_sample_size(k, option)
    if k is None or k >= len(keys):
        return set(keys)
    return set(random.Random(seed).sample(sorted(keys), k))


def check_sample_size(k: object, option: str) -> None:
    """Refuse a sample size that is not None or an integer >= 0, naming the option it came from."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
        raise ValueError(f"{option}={k!r}: must be an integer >= 0 or null (all of them)")


def _retrieval_set(file: Path, queries: dict, corpus: dict, max_queries: int | None, seed: int,
                   problems: DataProblems) -> RetrievalSet:
    qrels: dict[str, dict[str, int]] = {}
    for qid, did, grade, _ in read_qrels(file, queries, corpus, problems, keep_missing_docs=True):
        qrels.setdefault(qid, {})[did] = grade  # grades <= 0 too: such a query scores 0, as in pytrec_eval
    keep = subsample(list(qrels), max_queries, seed, "data.max_test_queries")
    qrels = {qid: docs for qid, docs in qrels.items() if qid in keep}
    return RetrievalSet(queries={qid: queries[qid] for qid in qrels}, corpus=corpus, qrels=qrels)


def read_lines(file: Path, problems: DataProblems | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text)`` of a UTF-8 text file (gzipped if ``.gz``), a leading BOM dropped.

    Decoded line by line, so a byte that is not UTF-8 is reported with its line (a bad row: ValueError,
    or dropped with a warning when ``problems`` allows it), not as a bare UnicodeDecodeError.
    """
    problems = problems or DataProblems()
    with (gzip.open(file, "rb") if file.name.lower().endswith(".gz") else open(file, "rb")) as f:
        for line, raw in enumerate(f, 1):
            if line == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield line, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.bad_row(f"{file}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 "of the line); save the file as UTF-8")


def read_json_objects(file: Path, problems: DataProblems | None = None):
    """Yield ``(line number, object)`` for each non-blank line of a JSON Lines file (gzipped if ``.gz``).

    Raises:
        ValueError: a line that is not UTF-8, not valid JSON or not a JSON object, naming ``file:line``
            (unless ``problems`` allows dropping it).
    """
    problems = problems or DataProblems()
    for line, raw in read_lines(file, problems):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.strip())  # stripped: the error's column is on this line, not the next
        except json.JSONDecodeError as e:
            problems.bad_row(f"{file}:{line}: bad JSON ({e.msg.removesuffix(' at')} at column {e.colno}); expected one JSON object a line")
            continue
        if not isinstance(obj, dict):
            problems.bad_row(f"{file}:{line}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield line, obj


def _read_objects(file: Path, problems: DataProblems):
    """Yield ``(line number, object, string id)`` for each object of a BEIR JSON Lines file."""
    first_line: dict[str, int] = {}
    for line, obj in read_json_objects(file, problems):
        raw_id = obj.get("_id")
        if "_id" not in obj:
            problems.bad_row(f"{file}:{line}: missing field '_id' (expected a string id)")
        elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            problems.bad_row(f"{file}:{line}: field '_id' must be a string or integer, got "
                             f"{type(raw_id).__name__}: {str(raw_id)[:40]!r}")
        elif str(raw_id) in first_line:
            problems.bad_row(f"{file}:{line}: field '_id': duplicate id {str(raw_id)!r}, first on line "
                             f"{first_line[str(raw_id)]}")
        else:
            first_line[str(raw_id)] = line
            yield line, obj, str(raw_id)


def _string_field(obj: dict, field: str, file: Path, line: int, required: bool = True) -> str:
    if field not in obj or (obj[field] is None and not required):
        if required:
            raise ValueError(f"{file}:{line}: missing field {field!r} (expected a string)")
        return ""
    if not isinstance(obj[field], str):
        raise ValueError(f"{file}:{line}: field {field!r} must be a string, got {type(obj[field]).__name__}: "
                         f"{str(obj[field])[:40]!r}")
    return obj[field]


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no {name} or {name}.gz")


def _find_qrels(folders: list[Path], split: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{split}.tsv", folder / f"{split}.tsv.gz"):
            if candidate.is_file():
                return candidate
    return None


def _names(folders: list[Path]) -> str:
    return ", ".join(str(f) for f in folders)


def _download(repo_id: str) -> Path:
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, invalid name: all mean "no such data set here"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched as a hub data set: {type(e).__name__}: {e}"
        ) from e
