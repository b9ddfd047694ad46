"""Hard-negative mining in rounds (``train.rounds=N``): mine with the current model, fine-tune on the
mined negatives, and again with the fine-tuned model (ANCE, Xiong et al. 2021, §4: negatives refreshed
from the model being trained; here offline, between whole fine-tuning runs).

Each round is one call of :func:`embtune.recipes.finetune.train` in ``<run dir>/round<r>/``, which keeps that
round's ``negatives.jsonl`` (+ ``.settings.json``), ``model/``, ``summary.json``; metrics are logged as
``round<r>/train/loss``, ``round<r>/eval/ndcg@10``, ... in the run's one ``metrics.jsonl`` (through
:class:`embtune.recipes.two_stage.StageLogger`, steps counted on from the earlier rounds').
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import build, check_compatible
from embtune.data import TrainingData
from embtune.data.formats import MultiNegative
from embtune.mining.miner import mine_to_file
from embtune.recipes.finetune import train
from embtune.recipes.two_stage import StageLogger

log = logging.getLogger(__name__)

# how a round reads its mined file: the columns write_mined writes
MINED_FORMAT = {"_target_": "embtune.data.formats.MultiNegative", "query": "query", "positive": "pos", "negatives": "neg"}


def train_rounds(cfg: DictConfig, output_dir: str | Path, logger) -> dict:
    """``cfg.train.rounds`` rounds of: mine with the current model (round 1: ``cfg.model``), fine-tune it
    on the mined rows (the held-out set of ``cfg.data`` evaluates every round).

    Returns:
        The run's summary, also written to ``output_dir/summary.json``: ``base`` (round 1's base metrics),
        ``final`` (the last round's), ``rounds`` (each round's summary and mining record).
    Raises:
        ValueError: before any model loads, when the negatives or loss cannot use mined negatives
            (``negatives=in_batch`` would ignore them), or ``train.rounds`` < 1.
    """
    output_dir = Path(output_dir)
    if cfg.train.rounds < 1:
        raise ValueError(f"train.rounds={cfg.train.rounds}: must be >= 1 here (0 trains once, without mining)")
    negatives, loss = build(cfg, "negatives"), build(cfg, "loss")
    check_compatible(MultiNegative(), negatives, loss)
    if not negatives.needs_negatives:
        raise ValueError(f"train.rounds={cfg.train.rounds} mines hard negatives, but negatives={negatives.name} "
                         "ignores them: use negatives=hard (negatives.group_size=K+1)")
    miner, data, data_format = build(cfg, "miner"), build(cfg, "data"), build(cfg, "data_format")
    t = cfg.train
    device = torch.device(t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path, offset, rounds = cfg.model.name_or_path, 0, []
    for r in range(1, t.rounds + 1):
        round_dir = output_dir / f"round{r}"
        round_cfg = copy.deepcopy(cfg)
        round_cfg.data_format = OmegaConf.create(MINED_FORMAT)  # replaced whole, not merged into
        round_cfg.model.name_or_path = model_path
        model = instantiate(round_cfg.model, pooling=instantiate(cfg.pooling)).to(device)
        mined_file = round_dir / "negatives.jsonl"
        record = mine_to_file(miner, model, model_path, data, data_format, mined_file)
        del model
        rows = [json.loads(line) for line in mined_file.read_text(encoding="utf-8").splitlines()]
        mined = TrainingData(rows=rows, test=data.test, name=str(mined_file),
                             source=[(str(mined_file), i) for i in range(1, len(rows) + 1)])
        log.info("round %d/%d: fine-tuning %s on %s", r, t.rounds, model_path, mined_file)
        summary = train(round_cfg, round_dir, StageLogger(logger, f"round{r}/", offset), data=mined,
                        base=rounds[-1]["final"] if rounds else None)  # round r starts where r-1 ended
        rounds.append({**summary, "mining": record})
        offset += summary["steps"]
        model_path = str(round_dir / "model")
    summary = {"base": rounds[0]["base"], "final": rounds[-1]["final"], "steps": offset, "rounds": rounds}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.summary({"base": summary["base"], "final": summary["final"], "steps": offset})
    return summary
