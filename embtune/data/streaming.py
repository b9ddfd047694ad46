"""Training rows read from their files as training goes (``data.streaming=true``), never stored whole.

The on-disk path (:mod:`embtune.data.rows`) reads, checks and tokenises every row into ``$EMBTUNE_CACHE``
before step 1; a stream is for data larger than that cache. The loader (``load_jsonl`` / ``load_hf`` with
``streaming=True``) returns a :class:`StreamedData`: how to open a fresh pass over the file's
``(line, row)`` pairs (the same readers as the on-disk path, so a bad row names ``file:line`` and its
field), its first rows (read before any model loads: the columns, a first check), and the test set. Then,
in the training loop:

- :func:`make_examples` resolves the format's columns from those first rows and checks them;
- :func:`plan_batches` gives a :class:`StreamBatches`, which is both the loop's sampler (``set_epoch``) and
  its loader (``(rows, batch)`` pairs). Each epoch is one pass through a ``datasets.IterableDataset``
  made by ``IterableDataset.from_generator`` over the reader, shuffled by a buffer of
  ``data.shuffle_buffer`` rows (``shuffle(seed=train.seed)``, ``set_epoch(epoch)``: each epoch's order differs
  and is reproducible) and, under torchrun, split by ``datasets.distributed.split_dataset_by_node`` so each
  process reads its own rows. Rows are checked as they come out of the stream and tokenised a batch at a time;
- a checkpoint records each process's position (:meth:`StreamBatches.positions`): the epoch, the batches of
  it trained on and the rows they took. A resumed run opens that epoch's stream again and passes over those
  batches with ``itertools.islice`` (rows read, checked and batched again, not tokenised), so it trains on
  exactly the batches an uninterrupted run would. ``IterableDataset.skip`` is not used: after
  ``split_dataset_by_node`` it does not skip a process's own rows, and it resets the epoch.

What a stream gives up (docs/data.md): the exact epoch plan (the shuffle is a buffer's, and no text repeats
only within a process's batch, planned greedily from the rows in stream order), the dev split, a known epoch
length (``train.max_steps`` is required), the token cache, and whatever needs every example before step 1
(:func:`embtune.config.check_streaming`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from embtune.data.checks import DataProblems
from embtune.data.dataset import RetrievalSet, held_out_digest
from embtune.data.tables import BATCH_ROWS
from embtune.training import distributed

log = logging.getLogger(__name__)

HEAD_ROWS = BATCH_ROWS  # rows read when the loader opens the stream: the columns and a first check
WAITING = 8  # batches' worth of examples that may wait for a batch without their texts (train.no_duplicates)


@dataclass
class StreamedData:
    """What a loader returns with ``streaming=True``: where the rows come from, not the rows.

    Attributes:
        name: the source as the user named it (path or hub name).
        where: the name messages give the rows' file (``path`` or ``path[split]``).
        open_rows: ``open_rows(problems)`` -> a fresh pass over ``(line, row)`` pairs (line: the file's line,
            or the row number from 1 for binary forms); a bad row goes to ``problems`` (raised or dropped).
        head: the first :data:`HEAD_ROWS` rows, read (and checked) when the loader opened the stream.
        test: the held-out retrieval set (``data.test_path``), or None.
        problems: the bad rows and warnings of this process's first pass (later passes drop or raise the same
            rows without counting them again).
        shuffle_buffer: rows in the shuffle buffer (``data.shuffle_buffer``).
        fingerprint: sha256 of the files' names, sizes and modification times, the loader's options and the
            test set (not of every row: that would read the whole stream before step 1).
        held_out: why there is no dev split (``summary.json``: ``data.dev_split``).
        rows_read: rows this process has read from the stream so far (every pass, skipped ones too).
    """

    name: str
    where: str
    open_rows: Callable[[DataProblems], Iterator[tuple[int, dict]]]
    head: list[tuple[int, dict]]
    test: RetrievalSet | None
    problems: DataProblems
    shuffle_buffer: int
    fingerprint: str
    held_out: dict = field(default_factory=lambda: {"dev_queries": 0, "reason": "data.streaming=true"})
    rows_read: int = 0
    dev = None  # a dev split needs every row up front (hold_out_dev leaves a stream as it is)

    @property
    def columns(self) -> list[str]:
        """The column names of the first rows, in order of first appearance."""
        return list(dict.fromkeys(k for _, row in self.head for k in row))

    def summary(self) -> dict:
        """What ``summary.json`` records under ``data``: the source, that it was streamed (buffer, rows read by
        rank 0), the fingerprint, the problems met and the test set's size."""
        out = {"name": self.name, "streaming": {"shuffle_buffer": self.shuffle_buffer, "rows_read": self.rows_read},
               "fingerprint": self.fingerprint, "problems": self.problems.summary(), "dev_split": self.held_out}
        if self.test is not None:
            out.update(test_queries=len(self.test.qrels), test_corpus=len(self.test.corpus),
                       identical_ids=self.test.identical_ids())
        return out


