"""Recipes: what a run does, one file a mode (torchtune's recipes). ``recipe=`` picks one.

- ``finetune``: one fine-tuning run, the loop (:func:`embtune.recipes.finetune.train`).
- ``two_stage``: unsupervised SimCSE, then the supervised run from its model (:mod:`embtune.recipes.two_stage`).
- ``mining_rounds``: mine hard negatives with the current model, fine-tune, repeat (:mod:`embtune.recipes.mining_rounds`).

``embtune-mine`` (:mod:`embtune.recipes.mine`) is a recipe with a command of its own. Recipes compose the
fine-tuning loop; they never copy it and never import each other's private names.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from embtune.recipes import finetune, mining_rounds, two_stage
from embtune.run import hub

RECIPES = {"finetune": finetune.train, "two_stage": two_stage.run, "mining_rounds": mining_rounds.train_rounds}


def run(cfg: DictConfig, output_dir: str | Path, logger) -> dict:
    """Run the recipe ``cfg.recipe.name`` names; returns the run's summary (also in ``summary.json``).
    With ``hub.push=true`` the run's final model is then pushed to ``hub.repo_id`` (:mod:`embtune.run.hub`:
    once per run, whatever the recipe, and not each stage's or round's model).

    Raises:
        ValueError: an unknown recipe name, a ``pretrain`` stage outside ``recipe=two_stage``, ``data.streaming=true``
            with a recipe other than ``finetune`` (mining reads every row; stage 1 keeps every distinct text), or
            ``hub`` settings that cannot push (:func:`embtune.run.hub.check_settings`); all before any model loads.
    """
    name = cfg.recipe.name
    if name not in RECIPES:
        raise ValueError(f"recipe.name={name!r}: not a recipe; choose one of {', '.join(RECIPES)}")
    if cfg.get("pretrain") is not None and name != "two_stage":
        raise ValueError(f"a pretrain stage is set, but recipe={name}: stages run with recipe=two_stage")
    if cfg.data.get("streaming") and name != "finetune":
        raise ValueError(f"data.streaming=true with recipe={name}: "
                         + ("mining ranks every row of the data set" if name == "mining_rounds" else
                            "stage 1 trains on every distinct text of the data (data_format=raw_texts)")
                         + ", which a stream does not hold; use recipe=finetune")
    hub.check_settings(cfg.get("hub"))
    summary = RECIPES[name](cfg, output_dir, logger)
    return hub.push_run(cfg.get("hub"), output_dir, summary, logger)
