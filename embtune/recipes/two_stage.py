"""Two-stage training in one run: an unsupervised stage, then the supervised stage from its model.

``experiment=pretrain_finetune`` fills the config's ``pretrain`` node. Stage 1 (SimCSE on the data's
raw texts, Gao et al. 2021 §3) trains into ``RUN_DIR/pretrain/``; stage 2 (the run's own data format,
loss and negatives) starts from the stage-1 model and writes the run's model and ``summary.json``.
Both stages log to the run's one ``metrics.jsonl`` / wandb run: stage 1 under ``pretrain/``, stage 2
under the usual names, its steps counted on from stage 1's so every step number is used once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from embtune.recipes.finetune import train

# Nodes that name what they build (replaced whole in stage 1) vs settings (merged key by key).
_REPLACED = ("data_format", "loss", "negatives")
_MERGED = ("train", "eval")


class StageLogger:
    """A run logger seen through a stage: metric names get ``prefix``, steps get ``step_offset``."""

    def __init__(self, logger, prefix: str = "", step_offset: int = 0):
        self.logger, self.prefix, self.step_offset = logger, prefix, step_offset

    def log(self, metrics: dict, step: int) -> None:
        self.logger.log({self.prefix + k: v for k, v in metrics.items()}, step=step + self.step_offset)

    def summary(self, values: dict) -> None:
        self.logger.summary({self.prefix.rstrip("/"): values} if self.prefix else values)


def stage_configs(cfg: DictConfig, pretrained_model: str) -> tuple[DictConfig, DictConfig]:
    """The stage-1 and stage-2 configs of a run whose ``pretrain`` node is set.

    Stage 1 takes ``pretrain.data_format``, ``pretrain.loss`` and ``pretrain.negatives`` in place of
    the run's, and ``pretrain.train`` / ``pretrain.eval`` keys over the run's. Stage 2 is the run's
    config with ``model.name_or_path`` set to ``pretrained_model`` (the stage-1 model folder).

    Raises:
        ValueError: ``pretrain`` has a key other than the five above.
    """
    extra = set(cfg.pretrain) - set(_REPLACED) - set(_MERGED)
    if extra:
        raise ValueError(f"pretrain.{sorted(extra)[0]}: not a stage-1 setting; pretrain takes "
                         f"{', '.join(_REPLACED + _MERGED)}")
    first = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "pretrain"])
    second = first.copy()
    with open_dict(first), open_dict(second):
        for key in _REPLACED:
            if key in cfg.pretrain:
                first[key] = cfg.pretrain[key]
        for key in _MERGED:
            if key in cfg.pretrain:
                first[key] = OmegaConf.merge(cfg[key], cfg.pretrain[key])
        second.model.name_or_path = pretrained_model
    return first, second


def run(cfg: DictConfig, output_dir: str | Path, logger) -> dict:
    """Train one run: ``train`` itself, both stages when ``cfg.pretrain`` is set, or mining rounds
    (:func:`embtune.recipes.mining_rounds.train_rounds`) when ``train.rounds`` > 0.

    A two-stage run's ``summary.json`` holds the original model's metrics as ``base``, the stage-2
    model's as ``final``, and stage 1's summary under ``pretrain``.
    """
    output_dir = Path(output_dir)
    if cfg.train.get("rounds"):
        if cfg.get("pretrain") is not None:
            raise ValueError("train.rounds with a pretrain stage is not supported: run the stages, then mine "
                             "with the stage-2 model (train.rounds from model.name_or_path=RUN_DIR/model)")
        from embtune.recipes.mining_rounds import train_rounds

        return train_rounds(cfg, output_dir, logger)
    if cfg.get("pretrain") is None:
        return train(cfg, output_dir, logger)
    first, second = stage_configs(cfg, str(output_dir / "pretrain" / "model"))
    pre = train(first, output_dir / "pretrain", StageLogger(logger, prefix="pretrain/"))
    summary = train(second, output_dir, StageLogger(logger, step_offset=pre["steps"]), base=pre["base"])
    summary["pretrain"] = pre
    path = output_dir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    logger.summary({"pretrain": pre})
    return summary
