"""What is wrong or unusual in the data, found before any model loads, and told to the user.

- :class:`DataProblems`: a bad row (bad JSON, a missing or wrong-typed field, an unknown id, ...) is an
  error naming file, line and field (every bad row of a pass in one error, when the pass collects them), or, with ``data.drop_bad_rows=true``, a warning and the row is
  dropped. Warnings are counted and summarised in ``summary.json`` (``data.problems``).
- :func:`check_label_range`: labels a loss cannot take (``pointwise_bce`` needs [0, 1]).
- :func:`text_report`: awkward but valid text (empty, whitespace only, non-ASCII, longer than the
  model's max length and therefore truncated), counted for ``summary.json`` (``data.texts``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from embtune.data.formats import tower

log = logging.getLogger(__name__)

_LOGGED = 20  # warnings printed one by one; beyond this they are only counted
_LISTED = 20  # bad rows named one by one in the error; beyond this they are only counted
DROP_HINT = "set data.drop_bad_rows=true to drop such rows with a warning"


class DataProblems:
    """Collects a data set's bad rows and warnings.

    Args:
        drop_bad_rows: False: a bad row is an error. True: it is dropped with a warning.
        hint: appended to the error in the first case (what the user can do).
        collect: with ``drop_bad_rows=False``, keep the bad rows met (:attr:`bad`) instead of raising at the
            first, so that one error (:meth:`raise_bad`) names them all; the loaders of
            :mod:`embtune.data.files` collect, and :func:`make_examples` (or another reader of their rows)
            raises.
    """

    def __init__(self, drop_bad_rows: bool = False, hint: str = DROP_HINT, collect: bool = False):
        self.drop_bad_rows, self.hint, self.collect = drop_bad_rows, hint, collect
        self.dropped_rows, self.warnings = 0, 0
        self.first: list[str] = []
        self.logged: list[str] = []  # the messages printed one by one (kept with cached data, printed again)
        self.bad: list[str] = []  # bad rows collected and not yet raised

    def bad_row(self, message: str) -> None:
        """A row that cannot be used; ``message`` starts with ``file:line:`` and names the field.

        Raises:
            ValueError: the message (plus the hint), unless bad rows may be dropped or are collected.
        """
        if not self.drop_bad_rows:
            self.bad.append(message)
            if not self.collect:
                self.raise_bad()
            return
        self.dropped_rows += 1
        self.warn(f"{message}; row dropped")

    def raise_bad(self) -> None:
        """Raise the bad rows collected, if any, as one error: a single one as ``file:line: reason (hint)``;
        several as a count, then one ``file:line: reason`` a line in file order (the first :data:`_LISTED`,
        then how many more).

        Raises:
            ValueError: when a bad row was collected (they are then forgotten).
        """
        bad, self.bad = self.bad, []
        if not bad:
            return
        bad.sort(key=_file_line)  # the file's own problems and the format's, in file order
        hint = f" ({self.hint})" if self.hint else ""
        if len(bad) == 1:
            raise ValueError(bad[0] + hint)
        more = f"\n  and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise ValueError(f"{len(bad)} bad rows{hint}:\n  " + "\n  ".join(bad[:_LISTED]) + more)

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the run."""
        self.warnings += 1
        if len(self.first) < 5:
            self.first.append(message)
        if self.warnings <= _LOGGED:
            self.logged.append(message)
            log.warning("%s", message)
        elif self.warnings == _LOGGED + 1:
            log.warning("more data warnings: counted, not printed (see summary.json data.problems)")

    def summary(self) -> dict:
        """``{"warnings", "dropped_rows", "first"}``: counts and the first five messages."""
        return {"warnings": self.warnings, "dropped_rows": self.dropped_rows, "first": list(self.first)}

    def record(self) -> dict:
        """What :meth:`replay` needs: the summary and the messages printed."""
        return {**self.summary(), "logged": list(self.logged)}

    def replay(self, record: dict) -> None:
        """Count and print again the problems of a :meth:`record` (cached data met them when it was read)."""
        for message in record["logged"]:
            self.warn(message)
        extra = record["warnings"] - len(record["logged"])  # beyond the printed ones: counted only
        if extra > 0:
            if self.warnings <= _LOGGED:
                log.warning("more data warnings: counted, not printed (see summary.json data.problems)")
            self.warnings += extra
        self.dropped_rows += record["dropped_rows"]


def _file_line(message: str) -> tuple[str, int]:
    """``(file, line)`` of a ``file:line: ...`` message (``(message, 0)`` for another)."""
    m = re.match(r"(.*?):(\d+): ", message)
    return (m[1], int(m[2])) if m else (message, 0)