def open_stream(name: str, where: str, open_rows: Callable[[DataProblems], Iterator[tuple[int, dict]]],
                problems: DataProblems, test: RetrievalSet | None, shuffle_buffer: int, identity: list,
                empty: str) -> StreamedData:
    """A :class:`StreamedData`, after reading its first :data:`HEAD_ROWS` rows (the columns; a bad row among
    them is raised now, before any model loads).

    Args:
        identity: what keys the fingerprint (:func:`file_identity` of the files, the loader's options).
        empty: the message when the stream has no row.
    Raises:
        ValueError: ``shuffle_buffer`` not an integer >= 1, a bad row among the first rows (naming
            ``file:line`` and the field, unless ``data.drop_bad_rows``), or no row at all (``empty``).
    """
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer={shuffle_buffer!r} with data.streaming=true: must be an integer >= 1 "
                         "(the rows held to shuffle the stream)")
    head = list(itertools.islice(open_rows(DataProblems(problems.drop_bad_rows)), HEAD_ROWS))  # counted later
    if not head:
        raise ValueError(empty)
    digest = hashlib.sha256(json.dumps(["stream", identity, held_out_digest(test)], sort_keys=True,
                                       default=str).encode()).hexdigest()
    return StreamedData(name, where, open_rows, head, test, problems, shuffle_buffer, digest)


def file_identity(paths: Iterable[Path]) -> list:
    """``[name, size, modification time (ns)]`` of each file (every file under a folder): a changed file
    changes it without the file being read."""
    out = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


class _Again(DataProblems):
    """A later pass over rows that an earlier pass of this process met: a bad row is dropped or raised as then,
    its warning neither printed nor counted again."""

    def warn(self, message: str) -> None:
        pass


@dataclass
class StreamedExamples:
    """A stream's rows as training examples: each row through the data format (``iter_examples``) and the
    objective's own check (``objective.examples``: e.g. a score outside the loss's range), one row at a time.
    Made by :func:`make_examples`."""

    data: StreamedData
    data_format: object
    objective: object

    def of_rows(self, rows: Iterable[tuple[int, dict]], problems: DataProblems) -> Iterator[tuple[object, str]]:
        """``(example, "file:line")`` of each example of ``rows``; a bad row is raised (naming file, line and
        field) or dropped under ``problems``' policy."""
        for line, row in rows:
            source = [(self.data.where, line)]
            one = SimpleNamespace(source=source, problems=problems)  # what objective.examples reads of the data
            made = [e for e, _ in self.data_format.iter_examples([row], source, problems)]
            if made:
                kept, _ = self.objective.examples(made, [0] * len(made), one, self.data_format)
                where = f"{self.data.where}:{line}"
                for e in kept:
                    yield e, where


def make_examples(data: StreamedData, data_format, objective) -> tuple[StreamedExamples, Callable[[str], str]]:
    """:func:`embtune.data.checks.make_examples` for a stream: the format's columns resolved from the first rows
    (logged; a role no first row has is refused naming ``data_format.<role>=<column>``), and those rows checked
    now, before any model loads. The other rows are checked as training reads them.

    Returns:
        ``(examples, row_of)``: ``row_of(where)`` names a row for messages (a batch's indices are
        ``"file:line"`` already).
    Raises:
        ValueError: a role with no column, or a bad row among the first rows (file, line, field), or no
            example in them.
    """
    data_format.prepare(SimpleNamespace(columns=data.columns))  # resolve_columns reads the columns it is given
    examples = StreamedExamples(data, data_format, objective)
    if not sum(1 for _ in examples.of_rows(data.head, _Again(data.problems.drop_bad_rows))):  # every first row
        raise ValueError(f"data {data.name}: no training example in its first {len(data.head)} rows")
    log.info("data %s: streamed (data.streaming=true): rows are read, checked and tokenised as training goes; "
             "shuffle buffer of %d rows", data.name, data.shuffle_buffer)
    return examples, str


