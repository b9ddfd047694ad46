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
adapter (``adapter_config.json`` names the base model by the hub id it was named by, else by its local
folder), small but needing peft and the base model wherever it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from embtune.model.embedder import Embedder
from embtune.model.llm import apply_lora, enable_gradient_checkpointing, ensure_pad_token, weight_dtype
from embtune.model.multi_vector import MultiVectorEmbedder
from embtune.model.resolve import hub_id, resolve_model_path
from embtune.model.st_files import DENSE, st_differences, write_json, write_st_files
from embtune.model.stored import POOLING_BY_NAME, fit_lengths, inherit, keep_st_settings, read_stored

log = logging.getLogger(__name__)

DOCUMENT_TOWER = "document"


def from_pretrained(name_or_path: str, pooling: nn.Module | None = None, normalize: bool | None = None,
                    query_max_length: int | None = None, document_max_length: int | None = None,
                    attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                    query_prompt: str | None = None, document_prompt: str | None = None, append_eos: bool = False,
                    shared_weights: bool = True, dtype: str = "float32", lora=None,
                    gradient_checkpointing: bool = False, unpad: Literal["auto", False] = "auto",
                    fallback: dict | None = None) -> Embedder:
    """An :class:`Embedder` from an encoder or decoder LLM, by local path or hub name (see
    :func:`embtune.model.resolve_model_path`). Inherit, then override:

    ``pooling``, ``normalize``, the max lengths and the prompts left None take what the model stores
    (:func:`embtune.model.stored.read_stored`: embtune.json, else sentence-transformers' 1_Pooling,
    modules.json, prompts and ``max_seq_length``, one length for queries and documents), else
    ``fallback`` (``pooling`` named as in ``conf/pooling``, ``normalize``, ``query_max_length``,
    ``document_max_length``; prompts fall back to none); a value given wins. One INFO line says what
    was inherited and from where. Both lengths are then cut to the model's position limit
    (:func:`embtune.model.stored.position_limit`), with one warning naming both numbers.

    ``shared_weights=False`` loads the weights twice: a query tower and a document tower, trained apart
    (the document tower from ``document/`` where the folder has one, as a saved two-tower model does).
    ``dtype``: see :func:`embtune.model.llm.weight_dtype`; ``lora``: see :func:`embtune.model.llm.apply_lora`
    (None: full fine-tuning). A tokenizer without a pad token pads with EOS
    (:func:`embtune.model.llm.ensure_pad_token`). ``unpad``: ``auto`` runs the linear and feed-forward
    layers on real tokens only where the architecture allows (:mod:`embtune.model.unpad`), ``False``
    never (``Embedder.unpad``).

    Raises:
        ValueError: a stored pooling embtune cannot express, or an unknown ``fallback.pooling``.
    """
    path, tokenizer, tower = _parts(name_or_path, attn_implementation, trust_remote_code, dtype, lora,
                                    gradient_checkpointing)
    stored, s = _inherited(name_or_path, path, fallback, pooling=pooling, normalize=normalize,
                           query_max_length=query_max_length, document_max_length=document_max_length,
                           query_prompt=query_prompt, document_prompt=document_prompt)
    document = None
    if not shared_weights:  # a saved two-tower model keeps its document tower in document/
        document = tower(Path(path) / DOCUMENT_TOWER if (Path(path) / DOCUMENT_TOWER).is_dir() else path)
    model = Embedder(tower(path), tokenizer, s["pooling"], s["normalize"], s["query_max_length"],
                     s["document_max_length"], query_prompt=s["query_prompt"], document_prompt=s["document_prompt"],
                     append_eos=append_eos, document_encoder=document, lora_save=_lora_save(lora))
    model.unpad = unpad == "auto"
    return _finished(model, name_or_path, stored)


