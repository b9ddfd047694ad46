"""The embedder: a Hugging Face encoder or decoder LLM, a pooling, optional L2 normalisation.

``Embedder`` tokenises (prompts, EOS) and encodes token batches for training and lists of texts for
evaluation, with one shared tower or a query and a document tower. Building one from a model folder,
saving and loading live in :mod:`embtune.model.io`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.model import kernels
from embtune.model.llm import append_eos as _append_eos
from embtune.model.llm import position_ids
from embtune.model.unpad import hidden_states as unpadded_hidden_states
from embtune.model.unpad import supported as unpad_supported
from embtune.training.precision import use_bf16

KINDS = ("query", "document")


class Embedder(nn.Module):
    """Encoder + pooling (+ L2 normalisation): texts -> embeddings [B,D].

    Args:
        encoder: a transformers ``PreTrainedModel`` (or a peft model around one) returning
            ``last_hidden_state`` [B,T,H]; the only tower, or the query tower when ``document_encoder``
            is given.
        tokenizer: its tokenizer (with a pad token).
        pooling: a module ``(hidden [B,T,H], attention_mask [B,T]) -> [B,H]`` (see ``embtune.model.pooling``).
        normalize: L2-normalise the output, so dot product = cosine similarity.
        query_max_length, document_max_length: truncation lengths in tokens, prompt and EOS included.
        query_prompt, document_prompt: instructions prepended to every query / document text.
        append_eos: end every text in exactly one EOS token (decoder LLMs; see :func:`embtune.model.llm.append_eos`).
        document_encoder: a second tower for documents (asymmetric dual encoder); None shares ``encoder``.
        lora_save: how a LoRA model is saved, ``merged`` or ``adapter`` (see :mod:`embtune.model.io`).

    ``truncate_dim`` (set by ``load(path, truncate_dim=d)``): keep the first d coordinates of each
    embedding, then normalise (Matryoshka; see ``embtune.objectives.matryoshka``).

    ``bf16`` (set by the training loop from ``train.bf16``, and by :meth:`encode`): the tower's forward
    runs under bf16 autocast; its hidden states are cast to fp32, so pooling, normalisation and every
    score and loss computed from the embeddings are fp32.

    ``unpad`` (``model.unpad``; default True): a BERT, RoBERTa or XLM-R tower runs its linear and
    feed-forward layers on real tokens only (:mod:`embtune.model.unpad`; the same hidden states, dropout
    drawn on the real tokens only); other towers, or False, take the plain padded forward.

    Raises:
        ValueError: ``append_eos`` with a tokenizer that has no EOS token.
    """

    multi_vector = False
    truncate_dim: int | None = None
    base_hub_id: str | None = None  # the hub id the model was named by (embtune.model.io): a saved adapter's base
    bf16 = False
    unpad = True

    def __init__(self, encoder, tokenizer, pooling: nn.Module, normalize: bool = True,
                 query_max_length: int = 64, document_max_length: int = 256, query_prompt: str = "",
                 document_prompt: str = "", append_eos: bool = False, document_encoder=None,
                 lora_save: str = "merged"):
        super().__init__()
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("model.append_eos=true, but the tokenizer has no EOS token")
        self.encoder = encoder
        self.document_encoder = document_encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.query_prompt, self.document_prompt = query_prompt or "", document_prompt or ""
        self.append_eos = append_eos
        self.lora_save = lora_save
        self.token_cache = None  # an embtune.data.token_cache.TokenCache: token ids shared by a sweep's jobs
        self.position_limit: int | None = None  # the longest input the model takes (set by embtune.model.io)
        # sentence-transformers settings embtune has no option for, kept so that a save writes them back
        self.named_prompts: dict[str, str] = {}
        self.document_prompt_name = "document"
        self.default_prompt_name: str | None = None

    @property
    def dim(self) -> int:
        return self.truncate_dim or self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tower(self, kind: str):
        """The encoder for ``kind`` ("query" or "document"): the same one unless there are two towers."""
        if kind not in KINDS:
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        return self.document_encoder if kind == "document" and self.document_encoder is not None else self.encoder

    def tokenize(self, texts: list[str], max_length: int | None = None, kind: str = "document") -> dict[str, Tensor]:
        """Prepend the ``kind``'s prompt, tokenise (at most ``max_length`` tokens, default the kind's max
        length, never beyond ``position_limit``), append EOS when configured, pad to the longest text.

        Returns ``input_ids`` and ``attention_mask`` [B,T] (padded on the tokenizer's ``padding_side``),
        plus ``prompt_mask`` [B,T] when the pooling excludes a non-empty prompt (see :func:`_prompt_mask`).
        Through ``token_cache`` when one is set and this kind has no prompt and no EOS is appended (the
        cache keys plain texts; with a prompt or EOS the tokenizer runs, so the ids are always right).

        Raises:
            ValueError: a prompt to exclude with a slow tokenizer (no offsets), or max_length < 2 with EOS.
        """
        if max_length is None:
            max_length = self.query_max_length if kind == "query" else self.document_max_length
        if self.position_limit is not None:  # an explicit max_length stays within the position table too
            max_length = min(max_length, self.position_limit)
        prompt = self.query_prompt if kind == "query" else self.document_prompt
        if self.token_cache is not None and not prompt and not self.append_eos:
            return self.token_cache.tokenize(self.tokenizer, texts, max_length)
        with_prompt_mask = bool(prompt) and getattr(self.pooling, "exclude_prompt", False)
        if with_prompt_mask and not self.tokenizer.is_fast:
            raise ValueError("pooling.exclude_prompt=true needs a fast tokenizer (token offsets) to find the prompt")
        enc = self.tokenizer([prompt + t for t in texts], truncation=True, max_length=max_length,
                             return_offsets_mapping=with_prompt_mask, return_special_tokens_mask=with_prompt_mask)
        rows = {"input_ids": enc["input_ids"]}
        if with_prompt_mask:
            rows["prompt_mask"] = [_prompt_mask(offs, sp, len(prompt))
                                   for offs, sp in zip(enc["offset_mapping"], enc["special_tokens_mask"])]
        if self.append_eos:
            rows = _append_eos(rows, self.tokenizer.eos_token_id, max_length)
        return _pad(rows, self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def unpadded(self, kind: str = "document", **kwargs) -> bool:
        """Whether :meth:`hidden_states` runs ``kind``'s tower unpadded (``unpad`` and
        :func:`embtune.model.unpad.supported`) with these extra forward keywords."""
        return bool(self.unpad) and unpad_supported(self.tower(kind), **kwargs)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, kind: str = "document", **kwargs) -> Tensor:
        """``kind``'s tower's last hidden state [B,T,H]. Left-padded rows get positions counted from
        their first real token, so padding never shifts a text's positions. With ``bf16``: computed
        under bf16 autocast, returned in fp32. Unpadded where :meth:`unpadded` says so (values at the
        pads are then zeros; poolings mask them)."""
        if not bool(attention_mask[:, 0].all()):
            kwargs.setdefault("position_ids", position_ids(attention_mask))
        if not self.bf16:  # no autocast context at all: a caller's own one stays in force
            return self._last_hidden(input_ids, attention_mask, kind, kwargs)
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16):
            hidden = self._last_hidden(input_ids, attention_mask, kind, kwargs)
        return hidden.float()

    def _last_hidden(self, input_ids: Tensor, attention_mask: Tensor, kind: str, kwargs: dict) -> Tensor:
        if self.unpadded(kind, **kwargs):
            return unpadded_hidden_states(self.tower(kind), input_ids, attention_mask, **kwargs)
        return self.tower(kind)(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor | None = None,
                kind: str = "document", **kwargs) -> Tensor:
        """Token ids [B,T], mask [B,T] (and prompt mask [B,T]) -> embeddings [B,D] from ``kind``'s tower
        (unit length when ``normalize``; the first ``truncate_dim`` coordinates when set, truncated
        before normalising)."""
        hidden = self.hidden_states(input_ids, attention_mask, kind, **kwargs)
        if prompt_mask is not None:
            emb = self.pooling(hidden, attention_mask, prompt_mask)
        else:
            emb = self.pooling(hidden, attention_mask)
        if self.truncate_dim:  # truncate *then* normalise (Matryoshka)
            emb = emb[:, :self.truncate_dim]
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str] | str, kind: str = "document", batch_size: int = 64,
               max_length: int | None = None, progress: Callable[[int], None] | None = None,
               bf16: bool | str = False) -> np.ndarray:
        """Encode texts in length-sorted batches (less padding), returned in input order. One string gives one
        vector [D] (as sentence-transformers' ``encode``), never a vector per character.

        Args:
            kind: "query" or "document": picks the tower, the prompt and (when ``max_length`` is None)
                the max length.
            progress: called with each batch's number of texts once it is encoded (a progress bar,
                :func:`embtune.run.progress.encoding_progress`).
            bf16: False (default): fp32, the same vectors on every machine (as sentence-transformers'
                ``encode``); "auto": the tower in bf16 autocast where the device computes bf16 natively
                (:func:`embtune.training.precision.use_bf16`; evaluation and ``eval.bf16`` use it), about
                1e-3 from the fp32 vectors; True: bf16, refused where it would be emulated.
        Returns:
            float32 array [N, D] ([D] for one string).
        Raises:
            ValueError: a ``kind`` or ``bf16`` value that is not one of the above.
        """
        if isinstance(texts, str):
            return self.encode([texts], kind, batch_size, max_length, progress, bf16)[0]
        self.tower(kind)  # checks kind
        on = use_bf16(bf16, self.device, option="encode(bf16=...)")
        was_training, was_bf16, was_unpad = self.training, self.bf16, self.unpad
        self.eval()
        # length-sorted batches hold little padding: gathering the real tokens costs more than it saves
        # (SciFact corpus, all-MiniLM-L6-v2: padded 41 vs unpadded 37 docs/s in fp32, 120 vs 106 in bf16)
        self.bf16, self.unpad = on, False
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        dtype = torch.bfloat16 if on else torch.float32  # oneDNN: prepacked weights, bias and GELU fused
        try:
            with kernels.fused_linear(self, self.device.type == "cpu", dtype):
                for i in range(0, len(texts), batch_size):
                    idx = order[i:i + batch_size]
                    batch = self.tokenize([texts[j] for j in idx], max_length, kind)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    out[idx] = self(**batch, kind=kind).float().cpu().numpy()
                    if progress is not None:
                        progress(len(idx))
        finally:
            self.train(was_training)
            self.bf16, self.unpad = was_bf16, was_unpad
        return out

def _prompt_mask(offsets: list[tuple[int, int]], special: list[int], prompt_chars: int) -> list[int]:
    """1 on the prompt's tokens and on the special tokens before them ([CLS], BOS), 0 on the text's.

    A token belongs to the prompt when its characters end inside the prompt (fast-tokenizer offsets),
    so a word merged across the prompt's end (byte-level BPE's " how") counts as text. Leading special
    tokens count as prompt as in sentence-transformers' ``include_prompt=False``, which masks the
    tokens of the tokenised prompt, [CLS] included; with WordPiece both mask the same tokens.
    """
    first_text = next((i for i, s in enumerate(special) if not s), len(special))
    return [int(i < first_text or (not s and end <= prompt_chars))
            for i, ((_, end), s) in enumerate(zip(offsets, special))]


def _pad(rows: dict[str, list[list[int]]], pad_id: int, side: str) -> dict[str, Tensor]:
    """Pad token-id lists to the longest, on ``side`` ("left" or "right"): ``input_ids`` with ``pad_id``,
    masks with 0; adds ``attention_mask``. Returns [B,T] int64 tensors."""
    T = max((len(ids) for ids in rows["input_ids"]), default=0)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("prompt_mask", 0)):
        source = rows["input_ids"] if key == "attention_mask" else rows.get(key)
        if source is None:
            continue
        padded = []
        for row in source:
            row = [1] * len(row) if key == "attention_mask" else list(row)
            pad = [fill] * (T - len(row))
            padded.append(pad + row if side == "left" else row + pad)
        out[key] = torch.tensor(padded, dtype=torch.long)
    return out
