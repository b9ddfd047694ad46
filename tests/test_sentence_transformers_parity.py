"""Every model kind embtune saves gives the same vectors in sentence-transformers as in ``embtune.load``:
``encode_query`` (at the query length), ``encode_document`` and ``encode(prompt_name=...)``, within 1e-5;
what sentence-transformers cannot be told is said at save time and recorded in embtune.json."""

import json
import logging

import numpy as np
import pytest
import torch

import embtune
from embtune.model import from_pretrained, from_pretrained_multi_vector, load, save
from embtune.model.pooling import CLS, LastToken, Max, Mean, WeightedMean

LONG = ("the quick brown fox jumps over the lazy dog " * 12).strip()
TEXTS = ["def add(a, b): return a + b", "Return the sum of two numbers, or raise if either is not a number.", "hi",
         LONG]
SHORT = ["hi", "a b", "x"]  # within every query length below, prompt and EOS included


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def _same(a, b):
    assert np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max() < 1e-5


def _check(path, short=SHORT):
    """Queries and documents (long ones cut at each side's length) and named prompts, both libraries."""
    ours, st = load(str(path)), _st(path)
    _same(st.encode_query(TEXTS), ours.encode(TEXTS, kind="query"))
    _same(st.encode_document(TEXTS), ours.encode(TEXTS, kind="document"))
    # encode(prompt_name=...) has no query/document task, so texts within both lengths
    _same(st.encode(short, prompt_name="query"), ours.encode(short, kind="query"))
    return ours, st


@pytest.mark.parametrize("pool", [Mean, CLS, Max, WeightedMean, LastToken])
def test_encoder_with_prompts_and_two_lengths(tiny_bert, tmp_path, pool):
    model = from_pretrained(tiny_bert, pooling=pool(), query_prompt="query: ", document_prompt="passage: ",
                            query_max_length=12, document_max_length=40)
    save(model, tmp_path / "m")
    lengths = json.loads((tmp_path / "m" / "sentence_bert_config.json").read_text())
    assert (lengths["query_length"], lengths["document_length"], lengths["max_seq_length"]) == (12, 40, 40)
    ours, st = _check(tmp_path / "m")
    assert ours.encode([LONG], kind="query").tolist() != ours.encode([LONG], kind="document").tolist()
    _same(st.encode(SHORT, prompt_name="document"), ours.encode(SHORT, kind="document"))


def test_an_e5_folder_keeps_its_passage_prompt_for_encode_document(tiny_bert, tmp_path):
    from test_inherit import E5, st_folder

    save(from_pretrained(st_folder(tiny_bert, tmp_path / "e5", {"pooling_mode": "cls"}, E5)), tmp_path / "m")
    ours, st = _check(tmp_path / "m")
    assert ours.document_prompt == "passage: "
    _same(st.encode(SHORT, prompt_name="passage"), ours.encode(SHORT, kind="document"))


def test_prompt_excluded_from_the_mean(tiny_bert, tmp_path):
    save(from_pretrained(tiny_bert, pooling=Mean(exclude_prompt=True), query_prompt="query: "), tmp_path / "m")
    _check(tmp_path / "m")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_decoder_llm_appends_the_eos_in_sentence_transformers_too(request, family, tmp_path):
    path = request.getfixturevalue(f"tiny_{family}")
    model = from_pretrained(path, pooling=LastToken(), append_eos=True, query_prompt="q: ", query_max_length=8,
                            document_max_length=32)
    save(model, tmp_path / "m")
    ours, st = _check(tmp_path / "m")
    ids = st.tokenize(["hello world"])["input_ids"][0].tolist()
    assert ids[-1] == st.tokenizer.eos_token_id and ids.count(st.tokenizer.eos_token_id) == 1
    # embtune's own tokenisation of the saved folder is unchanged by the tokenizer appending EOS itself
    _same(ours.encode(TEXTS, kind="document"), model.encode(TEXTS, kind="document"))


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_lora_llm(tiny_qwen2, tmp_path, mode):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": mode}
    model = from_pretrained(tiny_qwen2, pooling=LastToken(), append_eos=True, lora=lora, query_max_length=8,
                            document_max_length=32)
    with torch.no_grad():  # LoRA starts at B = 0; move it so that the adapters change the vectors
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    before = model.encode(TEXTS, kind="document")
    save(model, tmp_path / "m")
    assert (tmp_path / "m" / "adapter_config.json").is_file() == (mode == "adapter")
    ours, _ = _check(tmp_path / "m")
    _same(ours.encode(TEXTS, kind="document"), before)


def test_matryoshka_truncated_model_renormalises_in_sentence_transformers(tiny_bert, tmp_path):
    save(from_pretrained(tiny_bert, query_max_length=16, document_max_length=16), tmp_path / "full",
         matryoshka_dims=[32, 8])
    save(load(str(tmp_path / "full"), truncate_dim=8), tmp_path / "m")
    ours, st = _check(tmp_path / "m")
    vectors = st.encode_document(TEXTS)
    assert vectors.shape == (4, 8) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    full = load(str(tmp_path / "full")).encode(TEXTS)  # the first 8 dims of the full vector, re-normalised
    _same(vectors, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True))


def test_two_towers_say_what_sentence_transformers_loads(tiny_bert, tmp_path, caplog):
    model = from_pretrained(tiny_bert, pooling=Mean(), shared_weights=False, query_max_length=16,
                            document_max_length=16)
    with torch.no_grad():  # make the towers differ
        model.document_encoder.embeddings.word_embeddings.weight.mul_(2)
    with caplog.at_level(logging.WARNING, logger="embtune.model.io"):
        save(model, tmp_path / "m")
    assert "two towers" in caplog.text
    assert any("two towers" in d for d in json.loads((tmp_path / "m" / "embtune.json").read_text())[
        "sentence_transformers_differs"])
    ours = embtune.load(str(tmp_path / "m"))
    _same(_st(tmp_path / "m").encode_query(TEXTS), ours.encode(TEXTS, kind="query"))
    _same(_st(tmp_path / "m" / "document").encode_document(TEXTS), ours.encode(TEXTS, kind="document"))


def test_multi_vector_says_what_sentence_transformers_cannot_do(tiny_bert, tmp_path, caplog):
    model = from_pretrained_multi_vector(tiny_bert, multi_vector_dim=8)
    with caplog.at_level(logging.WARNING, logger="embtune.model.io"):
        save(model, tmp_path / "m")
    assert "multi-vector" in caplog.text and "MaxSim" in caplog.text


def test_one_length_warns_nothing(tiny_bert, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="embtune.model.io"):
        save(from_pretrained(tiny_bert, query_max_length=32, document_max_length=32), tmp_path / "m")
    assert "differs" not in caplog.text
    assert json.loads((tmp_path / "m" / "embtune.json").read_text())["sentence_transformers_differs"] == []
