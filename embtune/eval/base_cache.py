"""The base model's metrics, cached between runs (a sweep's jobs evaluate the base model once)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from embtune.data import fingerprint
from embtune.data.cache import cache_dir
from embtune.model import builds_multi_vector, resolve_model_path

log = logging.getLogger(__name__)


_VERSION = 2  # 2: eval.bf16=auto encodes in bf16 on a CPU with native bf16 (1: fp32 there)


def base_metrics(cfg: DictConfig, data, evaluate) -> dict[str, float]:
    """The base model's metrics, computed once per (model, pooling, held-out set, eval config, Matryoshka
    dims) and reused from ``$EMBTUNE_CACHE/base_eval`` (so the jobs of a sweep evaluate the base model once;
    the training rows are not in the key, so mined rows reuse the base metrics of the data they came from).
    ``eval.cache_base=false`` always recomputes. The key includes the model folder's file times, so a
    changed local model is evaluated again."""
    if not cfg.eval.get("cache_base", True):
        return evaluate()
    folder = Path(resolve_model_path(cfg.model.name_or_path))
    stamp = sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) if cfg[k] is not None else None  # pooling=auto: null
             for k in ("model", "pooling", "eval", "matryoshka")}
    when = ("before", "after", "cache_base", "every_steps", "keep")  # when and whether, not what, is evaluated
    parts["eval"] = {k: v for k, v in parts["eval"].items() if k not in when}
    if builds_multi_vector(cfg.model):  # the base model's projection is drawn at random from the seed
        parts["seed"] = OmegaConf.select(cfg, "train.seed", default=cfg.get("seed"))  # embtune-eval: cfg.seed
    held_out = fingerprint([], data.test)
    parts["version"] = _VERSION
    key = hashlib.sha256(json.dumps([parts, str(folder), stamp, held_out], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "base_eval" / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("unreadable base-metrics cache %s; recomputing", path)
    metrics = evaluate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(metrics))
    os.replace(tmp, path)  # atomic: parallel jobs never read half a file
    return metrics
