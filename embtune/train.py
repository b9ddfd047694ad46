"""The training loop: one function, read top to bottom.

``train(cfg, output_dir, logger)`` builds data, format, negatives and loss from the config, checks
they fit together (before any model loads), evaluates the base model, fine-tunes with AdamW and a
linear warm-up/decay schedule, evaluates again and saves the model and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.evaluate import evaluate_retrieval
from embtune.formats import Example
from embtune.report import print_comparison, progress_bar

log = logging.getLogger(__name__)


def check_compatible(data_format, negatives, loss) -> None:
    """Fail early, naming both options, when the data cannot feed the negatives or the loss.

    Raises:
        ValueError: e.g. ``negatives=hard`` with ``data_format=pairwise`` (which has no negatives).
    """
    if getattr(data_format, "has_negatives", False):
        return
    for group, part in (("negatives", negatives), ("loss", loss)):
        if getattr(part, "needs_negatives", False):
            raise ValueError(
                f"{group}={part.name} needs negatives in each example, but data_format={data_format.name} "
                f"has none: use data_format=triplet, or {group} without negatives")


def matryoshka_dims(cfg: DictConfig, dim: int) -> list[tuple[int, float]]:
    """(dimension, weight) pairs to train at; [(D, 1.0)] when Matryoshka is off.

    Raises:
        ValueError: dims and weights differ in length, or a dim is not in 1..D.
    """
    dims, weights = list(cfg.matryoshka.dims or []), list(cfg.matryoshka.weights or [])
    if not dims:
        return [(dim, 1.0)]
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka.dims {dims} and matryoshka.weights {weights} must have the same length")
    bad = [d for d in dims if not 0 < d <= dim]
    if bad:
        raise ValueError(f"matryoshka.dims {bad} outside 1..{dim} (the model's embedding size)")
    return sorted(zip(dims, weights), reverse=True)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def collate(model, examples: list[Example], with_negatives: bool) -> dict:
    """Tokenise one batch; each column is padded only to its own longest text."""
    batch = {"query": model.tokenize([e.query for e in examples], model.query_max_length),
             "positive": model.tokenize([e.positive for e in examples], model.document_max_length)}
    if with_negatives:
        k = min(len(e.negatives) for e in examples)
        batch["negative"] = model.tokenize([n for e in examples for n in e.negatives[:k]], model.document_max_length)
        batch["k"] = k
    return batch


def evaluate(model, test, cfg_eval: DictConfig, dims: list[int]) -> dict[str, float]:
    """Encode the test queries and the whole test corpus, rank, and compute the IR metrics."""
    qids, dids = list(test.qrels), list(test.corpus)
    q = model.encode([test.queries[i] for i in qids], kind="query", batch_size=cfg_eval.batch_size)
    d = model.encode([test.corpus[i] for i in dids], kind="document", batch_size=cfg_eval.batch_size)
    return evaluate_retrieval(torch.from_numpy(q), torch.from_numpy(d), test, qids, dids,
                              k=cfg_eval.k, dims=[x for x in dims if x < model.dim])


def train(cfg: DictConfig, output_dir: str | Path, logger) -> dict:
    """Fine-tune the configured model; returns the summary written to ``output_dir/summary.json``."""
    output_dir = Path(output_dir)
    t = cfg.train
    random.seed(t.seed), np.random.seed(t.seed), torch.manual_seed(t.seed)

    # -- data, format, negatives, loss: cheap, and checked before any model loads
    data = instantiate(cfg.data)
    data_format, negatives, loss_fn = instantiate(cfg.data_format), instantiate(cfg.negatives), instantiate(cfg.loss)
    check_compatible(data_format, negatives, loss_fn)
    examples = data_format(data.rows, data.source)
    if not examples:
        raise ValueError(f"data {data.name}: no training examples")
    log.info("data %s: %d rows -> %d examples", data.name, len(data.rows), len(examples))

    # -- model
    device = torch.device(t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling)).to(device)
    loss_fn.to(device)
    dims = matryoshka_dims(cfg, model.dim)
    eval_dims = [d for d, _ in dims]

    # -- base metrics
    base = {}
    if data.test is not None and cfg.eval.before:
        base = evaluate(model, data.test, cfg.eval, eval_dims)
        logger.log({f"eval/{k}": v for k, v in base.items()}, step=0)

    # -- optimiser and schedule
    with_negatives = negatives.needs_negatives
    generator = torch.Generator().manual_seed(t.seed)
    loader = torch.utils.data.DataLoader(
        examples, batch_size=t.batch_size, shuffle=True, generator=generator, drop_last=len(examples) > t.batch_size,
        collate_fn=lambda b: collate(model, b, with_negatives))
    total = t.max_steps or t.epochs * len(loader)
    warmup = max(1, int(t.warmup_ratio * total))
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, warmup))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16 and device.type == "cuda"
                              and torch.cuda.is_bf16_supported())

    # -- the loop
    model.train()
    step, seen, start = 0, 0, time.perf_counter()
    with progress_bar(total) as bar:
        while step < total:
            for batch in loader:
                batch = {k: ({n: x.to(device) for n, x in v.items()} if isinstance(v, dict) else v)
                         for k, v in batch.items()}
                with autocast:
                    anchor, positive = model(**batch["query"]), model(**batch["positive"])
                    negative = None
                    if with_negatives:
                        negative = model(**batch["negative"]).view(anchor.size(0), batch["k"], -1)
                    loss = 0.0
                    for d, w in dims:  # Matryoshka: truncate, re-normalise, score, weight
                        a, p, n = anchor[:, :d], positive[:, :d], negative[..., :d] if negative is not None else None
                        if d < model.dim and model.normalize:
                            a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
                            n = F.normalize(n, dim=-1) if n is not None else None
                        loss = loss + w * loss_fn(*negatives(a, p, n))
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += anchor.size(0)
                pairs_per_s = seen / (time.perf_counter() - start)
                if step % t.log_every == 0 or step == total:
                    logger.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                                "train/grad_norm": grad_norm.item(), "train/temperature": loss_fn.temperature,
                                "train/margin": loss_fn.margin, "train/pairs_per_s": pairs_per_s,
                                "train/epoch": step / len(loader)}, step=step)
                bar.update(step=step, loss=loss.item(), lr=scheduler.get_last_lr()[0], pairs_per_s=pairs_per_s)
                if step >= total:
                    break
    train_seconds = time.perf_counter() - start

    # -- final metrics, model, summary
    final = {}
    if data.test is not None and cfg.eval.after:
        final = evaluate(model, data.test, cfg.eval, eval_dims)
        logger.log({f"eval/{k}": v for k, v in final.items()}, step=step)
    model.save(output_dir / "model", matryoshka_dims=[d for d, _ in dims] if cfg.matryoshka.dims else None,
               config=OmegaConf.to_container(cfg, resolve=True))
    summary = {
        "base": base, "final": final, "steps": step, "train_seconds": round(train_seconds, 2),
        "pairs_per_second": round(seen / train_seconds, 2), "examples": len(examples),
        "temperature": loss_fn.temperature, "margin": loss_fn.margin, "data": data.summary(),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.summary(summary)
    if base or final:
        print_comparison(base, final)
    return summary
