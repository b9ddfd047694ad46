"""Prompts (prepended, optionally excluded from pooling) and two towers (query and document), saved and
loaded back."""

import json

import numpy as np
import pytest
import torch
from conftest import CONF, logged
from hydra import compose, initialize_config_dir

import embtune
from embtune.model import from_pretrained, save
from embtune.model.pooling import LastToken, Mean, WeightedMean
from embtune.recipes.finetune import train

QUERIES = ["how do I join paths?", "sum of two numbers"]
DOCS = ["def join(a, *p): return a + '/'.join(p)", "def add(a, b): return a + b"]


def test_prompt_mask_marks_exactly_the_prompt_tokens_of_a_wordpiece_tokenizer(tiny_bert):
    model = from_pretrained(tiny_bert, pooling=Mean(exclude_prompt=True), query_prompt="query: ")
    batch = model.tokenize(["join paths", "a much longer text to pad the other"], kind="query")
    assert model.tokenizer.tokenize("query: join paths") == ["query", ":", "join", "paths"]
    # [CLS] query : join paths [SEP] + padding: [CLS] goes with the prompt, as in sentence-transformers
    assert batch["prompt_mask"][0].tolist()[:6] == [1, 1, 1, 0, 0, 0] and batch["prompt_mask"][0].sum() == 3
    assert "prompt_mask" not in model.tokenize(["join paths"], kind="document")  # no document prompt


def test_a_word_merged_across_the_prompts_end_counts_as_text(tiny_qwen2):
    model = from_pretrained(tiny_qwen2, pooling=Mean(exclude_prompt=True), append_eos=True,
                                     query_prompt="query: ")
    batch = model.tokenize(["how do I join paths?"], kind="query")
    ids, prompt = batch["input_ids"][0], batch["prompt_mask"][0].bool()
    decode = model.tokenizer.decode
    assert decode(ids[prompt]).strip() == "query:"  # (no BOS in this Qwen2-like tokenizer)
    assert decode(ids[~prompt]).startswith(" how") or decode(ids[~prompt]).startswith("how")
    assert decode(ids[prompt]) + decode(ids[~prompt]) == "query: how do I join paths?" + model.tokenizer.eos_token


@pytest.mark.parametrize("pool", [Mean, WeightedMean])
def test_excluded_prompt_gets_no_weight_on_either_padding_side(tiny_bert, pool):
    model = from_pretrained(tiny_bert, pooling=pool(exclude_prompt=True), query_prompt="query: ",
                                     normalize=False)
    model.eval()
    batch = model.tokenize(QUERIES, kind="query")
    with torch.no_grad():
        hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = batch["attention_mask"].bool() & ~batch["prompt_mask"].bool()
    position = batch["attention_mask"].cumsum(1) * keep if pool is WeightedMean else keep.long()
    expected = (hidden * position.unsqueeze(-1)).sum(1) / position.sum(1, keepdim=True)  # by hand
    right = model.encode(QUERIES, kind="query")
    np.testing.assert_allclose(right, expected.numpy(), atol=1e-5)
    model.tokenizer.padding_side = "left"
    np.testing.assert_allclose(model.encode(QUERIES, kind="query"), right, atol=1e-5)
    model.pooling.exclude_prompt = False
    assert np.abs(model.encode(QUERIES, kind="query") - right).max() > 1e-3


def test_prompts_are_prepended_per_kind(tiny_bert):
    prompted = from_pretrained(tiny_bert, pooling=Mean(), query_prompt="query: ", document_prompt="passage: ")
    plain = from_pretrained(tiny_bert, pooling=Mean())
    np.testing.assert_allclose(prompted.encode(QUERIES, kind="query"),
                               plain.encode(["query: " + q for q in QUERIES]), atol=1e-6)
    np.testing.assert_allclose(prompted.encode(DOCS, kind="document"),
                               plain.encode(["passage: " + d for d in DOCS]), atol=1e-6)


def _run(tmp_path, model_path, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={model_path}", "data.max_train_pairs=16", "data.max_test_queries=8",
            "train.batch_size=8", "train.max_steps=3", "train.lr=1e-3", "train.log_every=1",
            "eval.before=false", "eval.after=false", *overrides])
    return logged(train, cfg, tmp_path)


@pytest.mark.parametrize("kind", ["encoder", "llm"])
def test_two_towers_both_train_save_and_load_back(tmp_path, tiny_bert, tiny_qwen2, kind):
    base_path = tiny_bert if kind == "encoder" else tiny_qwen2
    overrides = ["model.shared_weights=false", "model.query_prompt='query: '", "pooling=mean",
                 "pooling.exclude_prompt=true"]
    if kind == "llm":
        overrides = ["model=llm", "model.lora.r=4", "model.query_max_length=32", "model.document_max_length=64",
                     *overrides]
    _run(tmp_path, base_path, overrides)
    saved = tmp_path / "model"
    meta = json.loads((saved / "embtune.json").read_text())
    assert meta["shared_weights"] is False and meta["query_prompt"] == "query: "
    assert (saved / "document" / "modules.json").is_file() and (saved / "document" / "config.json").is_file()

    model = embtune.load(str(saved))
    assert model.document_encoder is not None and model.query_prompt == "query: "
    assert model.pooling.exclude_prompt is True
    q, d = model.encode(QUERIES, kind="query"), model.encode(DOCS, kind="document")
    # each tower is a complete model folder: query = the top folder, document = document/
    query_tower = from_pretrained(str(saved), query_prompt="query: ", append_eos=kind == "llm")
    doc_tower = from_pretrained(str(saved / "document"), append_eos=kind == "llm")
    np.testing.assert_allclose(q, query_tower.encode(QUERIES, kind="query"), atol=1e-5)
    np.testing.assert_allclose(d, doc_tower.encode(DOCS, kind="document"), atol=1e-5)
    # both towers trained (each differs from the base), and apart (they differ from each other)
    base = from_pretrained(base_path, pooling=Mean(), append_eos=kind == "llm")
    assert np.abs(doc_tower.encode(DOCS) - base.encode(DOCS)).max() > 1e-4
    assert np.abs(query_tower.encode(DOCS) - base.encode(DOCS)).max() > 1e-4
    assert np.abs(query_tower.encode(DOCS) - doc_tower.encode(DOCS)).max() > 1e-4


def test_two_towers_route_queries_and_documents(tiny_bert):
    model = from_pretrained(tiny_bert, pooling=LastToken(), shared_weights=False)
    with torch.no_grad():
        for p in model.document_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q, d = model.encode(QUERIES, kind="query"), model.encode(QUERIES, kind="document")
    shared = from_pretrained(tiny_bert, pooling=LastToken())
    np.testing.assert_allclose(q, shared.encode(QUERIES, kind="query"), atol=1e-6)  # the query tower is untouched
    assert np.abs(q - d).max() > 1e-3
    with pytest.raises(ValueError, match="kind must be 'query' or 'document'"):
        model.encode(QUERIES, kind="passage")


def test_prompt_exclusion_matches_sentence_transformers(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    model = from_pretrained(tiny_bert, pooling=Mean(exclude_prompt=True), query_prompt="query: ")
    save(model, tmp_path / "model")
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), model.encode(QUERIES, kind="query"), atol=1e-5)
