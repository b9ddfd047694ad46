"""Token ids kept on disk, so the jobs of a sweep tokenise each text once.

A text's token ids depend only on the tokenizer and the truncation length, so a cache file is keyed by
a fingerprint of the tokenizer (its files and settings) and of the data (one file per data set, not one
file for everything ever tokenised), and holds one table per max length. Batches are padded from the
cached ids exactly as the tokenizer pads them (same ids, same attention mask, same padding side).

Training texts kept on disk (an :class:`~embtune.data.examples.ExampleTable`) are tokenised before training
by :meth:`TokenCache.prepare`, a chunk of texts at a time, into Arrow files beside the cache file
(``<key>.<texts>.L<max length>.arrow``: column ``ids``, the token ids of text id i in row i, null for a
text of the other tower); a batch then reads its rows through the memory map, and a later run of the
same tokenizer and data tokenises nothing. Other texts (evaluation's) are tokenised as they come and
kept in memory, saved to the ``.pt`` file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from embtune.data.examples import DOCUMENT, QUERY
from embtune.data.tables import ListColumn, Writer, digest, open_table

log = logging.getLogger(__name__)

VERSION = 1  # bump when the file layout changes: old files are then ignored
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

    def prepare(self, model, examples) -> None:
        """Tokenise the texts of ``examples`` (an ExampleTable; anything else is left to :meth:`tokenize`) for
        each tower whose batches come through this cache (no prompt, no EOS appended: see
        ``Embedder.tokenize``), at that tower's max length, :data:`CHUNK` texts per tokenizer call, into an
        Arrow file per max length (made once; later runs map it)."""
        texts = getattr(examples, "texts", None)
        if texts is None or self.path is None:
            return
        towers: dict[int, int] = {}  # max length -> tower bits tokenised at it
        for kind, bit in (("query", QUERY), ("document", DOCUMENT)):
            if (model.query_prompt if kind == "query" else model.document_prompt) or model.append_eos:
                continue
            length = model.query_max_length if kind == "query" else model.document_max_length
            if model.position_limit is not None:  # as Embedder.tokenize clamps it
                length = min(length, model.position_limit)
            towers[length] = towers.get(length, 0) | bit
        for length, bits in towers.items():
            file = self.path.with_name(f"{self.path.stem}.{digest(texts.key, bits)[:16]}.L{length}.arrow")
            if not file.is_file():
                _tokenise_table(model.tokenizer, texts, bits, length, file)
                log.info("token ids of %s texts at max length %d written to %s", f"{len(texts):,}", length, file)
            self.tables.setdefault(length, []).append((texts, ListColumn(open_table(file).column("ids"))))

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


def _tokenise_table(tokenizer, texts, bits: int, max_length: int, file: Path) -> None:
    """Token ids of every text of ``texts`` (a TextTable) that a field of ``bits`` holds, in id order."""
    writer = Writer(file, pa.schema([("ids", pa.large_list(pa.int32()))]))
    try:
        for _, mask, chunk in texts.batches(bits):
            rows = np.flatnonzero(mask)  # positions in this batch of the texts to tokenise; the others are null
            done = 0
            for i in range(0, len(chunk), CHUNK):
                encoded = tokenizer(chunk[i:i + CHUNK], truncation=True, max_length=max_length,
                                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
                end = int(rows[i + len(encoded)]) if i + len(encoded) < len(rows) else len(mask)
                column = [None] * (end - done)
                for r, ids in zip(rows[i:i + len(encoded)], encoded):
                    column[int(r) - done] = ids
                writer.write({"ids": column})
                done = end
            if done < len(mask):
                writer.write({"ids": [None] * (len(mask) - done)})
        writer.close()
    except BaseException:
        writer.abort()
        raise
