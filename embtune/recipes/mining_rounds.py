"""Hard-negative mining in rounds (``recipe=mining_rounds recipe.rounds=N``): mine with the current model, fine-tune on the
mined negatives, and again with the fine-tuned model (ANCE, Xiong et al. 2021, §4: negatives refreshed
from the model being trained; here offline, between whole fine-tuning runs).

Each round is one call of :func:`embtune.recipes.finetune.train` in ``<run dir>/round<r>/``, which keeps that
round's ``negatives.jsonl`` (+ ``.settings.json``), ``model/``, ``summary.json``; metrics are logged as
``round<r>/train/loss``, ``round<r>/eval/ndcg@10``, ... in the run's one ``metrics.jsonl`` (through
:class:`embtune.run.logger.StageLogger`, steps counted on from the earlier rounds').
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import build, check_compatible
from embtune.data import TrainingData
from embtune.data.formats import MultiNegative
from embtune.mining.miner import mine_to_file
from embtune.recipes.finetune import train
from embtune.run.logger import StageLogger
from embtune.run.outputs import write_json
from embtune.training import distributed

log = logging.getLogger(__name__)

# how a round reads its mined file: the columns write_mined writes
MINED_FORMAT = {"_target_": "embtune.data.MultiNegative", "query": "query", "positive": "pos", "negatives": "neg"}


def train_rounds(cfg: DictConfig, output_dir: str | Path, logger) -> dict:
    """``cfg.recipe.rounds`` rounds of: mine with the current model (round 1: ``cfg.model``), fine-tune it
    on the mined rows (the held-out set of ``cfg.data`` evaluates every round).

    Returns:
        The run's summary, also written to ``output_dir/summary.json``: ``base`` (round 1's base metrics),
        ``final`` (the last round's), ``rounds`` (each round's summary and mining record).
    Raises:
        ValueError: before any model loads, when the negatives or loss cannot use mined negatives
            (``negatives=in_batch`` would ignore them), or ``recipe.rounds`` < 1.
    """
    output_dir = Path(output_dir)
    n_rounds = cfg.recipe.rounds
    if not isinstance(n_rounds, int) or isinstance(n_rounds, bool) or n_rounds < 1:
        raise ValueError(f"recipe.rounds={n_rounds!r}: must be an integer >= 1 (recipe=finetune trains once, "
                         "without mining)")
    negatives, loss = build(cfg, "negatives"), build(cfg, "loss")
    check_compatible(MultiNegative(), negatives, loss)
    if not negatives.needs_negatives:
        raise ValueError(f"recipe=mining_rounds mines hard negatives, but negatives={negatives.name} "
                         "ignores them: use negatives=hard (negatives.group_size=K+1)")
    if str(cfg.data.get("_target_", "")).endswith("load_mixture"):
        raise ValueError("recipe=mining_rounds with data=mixture: a round mines and trains on one data set's rows; "
                         "use recipe=finetune for a mixture")
    t = cfg.train
    device = distributed.pick_device(t.device)  # before the data is read
    miner, data, data_format = build(cfg, "miner"), build(cfg, "data"), build(cfg, "data_format")
    data.problems.raise_bad()  # the file's bad rows, before the model loads
    model_path, offset, rounds = cfg.model.name_or_path, 0, []
    for r in range(1, n_rounds + 1):
        round_dir = output_dir / f"round{r}"
        round_cfg = copy.deepcopy(cfg)
        round_cfg.recipe = OmegaConf.create({"name": "finetune"})  # each round is one fine-tuning run
        round_cfg.data_format = OmegaConf.create(MINED_FORMAT)  # replaced whole, not merged into
        round_cfg.model.name_or_path = model_path
        model = instantiate(round_cfg.model, pooling=instantiate(cfg.pooling)).to(device)
        mined_file = round_dir / "negatives.jsonl"
        record = mine_to_file(miner, model, model_path, data, data_format, mined_file)
        del model
        rows = [json.loads(line) for line in mined_file.read_text(encoding="utf-8").splitlines()]
        mined = TrainingData(rows=rows, test=data.test, name=str(mined_file),
                             source=[(str(mined_file), i) for i in range(1, len(rows) + 1)])
        log.info("round %d/%d: fine-tuning %s on %s", r, n_rounds, model_path, mined_file)
        summary = train(round_cfg, round_dir, StageLogger(logger, f"round{r}/", offset), data=mined,
                        base=rounds[-1]["final"] if rounds else None)  # round r starts where r-1 ended
        rounds.append({**summary, "mining": record})
        offset += summary["steps"]
        model_path = str(round_dir / "model")
    summary = {"status": "completed", "base": rounds[0]["base"], "final": rounds[-1]["final"], "steps": offset,
               "rounds": rounds}
    write_json(output_dir / "summary.json", summary)
    logger.summary({"base": summary["base"], "final": summary["final"], "steps": offset})
    return summary