def from_pretrained_multi_vector(name_or_path: str, pooling: nn.Module | None = None, normalize: bool | None = None,
                                 query_max_length: int | None = None, document_max_length: int | None = None,
                                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                                 query_prompt: str | None = None, document_prompt: str | None = None,
                                 append_eos: bool = False, dtype: str = "float32", lora=None,
                                 gradient_checkpointing: bool = False, multi_vector_dim: int = 128,
                                 unpad: Literal["auto", False] = "auto",
                                 fallback: dict | None = None) -> MultiVectorEmbedder:
    """A :class:`MultiVectorEmbedder` (token vectors of ``multi_vector_dim``) from a folder or hub name,
    with the projection stored in the folder's ``1_Dense`` if there is one (else a fresh one). Settings
    are inherited, then overridden, and lengths cut, and ``unpad`` read, as in :func:`from_pretrained`; one
    tower only, so there is no ``shared_weights``. ``pooling`` is accepted (the run passes one) and unused.

    Raises:
        ValueError: a stored projection whose shape is not (``multi_vector_dim``, hidden size).
    """
    path, tokenizer, tower = _parts(name_or_path, attn_implementation, trust_remote_code, dtype, lora,
                                    gradient_checkpointing)
    stored, s = _inherited(name_or_path, path, fallback, pooling=pooling, normalize=normalize,
                           query_max_length=query_max_length, document_max_length=document_max_length,
                           query_prompt=query_prompt, document_prompt=document_prompt)
    model = MultiVectorEmbedder(tower(path), tokenizer, s["pooling"], s["normalize"], s["query_max_length"],
                                s["document_max_length"], multi_vector_dim, stored_projection(path),
                                query_prompt=s["query_prompt"], document_prompt=s["document_prompt"],
                                append_eos=append_eos, lora_save=_lora_save(lora))
    model.unpad = unpad == "auto"
    return _finished(model, name_or_path, stored)


def builds_multi_vector(model_cfg) -> bool:
    """Whether a ``model`` config node builds a :class:`MultiVectorEmbedder` (``model=multi_vector``),
    judged from its ``_target_`` before anything loads."""
    return model_cfg.get("_target_") == "embtune.model.from_pretrained_multi_vector"


def _inherited(name_or_path: str, path, fallback: dict | None, **given) -> tuple[dict, dict]:
    """The folder's stored settings and the settings the model gets (``given`` wins, then stored, then
    ``fallback``; :func:`embtune.model.stored.inherit`)."""
    stored = read_stored(path)
    return stored, inherit(name_or_path, stored, fallback, **given)


def _finished(model, name_or_path: str, stored: dict):
    """What both builders do last: record the base's hub id, keep sentence-transformers' own settings,
    cut the lengths to the position limit."""
    model.base_hub_id = hub_id(name_or_path)
    keep_st_settings(model, stored)
    return fit_lengths(model, name_or_path)


