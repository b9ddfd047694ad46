"""Two-stage runs (recipe=two_stage) and unsupervised SimCSE on raw texts."""

import json

import pytest
import torch
from conftest import CONF, logged
from hydra import compose, initialize_config_dir

from embtune.data.formats import RawTexts
from embtune.model import load
from embtune.objectives import objective_for
from embtune.recipes.two_stage import run, stage_configs

TINY = ["data.max_train_pairs=24", "data.max_test_queries=12", "train.batch_size=8", "train.max_steps=2",
        "train.log_every=1", "eval.batch_size=16"]


def _cfg(tiny_bert, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model.name_or_path={tiny_bert}", *TINY, *overrides])


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_raw_texts_gives_each_distinct_text_once_as_its_own_positive():
    rows = [{"query": "a", "positive": ["b", "a"]}, {"query": "  ", "positive": "c"}, {"query": "b", "positive": []}]
    assert [(e.query, e.positive, e.negatives) for e in RawTexts()(rows)] == \
        [("a", "a", ()), ("b", "b", ()), ("c", "c", ())]
    with pytest.raises(ValueError, match=r"f.jsonl:7: field 'positive' must be"):
        RawTexts()([{"query": "a", "positive": 3}], [("f.jsonl", 7)])


def test_stage_one_replaces_losses_and_merges_settings(tiny_bert):
    cfg = _cfg(tiny_bert, ["recipe=two_stage", "pretrain.train.max_steps=3"])
    first, second = stage_configs(cfg, "/runs/x/pretrain/model")
    assert first.loss._target_.endswith("SimCSE") and first.data_format._target_.endswith("RawTexts")
    assert first.train.max_steps == 3 and first.train.batch_size == 8      # merged over the run's
    assert "pretrain" not in first and "pretrain" not in second
    assert second.loss._target_.endswith("InfoNCE") and second.train.max_steps == 2
    assert second.model.name_or_path == "/runs/x/pretrain/model" and first.model.name_or_path == tiny_bert


def test_a_mistyped_stage_one_key_is_named(tiny_bert):
    cfg = _cfg(tiny_bert, ["recipe=two_stage", "+pretrain.modle={}"])
    with pytest.raises(ValueError, match=r"pretrain.modle: not a stage-1 setting"):
        stage_configs(cfg, "m")


def test_simcse_positive_is_the_anchor_encoded_again(tiny_bert):
    """With loss=simcse the positive column is never read: the anchor's second dropout pass is the positive."""
    cfg = _cfg(tiny_bert, ["loss=simcse"])
    import random

    from hydra.utils import instantiate

    from embtune.data.formats import Example

    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling)).eval()  # no dropout: passes are equal
    loss_fn, negatives = instantiate(cfg.loss), instantiate(cfg.negatives)
    ex = [Example("first text", "unrelated positive one"), Example("second text", "unrelated positive two")]
    objective = objective_for(loss_fn, negatives)
    batch = objective.collate(model, ex, random.Random(0))
    loss, _ = objective.loss(model, batch, [(model.dim, 1.0)])
    same = [Example("first text", "first text"), Example("second text", "second text")]
    plain = objective_for(instantiate(cfg.loss), negatives)
    expected, _ = plain.loss(model, plain.collate(model, same, random.Random(0)), [(model.dim, 1.0)])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_pretrain_finetune_runs_both_stages_and_logs_each(tmp_path, tiny_bert):
    cfg = _cfg(tiny_bert, ["recipe=two_stage", "pretrain.train.max_steps=3"])
    summary = logged(run, cfg, tmp_path)
    assert summary["pretrain"]["steps"] == 3 and summary["steps"] == 2
    assert summary["base"] == summary["pretrain"]["base"]  # the original model, not the stage-1 model
    assert set(summary["pretrain"]["final"]) == set(summary["final"])
    events = _events(tmp_path)
    pre_steps = [e["step"] for e in events if "pretrain/train/loss" in e]
    steps = [e["step"] for e in events if "train/loss" in e]
    assert pre_steps == [1, 2, 3] and steps == [4, 5]  # one step axis across the stages
    assert sum("pretrain/eval/ndcg@10" in e for e in events) == 2 and sum("eval/ndcg@10" in e for e in events) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["pretrain"]["steps"] == 3
    # stage 2 starts from the stage-1 model, and both models are saved
    assert json.loads((tmp_path / "model" / "embtune.json").read_text())["config"]["model"]["name_or_path"] == \
        str(tmp_path / "pretrain" / "model")
    assert load(str(tmp_path / "pretrain" / "model")).encode(["x"]).shape == (1, 32)
