"""Building, saving and loading embedders: the one module that reads and writes model folders.

:func:`from_pretrained` (``model=encoder``, ``model=llm``) builds an :class:`Embedder` and
:func:`from_pretrained_multi_vector` (``model=multi_vector``) a :class:`MultiVectorEmbedder` from a folder
or hub name; :func:`save` writes either; :func:`load` reads a saved model back for inference.

A saved model is a sentence-transformers folder (``modules.json``, ``1_Pooling``, ``2_Normalize``) plus
``embtune.json`` (pooling, prompts, EOS, max lengths, towers, Matryoshka dims, the run's config):

```
model/             the query tower (the only tower when weights are shared)
  document/        the document tower, a complete folder of the same layout (two towers only)
```

LoRA (``model.lora.save``): ``merged`` (default) folds the adapters into the weights
(W + (alpha/r)·B·A), so the folder loads like any plain model, in any tool; ``adapter`` writes only the
adapter (``adapter_config.json`` names the base model's folder as it was loaded), small but needing
peft and the base model wherever it is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from embtune.model import pooling as poolings
from embtune.model.embedder import Embedder
from embtune.model.llm import apply_lora, enable_gradient_checkpointing, ensure_pad_token, weight_dtype
from embtune.model.multi_vector import MultiVectorEmbedder
from embtune.model.resolve import resolve_model_path

log = logging.getLogger(__name__)

ST_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
POOLING_BY_ST_MODE = {"cls": poolings.CLS, "lasttoken": poolings.LastToken, "weightedmean": poolings.WeightedMean,
                      "max": poolings.Max, "mean": poolings.Mean}
DOCUMENT_TOWER = "document"
DENSE = "1_Dense"  # a multi-vector model's projection, as a sentence-transformers Dense on token embeddings


def from_pretrained(name_or_path: str, pooling: nn.Module | None = None, normalize: bool = True,
                    query_max_length: int = 64, document_max_length: int = 256, attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False, query_prompt: str = "", document_prompt: str = "",
                    append_eos: bool = False, shared_weights: bool = True, dtype: str = "float32", lora=None,
                    gradient_checkpointing: bool = False) -> Embedder:
    """An :class:`Embedder` from an encoder or decoder LLM, by local path or hub name (see
    :func:`embtune.model.resolve.resolve_model_path`).

    ``pooling=None`` takes the pooling stored with the model (embtune.json or sentence-transformers'
    1_Pooling/config.json), else mean pooling. ``shared_weights=False`` loads the weights twice: a
    query tower and a document tower, trained apart (the document tower from ``document/`` where the folder
    has one, as a saved two-tower model does). ``dtype``: see :func:`embtune.model.llm.weight_dtype`;
    ``lora``: see :func:`embtune.model.llm.apply_lora` (None: full fine-tuning). A tokenizer without a pad
    token pads with EOS (:func:`embtune.model.llm.ensure_pad_token`).
    """
    path, pooling, tokenizer, tower = _parts(name_or_path, pooling, attn_implementation, trust_remote_code, dtype,
                                             lora, gradient_checkpointing)
    document = None
    if not shared_weights:  # a saved two-tower model keeps its document tower in document/
        document = tower(Path(path) / DOCUMENT_TOWER if (Path(path) / DOCUMENT_TOWER).is_dir() else path)
    return Embedder(tower(path), tokenizer, pooling, normalize, query_max_length, document_max_length,
                    query_prompt=query_prompt, document_prompt=document_prompt, append_eos=append_eos,
                    document_encoder=document, lora_save=_lora_save(lora))


def from_pretrained_multi_vector(name_or_path: str, pooling: nn.Module | None = None, normalize: bool = True,
                                 query_max_length: int = 64, document_max_length: int = 256,
                                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                                 query_prompt: str = "", document_prompt: str = "", append_eos: bool = False,
                                 dtype: str = "float32", lora=None, gradient_checkpointing: bool = False,
                                 multi_vector_dim: int = 128) -> MultiVectorEmbedder:
    """A :class:`MultiVectorEmbedder` (token vectors of ``multi_vector_dim``) from a folder or hub name,
    with the projection stored in the folder's ``1_Dense`` if there is one (else a fresh one). Prompts,
    EOS, dtype, LoRA and gradient checkpointing as in :func:`from_pretrained`; one tower only, so there
    is no ``shared_weights``. ``pooling`` is accepted (the run passes one) and unused.

    Raises:
        ValueError: a stored projection whose shape is not (``multi_vector_dim``, hidden size).
    """
    path, pooling, tokenizer, tower = _parts(name_or_path, pooling, attn_implementation, trust_remote_code, dtype,
                                             lora, gradient_checkpointing)
    return MultiVectorEmbedder(tower(path), tokenizer, pooling, normalize, query_max_length, document_max_length,
                               multi_vector_dim, stored_projection(path), query_prompt=query_prompt,
                               document_prompt=document_prompt, append_eos=append_eos, lora_save=_lora_save(lora))


def builds_multi_vector(model_cfg) -> bool:
    """Whether a ``model`` config node builds a :class:`MultiVectorEmbedder` (``model=multi_vector``),
    judged from its ``_target_`` before anything loads."""
    return model_cfg.get("_target_") == "embtune.model.from_pretrained_multi_vector"


def _parts(name_or_path, pooling, attn_implementation, trust_remote_code, dtype, lora, gradient_checkpointing):
    """What both builders share: the local path, the pooling, the tokenizer (with a pad token) and a
    function that loads one tower from a folder (dtype, gradient checkpointing, LoRA applied)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if pooling is None:
        pooling = stored_pooling(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer, name_or_path)
    torch_dtype = weight_dtype(dtype, lora)

    def tower(folder):
        encoder = load_encoder(folder, attn_implementation, trust_remote_code, torch_dtype)
        if gradient_checkpointing:
            enable_gradient_checkpointing(encoder)
        return apply_lora(encoder, lora)

    return path, pooling, tokenizer, tower