def _parts(name_or_path, attn_implementation, trust_remote_code, dtype, lora, gradient_checkpointing):
    """What both builders share: the local path, the tokenizer (with a pad token) and a function that
    loads one tower from a folder (dtype, gradient checkpointing, LoRA applied)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer, name_or_path)
    torch_dtype = weight_dtype(dtype, lora)

    def tower(folder):
        encoder = load_encoder(folder, attn_implementation, trust_remote_code, torch_dtype)
        if gradient_checkpointing:
            enable_gradient_checkpointing(encoder)
        return apply_lora(encoder, lora)

    return path, tokenizer, tower


def _lora_save(lora) -> str:
    return lora.get("save", "merged") if lora is not None else "merged"


def load_encoder(path: str | Path, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
    """The transformers base model in ``path`` (a causal LM's checkpoint loads without its LM head; a
    peft adapter folder loads its base model plus the adapter, the base found by
    :func:`embtune.model.resolve_model_path` from the hub id or path ``adapter_config.json`` names). The
    KV cache is turned off: an embedder never generates, and gradient checkpointing refuses it."""
    from transformers import AutoModel

    kwargs = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code, "dtype": dtype}
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file() and not (Path(path) / "config.json").is_file():  # an adapter only, as transformers reads it
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        encoder = AutoModel.from_pretrained(resolve_model_path(base), **kwargs)
        encoder.load_adapter(str(path))
    else:
        encoder = AutoModel.from_pretrained(path, **kwargs)
    if getattr(encoder.config, "use_cache", None):
        encoder.config.use_cache = False
    return encoder


def save(model, path: str | Path, matryoshka_dims: list[int] | None = None, config: dict | None = None) -> None:
    """Write ``model`` (an :class:`Embedder` or :class:`MultiVectorEmbedder`) to ``path``, in the layout above,
    with the effective settings (inherited or set) in ``embtune.json`` and in sentence-transformers' files
    (:func:`embtune.model.st_files.write_st_files`). What ``SentenceTransformer(path)`` cannot reproduce
    is one WARNING (:func:`embtune.model.st_files.st_differences`) and ``embtune.json``'s
    ``sentence_transformers_differs``.

    A multi-vector model's projection is written as ``1_Dense`` (a sentence-transformers ``Dense`` on
    ``token_embeddings``) in place of pooling and normalisation, and ``embtune.json`` records
    ``multi_vector_dim``. The folder is written under a temporary name and renamed, so a crash never
    leaves half a model. With ``lora_save="merged"`` the adapters are merged into the weights in place:
    afterwards ``model`` holds the plain merged encoder(s), which give the same embeddings.

    Raises:
        FileExistsError: ``path`` exists (a saved model is never overwritten).
        ValueError: EOS appended by embtune but the tokenizer cannot be made to append it itself.
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
    differs = st_differences(model)
    model.encoder = _write_tower(model, model.encoder, tmp, model.query_max_length)
    if model.document_encoder is not None:
        model.document_encoder = _write_tower(model, model.document_encoder, tmp / DOCUMENT_TOWER,
                                              model.document_max_length)
    meta = {
        "pooling": type(model.pooling).__name__,
        "pooling_args": ({"exclude_prompt": model.pooling.exclude_prompt}
                         if hasattr(model.pooling, "exclude_prompt") else {}),
        "normalize": model.normalize, "query_max_length": model.query_max_length,
        "document_max_length": model.document_max_length, "query_prompt": model.query_prompt,
        "document_prompt": model.document_prompt, "append_eos": model.append_eos,
        "prompts": model.named_prompts, "document_prompt_name": model.document_prompt_name,
        "default_prompt_name": model.default_prompt_name,
        "shared_weights": model.document_encoder is None,
        "matryoshka_dims": list(matryoshka_dims or []), "truncate_dim": model.truncate_dim,
        "sentence_transformers_differs": differs,
        "config": config or {},
    }
    if isinstance(model, MultiVectorEmbedder):
        meta["multi_vector_dim"] = model.dim
    write_json(tmp / "embtune.json", meta)
    for f in tmp.rglob("*"):  # some writers create files 0600 (mkstemp); a model is for sharing
        f.chmod(0o755 if f.is_dir() else 0o644)
    if differs:
        log.warning("saved %s: SentenceTransformer(%s) differs from embtune.load: %s", tmp.name.removesuffix(".tmp"),
                    tmp.name.removesuffix(".tmp"), "; ".join(differs))


def _write_tower(model, encoder, folder: Path, query_max_length: int):
    """One tower's weights, tokenizer and sentence-transformers files; returns the encoder to keep
    (the merged plain model after a merged LoRA save)."""
    folder.mkdir(exist_ok=True)
    if hasattr(encoder, "peft_config") and model.lora_save == "merged":
        encoder = encoder.merge_and_unload()
    encoder.save_pretrained(folder, safe_serialization=True)
    adapter = folder / "adapter_config.json"
    if model.base_hub_id and adapter.is_file():  # peft wrote the folder the base loaded from (a cache path)
        write_json(adapter, {**json.loads(adapter.read_text()), "base_model_name_or_path": model.base_hub_id})
    write_st_files(model, encoder, model.tokenizer, folder, query_max_length)
    return encoder