def plan_batches(examples: StreamedExamples, objective, t, proc: distributed.Dist) -> tuple[StreamBatches,
                                                                                              random.Random]:
    """``(sampler, rng)`` as :func:`embtune.data.batching.plan_batches` gives them, for a stream: the sampler is
    a :class:`StreamBatches` (``set_epoch(epoch, start)``), ``rng`` draws the hard negatives (per process)."""
    return StreamBatches(examples, objective, t, proc), random.Random(t.seed + proc.rank)


def make_loader(examples: StreamedExamples, objective, t, model, sampler: StreamBatches, rng) -> StreamBatches:
    """The loader over a stream: ``sampler`` itself, tokenising each batch with ``objective.collate(model,
    examples, rng)`` (:func:`embtune.data.batching.make_loader` for a stream)."""
    sampler.model, sampler.rng = model, rng
    return sampler


class StreamBatches:
    """One process's batches of a stream, an epoch at a time: the loop's sampler and its loader.

    Each epoch is one pass through the ``datasets.IterableDataset`` over ``examples.data`` (shuffled by a
    buffer of ``data.shuffle_buffer`` rows, seed ``train.seed``, ``set_epoch(epoch)``; under torchrun split by
    ``split_dataset_by_node``, each process reading its own rows). The examples fill batches of
    ``train.batch_size`` in stream order. With ``train.no_duplicates`` (and an objective that names its
    texts), an example sharing a text with the batch being filled waits and has the first chance at the next
    batch (the greedy step of :class:`~embtune.data.sampler.NoDuplicatesBatchSampler`, over the stream); at most
    :data:`WAITING` batches' worth wait, the oldest beyond that is left out. At the end of an epoch the last
    batches are made of the rest; one below the floor (``train.min_batch_size``; null: half a batch, at
    least 2) is left out. Left-out examples are counted (:meth:`unbatched_in`).

    Iteration yields ``(rows, batch)``: ``rows`` the ``"file:line"`` of each example, ``batch`` from
    ``objective.collate`` (set by :func:`make_loader`).

    Raises (while iterating):
        ValueError: a bad row (file, line, field) unless ``data.drop_bad_rows``; an epoch that gives this
            process no batch; a resumed epoch whose skipped batches took other rows than when the checkpoint
            was written (the data changed).
    """

    def __init__(self, examples: StreamedExamples, objective, t, proc: distributed.Dist):
        import datasets  # heavy import; only a stream needs it
        from datasets.distributed import split_dataset_by_node

        self.examples, self.data, self.proc = examples, examples.data, proc
        self.size = t.batch_size
        floor = t.get("min_batch_size")
        self.floor = min(floor if floor is not None else max(2, -(-t.batch_size // 2)), t.batch_size)
        self.texts_of = objective.batch_texts if t.no_duplicates and objective.batch_fields else None
        self.collate = objective.collate
        self.model = self.rng = None
        ds = datasets.IterableDataset.from_generator(self._read).shuffle(seed=t.seed,
                                                                         buffer_size=self.data.shuffle_buffer)
        self.dataset = split_dataset_by_node(ds, rank=proc.rank, world_size=proc.world) if proc.world > 1 else ds
        self.epoch = self.start = self.rows = 0  # rows: of the current epoch, taken by the batches yielded
        self.expected: int | None = None  # a resumed epoch: the rows its skipped batches took then
        self._passes = 0
        self._unbatched: dict[int, int] = {}

    def _read(self) -> Iterator[dict]:
        """The generator behind the IterableDataset: every row of the file as ``{"line", "row"}`` (the row's
        JSON: one schema for every row, whatever its columns hold)."""
        problems = self.data.problems if self._passes == 0 else _Again(self.data.problems.drop_bad_rows)
        self._passes += 1
        for line, row in self.data.open_rows(problems):
            self.data.rows_read += 1
            yield {"line": line, "row": json.dumps(row, ensure_ascii=False)}

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch ``epoch`` next, from its batch ``start`` on (a resumed run's position)."""
        if (epoch, start) != (self.epoch, self.start):  # not the position resume() took
            self.expected = None
        self.epoch, self.start = epoch, start

    def positions(self, epoch: int, done: int, proc: distributed.Dist) -> list[dict] | None:
        """Every process's position, in rank order, on rank 0 (None on the others): ``{"epoch", "batches",
        "rows"}`` (its epoch, the batches of it trained on, the rows they took). Every process must call it."""
        return distributed.gather_object({"epoch": epoch, "batches": done, "rows": self.rows}, proc)

    def resume(self, positions: list[dict], rank: int) -> tuple[int, int]:
        """Take process ``rank``'s position from a checkpoint's ``stream`` list; returns ``(epoch, batches)``.

        Raises:
            ValueError: the checkpoint was written by another number of processes (each read other rows).
        """
        if len(positions) != self.proc.world:
            raise ValueError(f"the checkpoint's stream was read by {len(positions)} processes, this run has "
                             f"{self.proc.world}: each process reads its own rows, so resume with the same number")
        p = positions[rank]
        self.epoch, self.start, self.expected = p["epoch"], p["batches"], p["rows"]
        return self.epoch, self.start

    def unbatched_in(self, epoch: int) -> int:
        """Examples of epoch ``epoch`` left out of its batches (0 for an epoch this process did not read)."""
        return self._unbatched.get(epoch, 0)

    def _rows(self) -> Iterator[tuple[int, dict]]:
        for item in self.dataset:
            self.rows += 1
            yield item["line"], json.loads(item["row"])

    def _batches(self, examples: Iterator[tuple[object, str]]) -> Iterator[list[tuple[object, str]]]:
        """Batches of ``(example, where)`` (see the class docstring); counts the examples left out."""
        waiting: deque = deque()
        batch: list = []
        seen: set = set()

        def fits(item, texts) -> bool:
            if len(batch) == self.size or texts & seen:
                return False
            batch.append(item)
            seen.update(texts)
            return True

        def refill() -> None:  # earlier clashes get the first chance
            for _ in range(len(waiting)):
                w = waiting.popleft()
                if not fits(*w):
                    waiting.append(w)

        left_out = 0
        for item in examples:
            texts = set(self.texts_of(item[0])) if self.texts_of is not None else set()
            if not fits(item, texts):
                waiting.append((item, texts))
                if len(waiting) > WAITING * self.size:
                    waiting.popleft()
                    left_out += 1
            while len(batch) == self.size:
                yield batch
                batch, seen = [], set()
                refill()
        while True:  # the end of the epoch: the rest, and what still waits
            refill()
            if not batch:
                break
            if len(batch) >= self.floor:
                yield batch
            else:
                left_out += len(batch)
            batch, seen = [], set()
        self._unbatched[self.epoch] = left_out

    def __iter__(self) -> Iterator[tuple[list[str], dict]]:
        self.dataset.set_epoch(self.epoch)
        self.rows = 0
        problems = _Again(self.data.problems.drop_bad_rows) if self._passes else self.data.problems
        batches = self._batches(self.examples.of_rows(self._rows(), problems))
        deque(itertools.islice(batches, self.start), maxlen=0)  # a resumed epoch: the batches trained on
        if self.expected is not None and self.rows != self.expected:
            raise ValueError(f"data {self.data.name}: the {self.start} batches of epoch {self.epoch} trained on "
                             f"before the checkpoint took {self.expected} rows then and {self.rows} now: the data "
                             "changed; resume with the same data")
        self.expected = None
        yielded = self.start
        for batch in batches:
            yielded += 1
            yield [w for _, w in batch], self.collate(self.model, [e for e, _ in batch], self.rng)
        if yielded == 0:
            raise ValueError(f"data {self.data.name}: epoch {self.epoch} gave process {self.proc.rank} no batch of "
                             f"at least {self.floor} examples (train.min_batch_size): the stream has too few rows "
                             f"for {self.proc.world} process(es)")
