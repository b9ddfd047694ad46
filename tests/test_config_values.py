"""Values as tools write them (embtune.config.normalize): `key=None` from sweep agents is null where an option
may be null, a wrong type is one error naming key, value and what was expected, before any model loads, and
prompts read `\\n` and `\\t` as a newline and a tab."""

import os
import subprocess
import sys
import typing

import pytest
import yaml
from conftest import CONF, REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from embtune.config import SETTINGS, normalize

OPTIONS = [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml")) if p.parent.name != "hparams_search"]
NEEDS = {"beir": ["data.path=x"], "jsonl": ["data.path=x"], "hf": ["data.name=x"], "sts": ["eval.path=x"],
         "llm": ["model.name_or_path=x"], "cross_encoder": ["teacher.name_or_path=x"]}


def _compose(overrides, name="config"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_none_as_sweep_agents_write_it_composes_to_null():
    cfg = normalize(_compose(["model.query_prompt=None", "train.max_steps=None", "data.max_train_pairs=None",
                              "model.lora=None", "train.checkpoint_every='~'", "data.max_test_queries=none"]))
    assert cfg.model.query_prompt is None and cfg.train.max_steps is None and cfg.data.max_train_pairs is None
    assert cfg.model.lora is None and cfg.train.checkpoint_every is None and cfg.data.max_test_queries is None
    assert normalize(_compose(["resume_from=None"], "config")).resume_from is None


def test_a_null_prompt_is_no_prompt(tiny_bert):
    cfg = normalize(_compose([f"model.name_or_path={tiny_bert}", "model.query_prompt=None"]))
    model = instantiate(cfg.model, pooling=instantiate(cfg.pooling))
    assert model.query_prompt == ""  # not the text "None"


def test_null_where_an_option_cannot_be_null_is_named():
    with pytest.raises(ValueError, match=r"^train.batch_size cannot be null; it must be an integer, got 'None'$"):
        normalize(_compose(["train.batch_size=None"]))
    with pytest.raises(ValueError, match=r"^model.name_or_path cannot be null; it must be a string, got 'None'$"):
        normalize(_compose(["model.name_or_path=None"]))


def test_prompt_escapes_become_a_newline_and_a_tab():
    cfg = normalize(_compose([r"model.query_prompt='Instruct: find code\nQuery: '",
                              r"model.document_prompt='passage:\t'"]))
    assert cfg.model.query_prompt == "Instruct: find code" + chr(10) + "Query: "
    assert cfg.model.document_prompt == "passage:" + chr(9)
    assert normalize(cfg).model.query_prompt == "Instruct: find code" + chr(10) + "Query: "  # read twice: the same


def test_wandb_mode_follows_the_environment_unless_set(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _compose(["logger=wandb"]).logger.mode == "disabled"
    assert _compose(["logger=wandb", "logger.mode=online"]).logger.mode == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert _compose(["logger=wandb"]).logger.mode == "offline"


def test_numbers_are_read_where_they_belong():
    cfg = normalize(_compose(["train.max_steps=1e3", "loss.temperature=1", "data.test_fraction=0"]))
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)  # integral float: an integer
    assert cfg.loss.temperature == 1 and cfg.data.test_fraction == 0  # an integer is a number


WRONG = [
    (["train.max_steps=ten"], r"train.max_steps must be an integer or null, got 'ten'"),
    (["train.lr=fast"], r"train.lr must be a number, got 'fast'"),
    (["train.on_nonfinite=crash"], r"train.on_nonfinite must be skip or stop, got 'crash'"),
    (["model.unpad=maybe"], r"model.unpad must be auto or false, got 'maybe'"),  # YAML's false, not Python's False
    (["data.max_train_pairs=abc"], r"data.max_train_pairs must be an integer or null, got 'abc'"),
    (["model.query_max_length=long"], r"model.query_max_length must be an integer or null, got 'long'"),
    (["model.normalize=yes"], r"model.normalize must be true or false or null, got 'yes'"),
    (["loss.temperature=[0.05]"], r"loss.temperature must be a number, got \[0.05\]"),
    (["matryoshka=on", "matryoshka.dims=64"], r"matryoshka.dims must be a list of integers, got 64"),
    (["eval.k=1.5"], r"eval.k must be an integer, got 1.5"),
    (["data_format.label=[a]"], r"data_format.label must be a string or null, got \['a'\]"),
    (["recipe=mining_rounds", "recipe.rounds=two"], r"recipe.rounds must be an integer, got 'two'"),
]


@pytest.mark.parametrize("overrides,message", WRONG, ids=[" ".join(o) for o, _ in WRONG])
def test_a_wrong_type_is_one_named_error_before_the_model_loads(tmp_path, overrides, message):
    from embtune.recipes.finetune import train

    cfg = _compose(["model.name_or_path=/nonexistent/model", "data.max_train_pairs=8", "data.max_test_queries=4",
                    *overrides])
    with pytest.raises(ValueError, match=f"^{message}$"):  # not FileNotFoundError for the model
        train(cfg, tmp_path, logger=None)


def test_the_cli_reports_a_wrong_type_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "embtune.cli", "model.name_or_path=/nonexistent/model", "logger=none",
           "train.max_steps=ten", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Error: train.max_steps must be an integer or null, got 'ten'" in out.stderr


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_file_passes_as_written(group, option):
    if group == "recipe":
        cfg = _compose([f"recipe={option}"])
    else:
        cfg = _compose([f"{group}={option}", *NEEDS.get(option, [])])
    normalize(cfg)  # its defaults are of their declared types


def _keys_of(group: str) -> set[str]:
    """Every key the option files of ``group`` set (a `# @package _global_` file: its ``group:`` node)."""
    keys = set()
    for path in (CONF / group).glob("*.yaml"):
        node = yaml.safe_load(path.read_text()) or {}
        keys |= set(node[group] if group in node else node)
    return keys


@pytest.mark.parametrize("group", sorted(SETTINGS))
def test_the_typed_settings_are_the_keys_of_their_group_files(group):
    assert set(typing.get_type_hints(SETTINGS[group])) == _keys_of(group)


@pytest.mark.parametrize("name", ["mine", "evaluate"])
def test_the_other_commands_configs_pass_as_written(name):
    normalize(_compose([], name))
