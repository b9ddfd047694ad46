"""What a model folder says about itself, what a run takes from it, and how far its positions reach.

:func:`read_stored` reads the settings a starting model carries: ``embtune.json`` for a folder embtune
saved; else sentence-transformers' files (``modules.json``, the Pooling module's ``config.json``,
``config_sentence_transformers.json``, ``sentence_bert_config.json``); a plain transformers checkpoint
stores none. :func:`inherit` resolves each option (given, else stored, else embtune's fallback) and logs
the one line saying so; :func:`position_limit` is the longest input the model's position table and
tokenizer allow, and :func:`fit_lengths` cuts a model's max lengths to it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from embtune.model import pooling as poolings

log = logging.getLogger(__name__)

ST_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
POOLING_BY_ST_MODE = {"cls": poolings.CLS, "lasttoken": poolings.LastToken, "weightedmean": poolings.WeightedMean,
                      "max": poolings.Max, "mean": poolings.Mean}
POOLING_BY_NAME = {"mean": poolings.Mean, "cls": poolings.CLS, "max": poolings.Max,
                   "weighted_mean": poolings.WeightedMean, "last_token": poolings.LastToken}  # conf/pooling/ names
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # sentence-transformers' encode_document, in its order
# what a model=... config falls back to where the starting model stores nothing (conf/model/*.yaml `fallback`)
FALLBACK = {"pooling": "mean", "normalize": True, "query_max_length": 64, "document_max_length": 256}
INHERITED = ("pooling", "normalize", "query_max_length", "document_max_length", "query_prompt", "document_prompt")
# tokenizers without a declared limit report transformers' VERY_LARGE_INTEGER (int(1e30)) as model_max_length
NO_TOKENIZER_LIMIT = int(1e29)


@dataclass
class Stored:
    """Settings a model folder stores: ``values[option]`` and the file it came from, ``sources[option]``.

    Options: ``pooling`` (a module), ``normalize``, ``query_max_length``, ``document_max_length``,
    ``query_prompt``, ``document_prompt``, ``prompts`` (every named prompt), ``document_prompt_name``,
    ``default_prompt_name``, ``similarity_fn_name``; only those the folder states are present.
    """

    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    def set(self, option: str, value, source: str) -> None:
        self.values[option], self.sources[option] = value, source


def read_stored(path: str | Path) -> Stored:
    """The settings stored in ``path`` (embtune.json first, else sentence-transformers' files).

    Raises:
        ValueError: a sentence-transformers pooling embtune has no equivalent for (``mean_sqrt_len_tokens``,
            or several modes concatenated), naming the file.
    """
    path = Path(path)
    stored = Stored()
    meta = path / "embtune.json"
    if meta.is_file():
        _read_embtune(json.loads(meta.read_text()), stored)
    else:
        _read_sentence_transformers(path, stored)
    return stored


def _read_embtune(m: dict, stored: Stored) -> None:
    src = "embtune.json"
    stored.set("pooling", getattr(poolings, m["pooling"])(**m.get("pooling_args", {})), src)
    for option in ("normalize", "query_max_length", "document_max_length", "query_prompt", "document_prompt",
                   "prompts", "document_prompt_name", "default_prompt_name", "similarity_fn_name"):
        if m.get(option) is not None:
            stored.set(option, m[option], src)


def _read_sentence_transformers(path: Path, stored: Stored) -> None:
    modules_file = path / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    pooling_dir = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    if pooling_dir is None and not modules and (path / "1_Pooling").is_dir():
        pooling_dir = "1_Pooling"
    if pooling_dir is not None and (path / pooling_dir / "config.json").is_file():
        file = f"{pooling_dir}/config.json"
        stored.set("pooling", st_pooling(json.loads((path / file).read_text()), path / file), file)
    settings_file = path / "config_sentence_transformers.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    src = "config_sentence_transformers.json"
    if modules:
        similarity = settings.get("similarity_fn_name")
        if any(m["type"].endswith("Normalize") for m in modules):
            stored.set("normalize", True, "modules.json: Normalize")
        elif similarity in (None, "cosine"):  # cosine of raw vectors = dot product of normalised ones
            stored.set("normalize", True, f"{src}: cosine similarity")
        else:
            stored.set("normalize", False, f"{src}: similarity_fn_name={similarity}, no Normalize")
        if similarity not in (None, "cosine", "dot"):
            log.warning("%s: similarity_fn_name=%s; embtune scores by %s", path, similarity,
                        "cosine" if stored.values["normalize"] else "dot product")
        if similarity is not None:
            stored.set("similarity_fn_name", similarity, src)
    prompts = {k: v for k, v in (settings.get("prompts") or {}).items() if v is not None}
    if prompts:
        stored.set("prompts", prompts, src)
        if prompts.get("query"):
            stored.set("query_prompt", prompts["query"], src)
        name = next((n for n in DOCUMENT_PROMPT_NAMES if n in prompts), None)
        if name is not None:
            stored.set("document_prompt_name", name, src)
            if prompts[name]:
                stored.set("document_prompt", prompts[name], src)
    if settings.get("default_prompt_name"):
        stored.set("default_prompt_name", settings["default_prompt_name"], src)
    lengths_file = path / "sentence_bert_config.json"
    if lengths_file.is_file():
        lengths = json.loads(lengths_file.read_text())
        src = "sentence_bert_config.json"
        for option, key in (("query_max_length", "query_length"), ("document_max_length", "document_length")):
            value = lengths.get(key) or lengths.get("max_seq_length")  # one max_seq_length for both sides
            if value:
                stored.set(option, int(value), src)


def st_pooling(conf: dict, file: Path) -> nn.Module:
    """The embtune pooling for a sentence-transformers Pooling config (``pooling_mode``, or the older
    ``pooling_mode_*`` flags; ``include_prompt``).

    Raises:
        ValueError: a mode embtune has no equivalent for, or several modes at once.
    """
    mode = conf.get("pooling_mode")
    modes = [mode] if isinstance(mode, str) else list(mode or [])
    if mode is None:
        modes = [m for m, flag in ST_FLAGS.items() if conf.get(flag)]
        modes += ["mean_sqrt_len_tokens"] if conf.get("pooling_mode_mean_sqrt_len_tokens") else []
        modes = modes or ["mean"]  # sentence-transformers' own default
    if len(modes) != 1 or modes[0] not in POOLING_BY_ST_MODE:
        raise ValueError(f"{file}: pooling mode {'+'.join(modes)} has no embtune equivalent; choose one with "
                         f"pooling=mean|cls|max|weighted_mean|last_token")
    pool = POOLING_BY_ST_MODE[modes[0]]()
    if not conf.get("include_prompt", True):
        if hasattr(pool, "exclude_prompt"):
            pool.exclude_prompt = True
        else:
            log.warning("%s: include_prompt=false with %s pooling; embtune's %s pooling reads the prompt's "
                        "tokens too", file, modes[0], type(pool).__name__)
    return pool


def inherit(name: str, stored: Stored, fallback: dict | None, **given) -> dict:
    """Each option of :data:`INHERITED`: the value given (not None), else the stored one, else the fallback
    (``fallback`` over :data:`FALLBACK`; prompts fall back to none). Logs one INFO line naming what came
    from the model, from which file, and what from embtune's fallback.

    Returns:
        ``{option: value}``, ``pooling`` as a module.
    Raises:
        ValueError: a ``fallback.pooling`` that names no pooling of ``conf/pooling``.
    """
    fallback = {**FALLBACK, **(fallback or {})}
    if fallback["pooling"] not in POOLING_BY_NAME:
        raise ValueError(f"model.fallback.pooling={fallback['pooling']!r}: use one of {', '.join(POOLING_BY_NAME)}")
    out, inherited, defaults = {}, {}, []
    for option in INHERITED:
        if given[option] is not None:
            out[option] = given[option]
        elif option in stored.values:
            out[option] = stored.values[option]
            inherited.setdefault(stored.sources[option], []).append(f"{option}={_show(out[option])}")
        elif option in ("query_prompt", "document_prompt"):
            out[option] = ""
        else:
            out[option] = POOLING_BY_NAME[fallback[option]]() if option == "pooling" else fallback[option]
            defaults.append(f"{option}={_show(out[option])}")
    line = "; ".join(f"{', '.join(values)} ({source})" for source, values in inherited.items()) or "nothing"
    log.info("model %s: inherited %s%s", name, line, f"; embtune defaults {', '.join(defaults)}" if defaults else "")
    return out


def _show(value) -> str:
    return type(value).__name__ if isinstance(value, nn.Module) else repr(value)


def keep_st_settings(model, stored: Stored) -> None:
    """Set on ``model`` the stored sentence-transformers settings embtune has no option for (named
    prompts, the document prompt's name, the default prompt), so that a save writes them back."""
    prompts = dict(stored.values.get("prompts", {}))
    model.document_prompt_name = stored.values.get("document_prompt_name", "document")
    for role in ("query", model.document_prompt_name):
        prompts.pop(role, None)
    model.named_prompts = prompts
    model.default_prompt_name = stored.values.get("default_prompt_name")


def fit_lengths(model, name: str):
    """Cut ``model``'s query and document max lengths to :func:`position_limit`, with one warning naming
    the configured and the allowed numbers; sets ``model.position_limit``. Returns ``model``."""
    limit, why = position_limit(model.encoder, model.tokenizer)
    model.position_limit = limit
    cut = [f"model.{side}_max_length={getattr(model, f'{side}_max_length')}" for side in ("query", "document")
           if limit is not None and getattr(model, f"{side}_max_length") > limit]
    if cut:
        log.warning("%s is more than model %s takes: cut to %d (%s)", " and ".join(cut), name, limit, why)
        model.query_max_length = min(model.query_max_length, limit)
        model.document_max_length = min(model.document_max_length, limit)
    return model


def position_limit(encoder, tokenizer) -> tuple[int | None, str]:
    """The longest input, in tokens, the model can take, and why.

    The smaller of the position table (``max_position_embeddings``, less the padding offset of the
    RoBERTa family, whose position ids start at ``padding_idx + 1``: 514 rows give 512 tokens) and the
    tokenizer's ``model_max_length`` when it declares one (transformers reports 1e30 when it does not).
    Returns (None, "") when neither is known (rotary models without a stated table, for instance).
    """
    limits = []
    table = getattr(encoder.config, "max_position_embeddings", None)
    if isinstance(table, int) and table > 0:
        offset = _position_offset(encoder)
        why = f"max_position_embeddings={table}" + (f" less {offset}: position ids start at padding_idx+1"
                                                    if offset else "")
        limits.append((table - offset, why))
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < NO_TOKENIZER_LIMIT:
        limits.append((declared, f"tokenizer model_max_length={declared}"))
    return min(limits) if limits else (None, "")


def _position_offset(encoder) -> int:
    """``padding_idx + 1`` for embeddings that count positions from after the padding index (RoBERTa,
    XLM-R, CamemBERT, MPNet, Longformer: a module holding both an int ``padding_idx`` and a learned
    ``position_embeddings`` table), else 0."""
    for module in encoder.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(getattr(module, "position_embeddings", None), nn.Embedding):
            return padding_idx + 1
    return 0
