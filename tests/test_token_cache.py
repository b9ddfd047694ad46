"""Token ids cached on disk: the same tensors as the tokenizer, each text tokenised once per sweep."""

import logging
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from embtune.data.token_cache import TokenCache, encode, tokenizer_fingerprint

TEXTS = ["def add(a, b): return a + b", "Return the sum.", "ünïcode ✓ text " * 40, "Return the sum."]


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it is asked to tokenise (``seen``; ``texts``: per text)."""

    def __init__(self, tok):
        self.tok, self.seen, self.texts = tok, 0, Counter()

    def __call__(self, texts, **kwargs):
        self.seen += len(texts)
        self.texts.update(texts)
        return self.tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_batches_equal_the_tokenizers_own(tiny_bert, side):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.padding_side = side
    expected = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    got = TokenCache().tokenize(tok, TEXTS, max_length=16)
    assert set(got) == set(expected)  # input_ids, attention_mask, token_type_ids (BERT)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert got["input_ids"].shape[1] == 16  # the long text is truncated to max_length


def test_each_text_is_tokenised_once_and_read_back_from_disk(tiny_bert, tmp_path):
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_bert))
    first = TokenCache(tmp_path / "tokens.pt")
    a = first.tokenize(tok, TEXTS, max_length=16)
    first.tokenize(tok, TEXTS[:2], max_length=16)
    assert tok.seen == 3  # three distinct texts, the repeats come from the table
    first.tokenize(tok, TEXTS[:1], max_length=8)  # another length: another table
    assert tok.seen == 4
    first.save()

    second = TokenCache(tmp_path / "tokens.pt")  # a later job of the sweep
    assert len(second) == 4
    b = second.tokenize(tok, TEXTS, max_length=16)
    assert tok.seen == 4 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_broken_cache_file_is_ignored_with_a_warning(tmp_path, tiny_bert, caplog):
    (tmp_path / "tokens.pt").write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        cache = TokenCache(tmp_path / "tokens.pt")
    assert len(cache) == 0 and "unreadable token cache" in caplog.text
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    assert cache.tokenize(tok, ["x"], 8)["input_ids"].tolist() == tok(["x"])["input_ids"]


def test_the_key_changes_with_the_tokenizer_files_not_the_weights(tiny_bert, tmp_path):
    import shutil

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    copy = tmp_path / "model"
    shutil.copytree(tiny_bert, copy)
    base = tokenizer_fingerprint(copy, tok)
    (copy / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_fingerprint(copy, tok) == base
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    assert tokenizer_fingerprint(copy, tok) != base
    tok.padding_side = "left"
    assert tokenizer_fingerprint(copy, tok) != tokenizer_fingerprint(copy, AutoTokenizer.from_pretrained(tiny_bert))


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_call_gives_the_truncated_ids_and_the_untruncated_length(tiny_bert, side):
    tok = CountingTokenizer(AutoTokenizer.from_pretrained(tiny_bert))
    tok.tok.truncation_side = side
    texts = TEXTS + ["", "a b c d e f g h i j k l m n o p", "x " * 45]  # empty, exactly at, well past 16 tokens
    ids, lengths = encode(tok, texts, max_length=16)
    assert tok.seen == len(texts)  # one call, each text once
    assert ids == tok.tok(texts, truncation=True, max_length=16)["input_ids"]
    assert lengths == [len(x) for x in tok.tok(texts)["input_ids"]]  # the tokenizer's own, untruncated
    assert max(lengths) > 16 * 2  # a text cut into several overflow windows is counted whole