def check_label_range(examples: list, origins: list[int], source: list, loss, field: str,
                      problems: DataProblems) -> tuple[list, list[int]]:
    """Drop or refuse scored pairs whose score lies outside the loss's ``label_range`` (when it has one).

    Returns:
        The examples and their row indices, without the dropped ones.
    Raises:
        ValueError: a score out of range, naming file, line and field, unless bad rows may be dropped.
    """
    bounds = getattr(loss, "label_range", None)
    if bounds is None:
        return examples, origins
    lo, hi = bounds
    keep_e, keep_o = [], []
    for e, i in zip(examples, origins):
        if lo <= e.score <= hi:
            keep_e.append(e), keep_o.append(i)
            continue
        where = f"{source[i][0]}:{source[i][1]}" if i < len(source) else f"row {i + 1}"
        problems.bad_row(f"{where}: field {field!r} must be in [{lo:g}, {hi:g}] for loss={loss.name}, got "
                         f"{e.score:g} (data_format.score_scale divides scores, e.g. 5 for a 0-5 scale)")
    return keep_e, keep_o


def text_report(examples, test, tokenizer, query_max_length: int, document_max_length: int, cache=None) -> dict:
    """Count awkward but valid texts of the training examples and the test set.

    Query-side fields (``embtune.data.formats.QUERY_FIELDS``) are measured against ``query_max_length``, the others against
    ``document_max_length`` (as the batches are tokenised). Counts are over distinct texts, tokenised
    :data:`CHUNK` at a time (only lengths are kept). Examples kept on disk (an ExampleTable) are read from
    its text table, a corpus on disk (a :class:`~embtune.data.examples.TextMap`) from its own; with ``cache``
    (the run's :class:`~embtune.data.token_cache.TokenCache`) the token counts of those tables come from
    the token files :meth:`~embtune.data.token_cache.TokenCache.prepare` wrote (each text tokenised once,
    for its ids and its count together), and the report is kept beside them and read back by a later run
    of the same tokenizer and data. Texts in memory (a list of examples, the test queries) are tokenised
    here, untruncated.

    Returns:
        ``{"train": {"queries": {...}, "documents": {...}}, "test": {...}}``, each with ``distinct``,
        ``empty``, ``whitespace_only``, ``non_ascii``, ``truncated`` (longer than the max length in
        tokens, special tokens included) and ``max_tokens`` (the longest, before truncation).
    """
    from embtune.data.examples import DOCUMENT, QUERY, TextMap
    from embtune.data.tables import read_json, write_json

    stored = getattr(examples, "texts", None)
    file = cache.report_file(examples.key, query_max_length, document_max_length) \
        if cache is not None and stored is not None else None
    report = read_json(file) if file is not None else None

    def counted(texts, bits: int, max_length: int) -> dict:  # a TextTable's texts of a tower
        known = cache.token_counts(texts, bits) if cache is not None else None
        return _counts(_stored_texts(texts, bits), tokenizer, max_length, known)

    if report is None:
        if stored is not None:
            train = {"queries": counted(stored, QUERY, query_max_length),
                     "documents": counted(stored, DOCUMENT, document_max_length)}
        else:
            queries, documents = set(), set()
            for e in examples:
                for name, value in zip(e._fields, e):
                    if isinstance(value, str):
                        (queries if tower(name) == "query" else documents).add(value)
                    elif isinstance(value, tuple):
                        documents.update(v for v in value if isinstance(v, str))
            train = {"queries": _counts([sorted(queries)], tokenizer, query_max_length),
                     "documents": _counts([sorted(documents)], tokenizer, document_max_length)}
        report = {"train": train}
        if test is not None:
            corpus = (counted(test.corpus.texts, DOCUMENT, document_max_length) if isinstance(test.corpus, TextMap)
                      else _counts([sorted(set(test.corpus.values()))], tokenizer, document_max_length))
            report["test"] = {"queries": _counts([sorted(set(test.queries.values()))], tokenizer, query_max_length),
                              "documents": corpus}
        if file is not None:
            write_json(file, report)
    for split, parts in report.items():
        for role, c in parts.items():
            if c["truncated"]:
                log.info("%s %s: %d of %d distinct texts are longer than %d tokens and are truncated", split,
                         role, c["truncated"], c["distinct"], query_max_length if role == "queries"
                         else document_max_length)
            if c["empty"] or c["whitespace_only"]:
                log.warning("%s %s: %d empty and %d whitespace-only texts (kept: they embed as the special "
                            "tokens alone)", split, role, c["empty"], c["whitespace_only"])
    return report


CHUNK = 512  # texts per tokenizer call in text_report: its memory is one chunk's token lists


def _stored_texts(texts, bits: int):
    """The distinct texts of a TextTable that a field of ``bits`` holds, a record batch at a time."""
    for _, _, chunk in texts.batches(bits):
        yield chunk


def _counts(chunks, tokenizer, max_length: int, known=None) -> dict:
    """The counts of :func:`text_report` over distinct texts given as lists (chunks); ``known``: their token
    counts (untruncated, special tokens included) [n] in the same order, or None to tokenise them here."""
    c = {"distinct": 0, "empty": 0, "whitespace_only": 0, "non_ascii": 0, "truncated": 0, "max_tokens": 0}
    for texts in chunks:
        for i in range(0, len(texts), CHUNK):
            part = texts[i:i + CHUNK]
            if known is not None:
                lengths = known[c["distinct"]:c["distinct"] + len(part)].tolist()
            else:
                lengths = [len(ids) for ids in tokenizer(part, truncation=False, verbose=False,
                                                         return_attention_mask=False,
                                                         return_token_type_ids=False)["input_ids"]]
            c["distinct"] += len(part)
            c["empty"] += sum(t == "" for t in part)
            c["whitespace_only"] += sum(t != "" and not t.strip() for t in part)
            c["non_ascii"] += sum(not t.isascii() for t in part)
            c["truncated"] += sum(n > max_length for n in lengths)
            c["max_tokens"] = max(c["max_tokens"], *lengths)
    return c


