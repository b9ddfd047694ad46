"""The ``embtune-eval`` command: evaluate a model on its own, as a training run evaluates it, saving no model.

It composes ``conf/evaluate.yaml``: the training config's ``model``, ``pooling``, ``data``, ``eval`` and
``matryoshka`` groups (same overrides as ``embtune``), and nothing training reads. The model is built and
evaluated exactly as :func:`embtune.recipes.finetune.train` builds and evaluates its base model; a data set
is read for its held-out split only (a BEIR folder needs no train qrels).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from embtune.config import CONFIG_PATH, build, normalize, yaml_word
from embtune.data.checks import text_report
from embtune.eval.base_cache import base_metrics
from embtune.objectives.matryoshka import matryoshka_dims
from embtune.run.outputs import refuse_if_used, write_json
from embtune.run.redact import redact
from embtune.training.numerics import finite_or_missing
from embtune.training.precision import precision_name, use_bf16

log = logging.getLogger("embtune")


def model_folder(name_or_path: str) -> str:
    """An embtune run folder (holding ``model/`` and no ``config.json`` of its own) means its ``model/``;
    any other name is returned as it is (a hub name, a model folder)."""
    path = Path(name_or_path).expanduser()
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        return str(path / "model")
    return name_or_path


def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Evaluate ``cfg.model`` with ``cfg.eval`` and write ``summary.json`` and ``results.md`` into
    ``output_dir``; returns the summary (``metrics``: what :class:`~embtune.eval.Retrieval` or
    :class:`~embtune.eval.STS` report, ``data``, ``texts``, ``seconds``).

    Raises:
        FileExistsError: ``output_dir`` already holds a run.
        ValueError: a bad value (:func:`embtune.config.normalize`), ``eval.before``/``eval.after`` set to
            false (they choose when a training run evaluates; this command evaluates once), or retrieval
            on data with no held-out split; all before the model loads.
    """
    output_dir = Path(output_dir)
    refuse_if_used(output_dir)
    started = time.perf_counter()
    normalize(cfg)
    for when in ("before", "after"):
        if cfg.eval.get(when) is False:
            raise ValueError(f"eval.{when}=false: eval.before/eval.after choose when a training run evaluates; "
                             "embtune-eval evaluates the model once, so leave them true")
    with open_dict(cfg):
        cfg.model.name_or_path = model_folder(cfg.model.name_or_path)
        if "train_split" in cfg.data:  # evaluation reads the held-out split only: no train qrels needed
            cfg.data.train_split = None
    evaluator = build(cfg, "eval")
    data = build(cfg, "data") if evaluator.uses_data else None
    if data is not None:
        data.problems.raise_bad()  # bad rows met reading it, before the model loads
    if data is not None and data.test is None:
        raise ValueError(f"data {data.name} has no held-out split to evaluate on: use data=beir, or give the "
                         "data a test set (data.test_path=BEIR_FOLDER)")
    matryoshka_dims(cfg.matryoshka.dims, cfg.matryoshka.weights, size=10**9)  # the model's size: once it loads

    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = use_bf16(getattr(evaluator, "bf16", False), device, option="eval.bf16")  # refused before the model loads
    log.info("precision: %s on %s (eval.bf16=%s)", precision_name(bf16), device.type,
             yaml_word(getattr(evaluator, "bf16", False)))
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling)).to(device)
    model.eval()
    dims = [d for d, _ in matryoshka_dims(cfg.matryoshka.dims, cfg.matryoshka.weights, model.dim)]

    def run() -> dict:
        return evaluator(model, data, dims)

    texts = None  # counted (and the truncated ones logged) before the evaluation, as a training run does
    if data is not None:
        texts = text_report([], data.test, model.tokenizer, model.query_max_length, model.document_max_length)["test"]
    # the cache a training run's base metrics use: the same settings give the same key
    metrics = finite_or_missing(base_metrics(cfg, data, run) if data is not None else run())
    summary = redact({
        "status": "completed", "model": cfg.model.name_or_path, "metrics": metrics, "precision": precision_name(bf16),
        "data": {**data.summary(), "texts": texts} if data is not None else None,
        "seconds": round(time.perf_counter() - started, 2),
    })
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "summary.json", summary)
    (output_dir / "results.md").write_text(results_table(metrics, cfg.model.name_or_path,
                                                         data.name if data is not None else cfg.eval.path))
    return summary


def results_table(metrics: dict, model: str, data: str) -> str:
    """The metrics as a Markdown table (``results.md``), under a line naming the model and the data."""
    rows = "".join(f"| {k} | {'—' if v is None else f'{v:.4f}'} |\n" for k, v in metrics.items())
    return f"{model} on {data}\n\n| metric | value |\n|---|---:|\n{rows}"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    """Evaluate one model; returns ``eval.metric`` (what a Hydra sweeper optimises). Bad input or settings
    exit with one line, ``Error: <message>`` (``HYDRA_FULL_ERROR=1``: the traceback)."""
    from embtune.run.errors import one_line_errors
    from embtune.run.progress import quiet_libraries
    from embtune.run.redact import install_log_filter

    install_log_filter()  # before anything is logged: no API key or token in the console
    quiet_libraries()  # no transformers "Loading weights" bar, as in embtune
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True))))
    with one_line_errors():  # bad input or settings, a missing eval.path included
        summary = evaluate(cfg, output_dir)
    log.info("\n%s", (output_dir / "results.md").read_text().rstrip())  # on screen and in evaluate.log
    log.info("results written to %s (summary.json, results.md, evaluate.log)", output_dir)
    return summary["metrics"].get(cfg.eval.metric)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
