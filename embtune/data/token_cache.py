"""Token ids kept on disk, so the jobs of a sweep tokenise each text once.

A text's token ids depend only on the tokenizer and the truncation length, so a cache file is keyed by
a fingerprint of the tokenizer (its files and settings) and of the data (one file per data set, not one
file for everything ever tokenised), and holds one table per max length. Batches are padded from the
cached ids exactly as the tokenizer pads them (same ids, same attention mask, same padding side).

Training texts kept on disk (an :class:`~embtune.data.examples.ExampleTable`) are tokenised before training
by :meth:`TokenCache.prepare`, a chunk of texts at a time, into Arrow files beside the cache file
(``<key>.<texts>.L<max length>.arrow``: column ``ids``, the token ids of text id i in row i, null for a
text of the other tower); a batch then reads its rows through the memory map, and a later run of the
same tokenizer and data tokenises nothing. A dev split's candidates on disk (a
:class:`~embtune.data.examples.TextMap`) get a file of their own, holding only the candidates that no
training text already holds. Other texts (evaluation's) are tokenised as they come and kept in memory,
saved to the ``.pt`` file.

Each such file also holds column ``length``: the text's token count before truncation (special tokens
included), which :func:`embtune.data.checks.text_report` counts instead of tokenising every text again.
One tokenizer call gives both (:func:`encode`): the windows that truncation cuts off
(``return_overflowing_tokens``) add up to the full length, so each distinct text is tokenised once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from embtune.data.examples import DOCUMENT, QUERY
from embtune.data.tables import ListColumn, Writer, digest, open_table

if TYPE_CHECKING:
    from embtune.data.examples import TextTable

log = logging.getLogger(__name__)

VERSION = 2  # bump when the file layout changes: old files are then ignored (2: the ``length`` column)
CHUNK = 512  # texts per tokenizer call when tokenising a whole table (its memory is this chunk's)
# weights do not change how text is tokenised; everything else in a model folder might
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack", ".ckpt", ".gguf"}


def tokenizer_fingerprint(model_dir: str | Path, tokenizer) -> str:
    """sha256 over the model folder's non-weight files (tokenizer.json, vocab, configs) and the
    tokenizer's class, padding and truncation sides."""
    h = hashlib.sha256(json.dumps([VERSION, type(tokenizer).__name__, tokenizer.padding_side,
                                   tokenizer.truncation_side]).encode())
    for f in sorted(Path(model_dir).rglob("*")):
        if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES:
            h.update(f.relative_to(model_dir).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class TokenCache:
    """Texts -> token ids for one tokenizer, filled as texts are seen and saved with :meth:`save`.

    Args:
        path: the cache file (read when it exists; written by :meth:`save`), or None for memory only.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.ids: dict[int, dict[str, np.ndarray]] = {}  # max_length -> text -> int32 ids [T]
        self.added = 0  # texts tokenised since loading
        self.tables: dict[int, list] = {}  # max_length -> [(TextTable, ListColumn of its ids)], read first
        self.counts: dict[str, np.ndarray] = {}  # TextTable key -> untruncated token count by text id (-1: unknown)
        if self.path is not None and self.path.is_file():
            try:
                self._read(self.path)
            except Exception as e:  # a broken cache only costs time: tokenise again
                log.warning("unreadable token cache %s (%s); tokenising again", self.path, e)
                self.ids = {}

    @classmethod
    def for_run(cls, model_dir: str | Path, tokenizer, data_fingerprint: str, cache_root: str | Path) -> TokenCache:
        """The cache of this tokenizer and data set, in ``cache_root/tokens/``."""
        key = hashlib.sha256(f"{tokenizer_fingerprint(model_dir, tokenizer)} {data_fingerprint}".encode()).hexdigest()
        return cls(Path(cache_root) / "tokens" / f"{key}.pt")

    def __len__(self) -> int:
        return sum(len(table) for table in self.ids.values())

    def tokenize(self, tokenizer, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Like ``tokenizer(texts, padding=True, truncation=True, max_length=max_length,
        return_tensors="pt")``: ``input_ids`` and ``attention_mask`` [B,T] (T = the longest text here,
        in tokens), plus zero ``token_type_ids`` where the tokenizer returns them (one segment).
        Texts not seen before are tokenised (in one call) and kept."""
        table = self.ids.setdefault(max_length, {})
        rows: list = [self._stored(t, max_length) for t in texts]
        missing = list(dict.fromkeys(t for t, r in zip(texts, rows) if r is None and t not in table))
        if missing:
            encoded = tokenizer(missing, truncation=True, max_length=max_length)["input_ids"]
            table.update((t, np.asarray(ids, dtype=np.int32)) for t, ids in zip(missing, encoded))
            self.added += len(missing)
        rows = [table[t] if r is None else r for t, r in zip(texts, rows)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(0, len(r)) if tokenizer.padding_side == "right" else slice(width - len(r), width)
            input_ids[i, span], mask[i, span] = torch.from_numpy(r.astype(np.int64)), 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in tokenizer.model_input_names:
            out["token_type_ids"] = torch.zeros_like(input_ids)
        return out

    def _stored(self, text: str, max_length: int) -> np.ndarray | None:
        for texts, ids in self.tables.get(max_length, ()):
            i = texts.find(text)
            if i is not None and (row := ids[i]) is not None:
                return row
        return None

    def prepare(self, model, examples, test=None) -> None:
        """Tokenise the texts of ``examples`` (an ExampleTable; anything else is left to :meth:`tokenize`) for
        each tower whose batches come through this cache (no prompt, no EOS appended: see
        ``Embedder.tokenize``), at that tower's max length, :data:`CHUNK` texts per tokenizer call, into an
        Arrow file per max length (made once; later runs map it). With ``test`` (a RetrievalSet) whose corpus
        is on disk (a dev split's TextMap), the candidates that no training text holds go to a file of
        their own at the document tower's length; the others are known by their training text's id."""
        texts = getattr(examples, "texts", None)
        if texts is None or self.path is None:
            return
        towers: dict[int, int] = {}  # max length -> tower bits tokenised at it
        for kind, bit in (("query", QUERY), ("document", DOCUMENT)):
            length = _cached_length(model, kind)
            if length is not None:
                towers[length] = towers.get(length, 0) | bit
        counts = np.full(len(texts), -1, dtype=np.int64)
        for length, bits in towers.items():
            file = self.path.with_name(f"{self.path.stem}.{digest(texts.key, bits)[:16]}.L{length}.arrow")
            self._map(model.tokenizer, texts, texts.towers & bits > 0, length, file, counts)
        self.counts[texts.key] = counts
        corpus = getattr(getattr(test, "corpus", None), "texts", None)  # a TextMap's TextTable
        length = _cached_length(model, "document")
        if corpus is None or length is None or corpus.key == texts.key:
            return
        known = texts.ids_of(corpus)  # the candidates' ids among the training texts (-1: not one of them)
        counts = np.where(known >= 0, self.counts[texts.key][np.maximum(known, 0)], -1)
        file = self.path.with_name(f"{self.path.stem}.{digest(corpus.key, texts.key)[:16]}.L{length}.arrow")
        self._map(model.tokenizer, corpus, counts < 0, length, file, counts)
        self.counts[corpus.key] = counts

    def _map(self, tokenizer, texts, wanted: np.ndarray, length: int, file: Path, counts: np.ndarray) -> None:
        """Tokenise the ``wanted`` [N] texts of ``texts`` into ``file`` unless it exists, map its ids for
        :meth:`tokenize` and copy its untruncated lengths into ``counts`` [N] where it holds them."""
        if not file.is_file():
            with _every_core():
                _tokenise_table(tokenizer, texts, wanted, length, file)
            log.info("token ids of %s texts at max length %d written to %s", f"{int(wanted.sum()):,}", length, file)
        table = open_table(file)
        self.tables.setdefault(length, []).append((texts, ListColumn(table.column("ids"))))
        held = pc.fill_null(table.column("length"), -1).to_numpy().astype(np.int64)
        np.copyto(counts, held, where=held >= 0)

    def token_counts(self, texts: TextTable, bits: int) -> np.ndarray | None:
        """Untruncated token counts (special tokens included) [n] of the texts of ``texts`` that a field of
        ``bits`` holds, in id order (as :meth:`TextTable.batches` gives them), from the files
        :meth:`prepare` made; None when some of them were not tokenised there (a tower with a prompt)."""
        counts = self.counts.get(texts.key)
        if counts is None:
            return None
        counts = counts[texts.towers & bits > 0]
        return None if (counts < 0).any() else counts

    def report_file(self, *parts) -> Path | None:
        """Where a result computed from this tokenizer and data (and ``parts``) is kept, or None."""
        return None if self.path is None else self.path.with_name(f"{self.path.stem}.report-{digest(*parts)[:16]}.json")

    def save(self) -> None:
        """Write the cache (only when new texts were tokenised), atomically: parallel jobs of a sweep
        never read half a file; the last writer wins, and every writer's file is complete."""
        if self.path is None or self.added == 0:
            return
        tables = {}
        for length, table in self.ids.items():
            texts = list(table)
            lengths = torch.tensor([len(table[t]) for t in texts], dtype=torch.long)
            flat = np.concatenate([table[t] for t in texts]) if texts else np.zeros(0, dtype=np.int32)
            tables[length] = {"texts": texts, "lengths": lengths, "ids": torch.from_numpy(flat)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"version": VERSION, "tables": tables}, tmp)
        os.replace(tmp, self.path)
        self.added = 0

    def _read(self, path: Path) -> None:
        blob = torch.load(path, weights_only=True)  # plain dicts, lists, strings, tensors: no code runs
        if blob.get("version") != VERSION:
            return
        for length, t in blob["tables"].items():
            flat = t["ids"].numpy()
            ends = np.cumsum(t["lengths"].numpy())
            self.ids[int(length)] = {text: flat[e - n:e] for text, n, e in zip(t["texts"], t["lengths"].tolist(), ends)}


def _cached_length(model, kind: str) -> int | None:
    """The max length at which ``kind``'s batches come through the cache (clamped to the position table, as
    ``Embedder.tokenize`` does), or None when they do not (a prompt, or EOS appended)."""
    if (model.query_prompt if kind == "query" else model.document_prompt) or model.append_eos:
        return None
    length = model.query_max_length if kind == "query" else model.document_max_length
    return min(length, model.position_limit) if model.position_limit is not None else length


def encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
    """One tokenizer call for ``texts``: the token ids truncated at ``max_length`` (as ``tokenizer(texts,
    truncation=True, max_length=max_length)``) and each text's token count before truncation, special
    tokens included (as ``len(tokenizer(text)["input_ids"])``).

    The count comes from the windows truncation cuts off (``return_overflowing_tokens``, stride 0): a fast
    tokenizer returns them as extra rows, each with the special tokens again, so a text of w rows has
    ``sum(len(row)) - (w - 1) * specials`` tokens; a Python tokenizer returns ``num_truncated_tokens``.
    Returns:
        ``(ids, lengths)``: one list of ids and one count per text.
    """
    out = tokenizer(texts, truncation=True, max_length=max_length, return_overflowing_tokens=True, verbose=False,
                    return_attention_mask=False, return_token_type_ids=False)
    rows = out["input_ids"]
    if "overflow_to_sample_mapping" in out:  # fast: a row per window, mapped to its text
        specials = tokenizer.num_special_tokens_to_add(pair=False)
        ids: list = [None] * len(texts)
        lengths = [specials] * len(texts)  # each row: its own tokens plus the specials, counted once here
        for row, i in zip(rows, out["overflow_to_sample_mapping"]):
            if ids[i] is None:
                ids[i] = row
            lengths[i] += len(row) - specials
        return ids, lengths
    return rows, [len(r) + n for r, n in zip(rows, out["num_truncated_tokens"])]


@contextlib.contextmanager
def _every_core():
    """Let a fast tokenizer's batch calls run on its own thread pool (Rust's rayon: every CPU this process
    may use; ``RAYON_NUM_THREADS`` caps it) while a table is tokenised. Nothing else computes then, so the
    cold start of a large data set takes a fraction of one core's time; ``embtune`` otherwise keeps
    ``TOKENIZERS_PARALLELISM=false``, so that a batch tokenised during training does not compete with
    torch's threads. The tokenizers library reads the variable at each call."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _tokenise_table(tokenizer, texts, wanted: np.ndarray, max_length: int, file: Path) -> None:
    """Token ids and untruncated lengths of the ``wanted`` [N] texts of ``texts`` (a TextTable), in id order;
    the others are null."""
    writer = Writer(file, pa.schema([("ids", pa.large_list(pa.int32())), ("length", pa.int32())]))
    try:
        for start, held, chunk in texts.batches():  # held: the batch's texts (every text is of some tower)
            where = np.flatnonzero(held)  # chunk[j] is the text at position where[j] of this batch
            take = np.flatnonzero(wanted[start:start + len(held)][where])
            ids: list = [None] * len(held)
            lengths: list = [None] * len(held)
            for i in range(0, len(take), CHUNK):
                part = take[i:i + CHUNK].tolist()
                encoded, counts = encode(tokenizer, [chunk[j] for j in part], max_length)
                for j, e, n in zip(part, encoded, counts):
                    ids[where[j]], lengths[where[j]] = e, n
            writer.write({"ids": ids, "length": lengths})
        writer.close()
    except BaseException:
        writer.abort()
        raise