def _lora_save(lora) -> str:
    return lora.get("save", "merged") if lora is not None else "merged"


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


def save(model, path: str | Path, matryoshka_dims: list[int] | None = None, config: dict | None = None) -> None:
    """Write ``model`` (an :class:`Embedder` or :class:`MultiVectorEmbedder`) to ``path``, in the layout above.

    A multi-vector model's projection is written as ``1_Dense`` (a sentence-transformers ``Dense`` on
    ``token_embeddings``, identity activation) in place of pooling and normalisation, and ``embtune.json``
    records ``multi_vector_dim``. The folder is written under a temporary name and renamed, so a crash
    never leaves half a model.
    With ``lora_save="merged"`` the adapters are merged into the weights in place: afterwards ``model``
    holds the plain merged encoder(s), which give the same embeddings.

    Raises:
        FileExistsError: ``path`` exists (a saved model is never overwritten).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; embtune never overwrites a saved model")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(model, tmp, matryoshka_dims, config)
    except BaseException:  # e.g. the disk is full: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, path)


def _write(model, tmp: Path, matryoshka_dims: list[int] | None, config: dict | None) -> None:
    model.encoder = _write_tower(model, model.encoder, tmp)
    if model.document_encoder is not None:
        model.document_encoder = _write_tower(model, model.document_encoder, tmp / DOCUMENT_TOWER)
    meta = {
        "pooling": type(model.pooling).__name__,
        "pooling_args": ({"exclude_prompt": model.pooling.exclude_prompt}
                         if hasattr(model.pooling, "exclude_prompt") else {}),
        "normalize": model.normalize, "query_max_length": model.query_max_length,
        "document_max_length": model.document_max_length, "query_prompt": model.query_prompt,
        "document_prompt": model.document_prompt, "append_eos": model.append_eos,
        "shared_weights": model.document_encoder is None,
        "matryoshka_dims": list(matryoshka_dims or []), "truncate_dim": model.truncate_dim,
        "config": config or {},
    }
    if isinstance(model, MultiVectorEmbedder):
        meta["multi_vector_dim"] = model.dim
    _write_json(tmp / "embtune.json", meta)
    for f in tmp.rglob("*"):  # some writers create files 0600 (mkstemp); a model is for sharing
        f.chmod(0o755 if f.is_dir() else 0o644)


def _write_tower(model, encoder, folder: Path):
    """One tower's weights, tokenizer and sentence-transformers files; returns the encoder to keep
    (the merged plain model after a merged LoRA save)."""
    folder.mkdir(exist_ok=True)
    if hasattr(encoder, "peft_config") and model.lora_save == "merged":
        encoder = encoder.merge_and_unload()
    encoder.save_pretrained(folder, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    mode = getattr(model.pooling, "st_mode", None)
    if isinstance(model, MultiVectorEmbedder):  # token vectors: no pooling, no per-text normalisation
        _write_dense(model.projection, folder / DENSE)
        modules.append({"idx": 1, "name": "1", "path": DENSE, "type": "sentence_transformers.models.Dense"})
    elif mode is not None:
        (folder / "1_Pooling").mkdir()
        flags = {flag: False for flag in ST_FLAGS.values()} | {"pooling_mode_mean_sqrt_len_tokens": False}
        flags[ST_FLAGS[mode]] = True
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": encoder.config.hidden_size, **flags,  # per token, not truncated
            "include_prompt": not getattr(model.pooling, "exclude_prompt", False)})
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if model.normalize and not isinstance(model, MultiVectorEmbedder):
        (folder / "2_Normalize").mkdir()
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": model.document_max_length, "do_lower_case": False})
    prompts = {k: p for k, p in (("query", model.query_prompt), ("document", model.document_prompt)) if p}
    _write_json(folder / "config_sentence_transformers.json",
                {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    return encoder


def _write_dense(projection: nn.Linear, folder: Path) -> None:
    folder.mkdir()
    save_file({"linear.weight": projection.weight.detach().cpu().contiguous()}, str(folder / "model.safetensors"))
    _write_json(folder / "config.json", {
        "in_features": projection.in_features, "out_features": projection.out_features, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
        "module_input_name": "token_embeddings", "module_output_name": "token_embeddings"})


def stored_projection(path: str | Path) -> Tensor | None:
    """The projection weight [D,H] saved in a model folder's ``1_Dense``, or None."""
    file = Path(path) / DENSE / "model.safetensors"
    return load_file(str(file))["linear.weight"] if file.is_file() else None


