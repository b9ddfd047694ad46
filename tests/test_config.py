"""Every option of every config group composes and instantiates; bad options fail clearly."""

from pathlib import Path

import pytest
from conftest import CONF, DATA, NOT_A_MODEL
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embtune.config import check_compatible

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))
# `# @package _global_` files: they change other groups, build nothing (experiments: tests/test_docs.py)
OVERLAYS = {"hparams_search", "experiment"}
OPTIONS = [(g, f.stem) for g in sorted(set(GROUPS) - OVERLAYS) for f in sorted((CONF / g).glob("*.yaml"))]
# options whose mandatory keys (???) need a value
NEEDS = {
    ("data", "beir"): [f"data.path={DATA / 'scifact'}", "data.max_test_queries=5"],
    ("data", "jsonl"): [f"data.path={DATA / 'triplets' / 'flagembedding_toy_finetune_data.jsonl'}"],
    ("eval", "sts"): [f"eval.path={DATA / 'stsb' / 'dev.tsv'}"],
    ("data", "hf"): [f"data.name={DATA / 'triplets' / 'flagembedding_toy_finetune_data.jsonl'}"],
    ("data", "mixture"): [f"data.sources=[{{_target_:embtune.data.load_jsonl,dev_queries:0,path:'"
                          f"{DATA / 'triplets' / 'flagembedding_toy_finetune_data.jsonl'}'}}]"],
}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_groups_are_the_documented_ones():
    assert set(GROUPS) >= {"model", "pooling", "data", "data_format", "loss", "negatives", "matryoshka",
                           "train", "eval", "logger", "hparams_search", "miner"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(group, option, tiny_bert, tmp_path, request):
    needs = NEEDS.get((group, option), [])
    if group == "teacher":
        needs = [f"teacher.name_or_path={request.getfixturevalue('tiny_cross_encoder')}"]
    model = request.getfixturevalue("tiny_llama") if (group, option) == ("model", "llm") else tiny_bert
    cfg = _compose([f"{group}={option}", f"model.name_or_path={model}", *needs])
    if (group, option) == ("recipe", "two_stage"):  # an overlay at the top level: every stage's components build
        from embtune.recipes.two_stage import stage_configs

        for stage in stage_configs(cfg, tiny_bert):
            for part in ("data_format", "loss", "negatives"):
                assert instantiate(stage[part]) is not None
        return
    node = cfg[group]
    if node is None:  # pooling=auto is null: the starting model's own pooling (tests/test_inherit.py)
        assert (group, option) == ("pooling", "auto")
        assert type(instantiate(cfg.model, pooling=None).pooling).__name__ == "Mean"  # tiny_bert stores none
        return
    if "_target_" not in node:  # plain settings read by the loop (train, eval, matryoshka)
        assert len(node) > 0
        return
    if group == "model":
        obj = instantiate(node, pooling=instantiate(cfg.pooling))
    elif group == "logger":
        obj = instantiate(node, _partial_=True)(output_dir=tmp_path, run_config={})
        obj.finish()
    else:
        obj = instantiate(node)
    assert obj is not None


@pytest.mark.parametrize("option", sorted(f.stem for f in (CONF / "hparams_search").glob("*.yaml")))
def test_every_search_overlay_composes_with_the_optuna_sweeper(option, tiny_bert):
    """The overlay picks the Optuna sweeper, and every searched key exists in the composed config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"hparams_search={option}", f"model.name_or_path={tiny_bert}"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    params = cfg.hydra.sweeper.params
    assert params and all(OmegaConf.select(cfg, key) is not None for key in params)
    assert any(key in ("loss.temperature", "loss.scale") and "log" in spec for key, spec in params.items())
    instantiate(cfg.loss)


def test_joblib_launcher_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_no_teacher_by_default():
    assert _compose([]).get("teacher") is None


def test_semi_hard_margin_defaults_to_the_losss_margin():
    assert _compose(["negatives=online_hard", "loss=hinge", "loss.margin=0.3"]).negatives.margin == 0.3
    assert _compose(["negatives=online_hard"]).negatives.margin == 0.2  # info_nce has no margin


def test_unknown_option_fails_with_hydras_message():
    with pytest.raises(MissingConfigException, match="Could not find 'loss/no_such_loss'"):
        _compose(["loss=no_such_loss"])


def test_unknown_key_fails_with_hydras_message():
    with pytest.raises(ConfigCompositionException, match="loss.no_such_key"):
        _compose(["loss.no_such_key=1"])


def test_hard_negatives_without_negatives_in_the_data_fail_naming_both():
    cfg = _compose(["negatives=hard", "data_format=pairwise"])
    with pytest.raises(ValueError, match=r"negatives=hard .* data_format=pairwise"):
        check_compatible(instantiate(cfg.data_format), instantiate(cfg.negatives), instantiate(cfg.loss))


def test_incompatible_combination_fails_before_the_model_loads(tmp_path):
    from embtune.recipes.finetune import train

    cfg = _compose(["negatives=hard", "data_format=pairwise", f"model.name_or_path={NOT_A_MODEL}",
                    "data.max_train_pairs=8", "data.max_test_queries=4"])
    with pytest.raises(ValueError, match="negatives=hard"):  # not FileNotFoundError for the model
        train(cfg, tmp_path, logger=None)
    assert not Path(tmp_path / "model").exists()


def test_llm_defaults_to_last_token_pooling_with_lora_and_eos():
    cfg = _compose(["model=llm", "model.name_or_path=some/llm"])
    # pooling=auto: the model's stored pooling, else last-token (a model that stores none: tests/test_inherit.py)
    assert cfg.pooling is None and cfg.model.fallback.pooling == "last_token"
    assert cfg.model.append_eos is True and cfg.model.lora.r == 16 and cfg.model.gradient_checkpointing is True
    assert _compose(["pooling=mean", "model=llm", "model.name_or_path=x"]).pooling._target_ == "embtune.model.Mean"
    assert _compose(["model=llm", "model.name_or_path=x", "model.lora=null"]).model.lora is None
    assert _compose([]).model.fallback.pooling == "mean"  # the encoder keeps mean pooling


def test_llm_needs_a_model_name():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="name_or_path"):
        _compose(["model=llm"]).model.name_or_path


@pytest.mark.parametrize("overrides", [
    ["pooling=mean", "pooling.exclude_prompt=true", "model.query_prompt='query: '", "model.document_prompt='passage: '"],
    ["pooling=weighted_mean", "pooling.exclude_prompt=true", "model.query_prompt='query: '"],
    ["pooling=max", "model.shared_weights=false"],
    ["model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear, save: adapter}",
     "model.gradient_checkpointing=true"],
])
def test_new_model_and_pooling_options_instantiate(tiny_bert, overrides):
    cfg = _compose([f"model.name_or_path={tiny_bert}", *overrides])
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling))
    assert model.tokenize(["a text"], kind="query")["input_ids"].shape[0] == 1
    assert model.query_prompt == (cfg.model.query_prompt or "")  # null: the model's, none for tiny_bert
    assert (model.document_encoder is None) == cfg.model.shared_weights
    assert getattr(model.pooling, "exclude_prompt", False) == (cfg.pooling or {}).get("exclude_prompt", False)