def stored_projection(path: str | Path) -> Tensor | None:
    """The projection weight [D,H] saved in a model folder's ``1_Dense``, or None."""
    file = Path(path) / DENSE / "model.safetensors"
    return load_file(str(file))["linear.weight"] if file.is_file() else None


def stored_pooling(path: str | Path) -> nn.Module:
    """The pooling recorded in a model folder (embtune.json, else sentence-transformers' Pooling
    config), else Mean."""
    return read_stored(path).values.get("pooling") or POOLING_BY_NAME["mean"]()


def load(name_or_path: str, device: str | None = None, truncate_dim: int | None = None):
    """Load a model for inference: ``embtune.load(path).encode(texts, kind="query") -> float32 [N, D]``.

    Everything :func:`from_pretrained` inherits comes from ``embtune.json`` when embtune saved the model
    (plus EOS and the towers: the ``document/`` tower encodes ``kind="document"``), else from
    sentence-transformers' files, else embtune's fallback; lengths are cut to the position limit. A LoRA
    adapter folder loads its base model (peft must be installed and the base folder present). A
    multi-vector model (``multi_vector_dim`` in embtune.json) comes back with its projection, and
    ``encode`` returns token vectors (:class:`embtune.objectives.maxsim.TokenVectors`).

    Args:
        truncate_dim: Matryoshka: embeddings of this many dims (the first ones, re-normalised). A dim
            the model was not trained at (``matryoshka_dims`` in embtune.json) is allowed, with a warning.
            None: the ``truncate_dim`` the model was saved with (a model loaded truncated, then saved),
            else the full size.
    Raises:
        ValueError: ``truncate_dim`` outside 1..D, or given for a multi-vector model.
    """
    path = Path(resolve_model_path(name_or_path))
    meta = path / "embtune.json"
    m = json.loads(meta.read_text()) if meta.is_file() else {}
    with _no_loading_bar():
        if m.get("multi_vector_dim"):
            model = from_pretrained_multi_vector(str(path), append_eos=m.get("append_eos", False),
                                                 multi_vector_dim=m["multi_vector_dim"])
        else:
            model = from_pretrained(str(path), append_eos=m.get("append_eos", False),
                                    shared_weights=m.get("shared_weights", True))
    if truncate_dim is None:  # a model saved after loading with truncate_dim keeps it
        truncate_dim = m.get("truncate_dim")
    if truncate_dim is not None:
        _set_truncate_dim(model, truncate_dim, m.get("matryoshka_dims") or [], path)
    return model.to(device) if device else model


@contextlib.contextmanager
def _no_loading_bar():
    """transformers' "Loading weights" bar off while :func:`load` reads the weights (the command line turns the
    libraries' bars off for good: ``embtune.run.progress.quiet_libraries``), then the caller's setting again:
    transformers' bars and huggingface_hub's (which transformers switches with its own)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    bars, hub_bars = transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        if hub_bars != (not are_progress_bars_disabled()):
            (enable_progress_bars if hub_bars else disable_progress_bars)()


def _set_truncate_dim(model, d: int, trained: list[int], path: Path) -> None:
    if model.multi_vector:
        raise ValueError(f"{path}: truncate_dim applies to single-vector models; this one is multi-vector")
    if not 1 <= d <= model.dim:
        raise ValueError(f"{path}: truncate_dim={d} outside 1..{model.dim} (the embedding size)")
    if d not in trained and d != model.dim:
        trained_at = f"Matryoshka dims {trained}" if trained else f"its full size {model.dim} only"
        log.warning("%s was trained at %s, not %d: truncated embeddings may be poor", path, trained_at, d)
    model.truncate_dim = d