def stored_pooling(path: str | Path) -> nn.Module:
    """The pooling recorded in a model folder (embtune.json, else 1_Pooling/config.json), else Mean."""
    path = Path(path)
    meta = path / "embtune.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return getattr(poolings, m["pooling"])(**m.get("pooling_args", {}))
    st = path / "1_Pooling" / "config.json"
    if st.is_file():
        conf = json.loads(st.read_text())
        for mode, cls in POOLING_BY_ST_MODE.items():
            if conf.get(ST_FLAGS[mode]):
                pool = cls()
                if hasattr(pool, "exclude_prompt"):
                    pool.exclude_prompt = not conf.get("include_prompt", True)
                return pool
    return poolings.Mean()


def load(name_or_path: str, device: str | None = None, truncate_dim: int | None = None):
    """Load a model for inference: ``embtune.load(path).encode(texts, kind="query") -> float32 [N, D]``.

    Reads pooling, prompts, EOS, normalisation, max lengths and the towers from ``embtune.json`` when
    embtune saved the model (the ``document/`` tower encodes ``kind="document"``); for other encoders
    uses sentence-transformers' stored pooling (else mean) and normalises. A LoRA adapter folder loads
    its base model (peft must be installed and the base folder present). A multi-vector model
    (``multi_vector_dim`` in embtune.json) comes back with its projection, and ``encode`` returns token
    vectors (:class:`embtune.objectives.maxsim.TokenVectors`).

    Args:
        truncate_dim: Matryoshka: embeddings of this many dims (the first ones, re-normalised). A dim
            the model was not trained at (``matryoshka_dims`` in embtune.json) is allowed, with a warning.
            None: the ``truncate_dim`` the model was saved with (a model loaded truncated, then saved),
            else the full size.
    Raises:
        ValueError: ``truncate_dim`` outside 1..D, or given for a multi-vector model.
    """
    path = Path(resolve_model_path(name_or_path))
    build, kwargs = from_pretrained, {}
    meta = path / "embtune.json"
    m = json.loads(meta.read_text()) if meta.is_file() else None
    if m is not None:
        kwargs = dict(normalize=m["normalize"], query_max_length=m["query_max_length"],
                      document_max_length=m["document_max_length"], query_prompt=m.get("query_prompt", ""),
                      document_prompt=m.get("document_prompt", ""), append_eos=m.get("append_eos", False),
                      shared_weights=m.get("shared_weights", True))
        if m.get("multi_vector_dim"):
            build = from_pretrained_multi_vector
            kwargs.update(multi_vector_dim=m["multi_vector_dim"])
            del kwargs["shared_weights"]
    else:
        st = path / "sentence_bert_config.json"
        if st.is_file():
            n = json.loads(st.read_text()).get("max_seq_length", 256)
            kwargs = dict(query_max_length=n, document_max_length=n)
        modules = path / "modules.json"  # sentence-transformers lists a Normalize module when it normalises
        kwargs["normalize"] = not modules.is_file() or any(
            "Normalize" in module["type"] for module in json.loads(modules.read_text()))
    model = build(str(path), **kwargs)
    if truncate_dim is None and m is not None:  # a model saved after loading with truncate_dim keeps it
        truncate_dim = m.get("truncate_dim")
    if truncate_dim is not None:
        _set_truncate_dim(model, truncate_dim, (m or {}).get("matryoshka_dims") or [], path)
    return model.to(device) if device else model


def _set_truncate_dim(model, d: int, trained: list[int], path: Path) -> None:
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
