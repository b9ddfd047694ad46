"""Two-stage training in one run: an unsupervised stage, then the supervised stage from its model.

``recipe=two_stage`` fills the config's ``pretrain`` node. Stage 1 (SimCSE on the data's
raw texts, Gao et al. 2021 §3) trains into ``RUN_DIR/pretrain/``; stage 2 (the run's own data format,
loss and negatives) starts from the stage-1 model and writes the run's model and ``summary.json``.
Both stages log to the run's one ``metrics.jsonl`` / wandb run: stage 1 under ``pretrain/``, stage 2
under the usual names, its steps counted on from stage 1's so every step number is used once.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from embtune.recipes.finetune import train
from embtune.run.logger import StageLogger
from embtune.run.outputs import write_json

# Nodes that name what they build (replaced whole in stage 1) vs settings (merged key by key).
_REPLACED = ("data_format", "loss", "negatives")
_MERGED = ("train", "eval")


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
    first.recipe = OmegaConf.create({"name": "finetune"})  # each stage is one fine-tuning run
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
    """Both stages: stage 1 into ``output_dir/pretrain/``, stage 2 from its model into ``output_dir``.

    The run's ``summary.json`` holds the original model's metrics as ``base``, the stage-2 model's as
    ``final``, and stage 1's summary under ``pretrain``.
    """
    output_dir = Path(output_dir)
    first, second = stage_configs(cfg, str(output_dir / "pretrain" / "model"))
    pre = train(first, output_dir / "pretrain", StageLogger(logger, prefix="pretrain/"))
    summary = train(second, output_dir, StageLogger(logger, step_offset=pre["steps"]), base=pre["base"])
    summary["pretrain"] = pre
    write_json(output_dir / "summary.json", summary)
    logger.summary({"pretrain": pre})
    return summary
