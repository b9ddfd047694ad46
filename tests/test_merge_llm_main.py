"""main's multi-vector, Matryoshka load and token cache together with llm's prompts, EOS and towers."""

import numpy as np
import pytest
import torch

from embtune.data.token_cache import TokenCache
from embtune.model import MultiVectorEmbedder, from_pretrained, from_pretrained_multi_vector, load, save


def test_token_cache_is_skipped_for_prompts_and_eos(tiny_qwen2):
    model = from_pretrained(tiny_qwen2, query_prompt="q: ", append_eos=True)
    model.token_cache = TokenCache()
    texts = ["hello world", "a b"]
    expected = model.tokenize(texts, 16, "query")
    model.token_cache = TokenCache()
    got = model.tokenize(texts, 16, "query")
    assert len(model.token_cache) == 0
    assert torch.equal(got["input_ids"], expected["input_ids"])


def test_token_cache_without_prompt_matches_the_tokenizer(tiny_bert):
    model = from_pretrained(tiny_bert)
    plain = model.tokenize(["hello world", "a"], 16)
    model.token_cache = TokenCache()
    cached = model.tokenize(["hello world", "a"], 16)
    assert len(model.token_cache) == 2
    assert torch.equal(plain["input_ids"], cached["input_ids"])


def test_truncate_dim_keeps_prompts(tiny_bert, tmp_path):
    torch.manual_seed(0)
    save(from_pretrained(tiny_bert, query_prompt="query: "), tmp_path / "m", matryoshka_dims=[8])
    model = load(str(tmp_path / "m"), truncate_dim=8)
    assert model.query_prompt == "query: " and model.dim == 8
    e = model.encode(["hi there"], kind="query")
    assert e.shape == (1, 8) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def test_multi_vector_with_prompt_and_eos_saves_and_loads(tiny_qwen2, tmp_path):
    torch.manual_seed(0)
    model = from_pretrained_multi_vector(tiny_qwen2, query_prompt="q: ", append_eos=True, multi_vector_dim=8)
    assert isinstance(model, MultiVectorEmbedder)
    before = model.encode(["hello world"], kind="query")
    save(model, tmp_path / "mv")
    back = load(str(tmp_path / "mv"))
    assert isinstance(back, MultiVectorEmbedder) and back.query_prompt == "q: " and back.append_eos
    after = back.encode(["hello world"], kind="query")
    assert back.dim == 8
    for (_, a, _), (_, b, _) in zip(before.chunks, after.chunks):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="multi-vector"):
        load(str(tmp_path / "mv"), truncate_dim=4)


def test_multi_vector_refuses_two_towers(tiny_bert):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from embtune.config import CONFIG_PATH

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):  # one tower: no such option
        with pytest.raises(ConfigCompositionException, match="shared_weights"):
            compose("config", overrides=["model=multi_vector", "model.shared_weights=false"])
    encoder = from_pretrained(tiny_bert)
    with pytest.raises(ValueError, match="one shared tower"):
        MultiVectorEmbedder(encoder.encoder, encoder.tokenizer, encoder.pooling, document_encoder=encoder.encoder)