def make_examples(data, data_format, objective) -> tuple[list, Callable[[int], str]]:
    """The training examples of ``data`` (a :class:`~embtune.data.TrainingData`) for the objective
    (:mod:`embtune.objectives`: e.g. scores checked against the loss's range, pairs merged into classes),
    with bad rows raised or dropped under ``data.problems``' policy.

    Rows kept on disk (a :class:`~embtune.data.rows.RowTable`) give an :class:`~embtune.data.examples.
    ExampleTable`, built a row at a time into ``$EMBTUNE_CACHE/examples/<key>`` and opened from there by a
    later run with the same data fingerprint, data format settings and objective (its problems counted and
    printed again); a list of rows gives a list of examples.

    Returns:
        ``(examples, row_of)``: ``row_of(i)`` names example i's source row (``file:line``) for messages.
    Raises:
        ValueError: the bad rows (file, line, field: every one met, the file's own included, in one error),
            or no example left.
    """
    from embtune.data.rows import RowTable

    problems, collect = data.problems, data.problems.collect
    problems.collect = True  # every bad row of the data in one error, with those met while reading the file
    try:
        if isinstance(data.rows, RowTable):
            examples = _stored_examples(data, data_format, objective)
            origins = examples.origins()
        else:
            examples, origins = data_format.convert(data.rows, data.source, problems)
            examples, origins = objective.examples(examples, origins, data, data_format)
        problems.raise_bad()
    finally:
        problems.collect = collect
    if not len(examples):
        raise ValueError(f"data {data.name}: no training examples")
    log.info("data %s: %d rows -> %d examples", data.name, len(data.rows), len(examples))
    if data.problems.warnings:
        log.warning("data %s: %d warnings, %d bad rows dropped (summary.json: data.problems)", data.name,
                    data.problems.warnings, data.problems.dropped_rows)

    def row_of(i: int) -> str:
        if origins is None or origins[i] >= len(data.source):
            return f"example {i}"
        return "{}:{}".format(*data.source[origins[i]])

    return examples, row_of


def _stored_examples(data, data_format, objective):
    """:func:`make_examples` for rows on disk: the cached ExampleTable, or one built a chunk of rows at a time."""
    from embtune.data.cache import cache_dir
    from embtune.data.examples import VERSION, ExampleWriter, cached_examples
    from embtune.data.tables import BATCH_ROWS, digest

    loss = objective.loss_fn
    settings = {k: v for k, v in vars(data_format).items() if not k.startswith("_") and k != "columns"}
    key = digest(VERSION, data.fingerprint, type(data_format).__qualname__, settings, type(objective).__qualname__,
                 getattr(loss, "name", None), getattr(loss, "label_range", None), data.problems.drop_bad_rows)
    folder = cache_dir() / "examples" / key
    examples = cached_examples(folder)
    if examples is not None:
        log.info("data %s: examples read from the cache %s", data.name, folder)
        data.problems.replay(examples.meta["problems"])
        return examples
    mark = (data.problems.warnings, data.problems.dropped_rows, len(data.problems.logged))
    writer = ExampleWriter(folder)
    try:
        data_format.prepare(data.rows)
        made = data_format.iter_examples(data.rows, data.source, data.problems)
        if objective.per_example:  # checked a chunk at a time
            chunk: list = []
            for pair in made:
                chunk.append(pair)
                if len(chunk) == BATCH_ROWS:
                    _add(writer, chunk, objective, data, data_format)
                    chunk = []
            _add(writer, chunk, objective, data, data_format)
        else:  # the objective reshapes the examples as a whole (e.g. pairs into classes)
            _add(writer, list(made), objective, data, data_format)
        data.problems.raise_bad()  # before the cache keeps examples without the bad rows
        if writer.cls is None:
            raise ValueError(f"data {data.name}: no training examples")
    except BaseException:
        writer.abort()
        raise
    p = data.problems
    met = {"warnings": p.warnings - mark[0], "dropped_rows": p.dropped_rows - mark[1], "logged": p.logged[mark[2]:],
           "first": p.logged[mark[2]:][:5]}
    return writer.close({"problems": met, "rows": len(data.rows), "origins": writer.origins})


def _add(writer, pairs: list, objective, data, data_format) -> None:
    examples, origins = objective.examples([e for e, _ in pairs], [i for _, i in pairs], data, data_format)
    writer.origins = origins is not None
    for j, e in enumerate(examples):
        writer.add(e, origins[j] if origins is not None else None)
