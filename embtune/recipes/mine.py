"""The ``embtune-mine`` command: a thin Hydra entry around :func:`embtune.mining.miner.mine_to_file`.

It composes ``conf/mine.yaml``: the training config's ``model``, ``pooling``, ``data`` and
``data_format`` groups (same overrides as ``embtune``) plus the ``miner`` group, and nothing mining
does not read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import CONFIG_PATH, build

log = logging.getLogger("embtune")


def run_mining(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Load data and model, mine, write ``cfg.output`` (default ``output_dir/negatives.jsonl``) and its
    settings record; returns the record.

    Raises:
        FileExistsError: the output or its settings file exists (checked before the model loads).
        ValueError: a miner setting out of range, or a data error naming file, row and field.
    """
    from embtune.mining.miner import mine_to_file, refuse_existing

    out = Path(cfg.output) if cfg.output else Path(output_dir) / "negatives.jsonl"
    refuse_existing(out)
    miner, data, data_format = build(cfg, "miner"), build(cfg, "data"), build(cfg, "data_format")
    data.problems.raise_bad()  # the file's bad rows, before the model loads
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling)).to(device)
    return mine_to_file(miner, model, cfg.model.name_or_path, data, data_format, out)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="mine")
def main(cfg: DictConfig) -> None:
    """Mine one file of hard negatives. Bad input or settings exit with one line, ``Error: <message>``
    (``HYDRA_FULL_ERROR=1``: the traceback)."""
    from embtune.run.errors import one_line_errors
    from embtune.run.progress import quiet_libraries

    quiet_libraries()  # no transformers "Loading weights" bar, as in embtune
    if cfg.get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    with one_line_errors():
        record = run_mining(cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps({k: record[k] for k in ("output", "queries", "pool", "negatives", "queries_short", "dropped")},
                     indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
