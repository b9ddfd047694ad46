"""Decoder LLMs as embedders: pad token, EOS, padding sides, LoRA, gradient checkpointing, prompts, two
towers. Tiny random Qwen2 and Llama models are built in conftest.py (no download)."""

import json

import numpy as np
import pytest
import torch
from conftest import CONF, logged
from hydra import compose, initialize_config_dir

from embtune.model import Embedder, from_pretrained, pooling, save
from embtune.model.io import load_encoder
from embtune.model.llm import append_eos, enable_gradient_checkpointing
from embtune.recipes.finetune import train

POOLINGS = {"mean": pooling.Mean, "weighted_mean": pooling.WeightedMean, "max": pooling.Max,
            "cls": pooling.CLS, "last_token": pooling.LastToken}
TEXTS = ["def add(a, b): return a + b", "Return the sum of two numbers, or raise if either is not a number.", "hi"]


@pytest.fixture(params=["qwen2", "llama"])
def tiny_llm(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def _llm(path, pool="last_token", **kwargs) -> Embedder:
    return from_pretrained(path, pooling=POOLINGS[pool](), append_eos=True, **kwargs)


# -- EOS and pad token

def test_append_eos_hand_computed():
    E = 2
    rows = {"input_ids": [[5, 6, 7, 8, 9], [5, 6], [5, 6, 7, E], []],
            "prompt_mask": [[1, 1, 0, 0, 0], [1, 0], [1, 0, 0, 0], []]}
    out = append_eos(rows, eos_id=E, max_length=4)
    # truncated to 3 then EOS; short text gets EOS; a text the tokenizer already ended in EOS is kept; empty -> [EOS]
    assert out["input_ids"] == [[5, 6, 7, E], [5, 6, E], [5, 6, 7, E], [E]]
    assert out["prompt_mask"] == [[1, 1, 0, 0], [1, 0, 0], [1, 0, 0, 0], [0]]
    with pytest.raises(ValueError, match="max_length=1"):
        append_eos(rows, eos_id=E, max_length=1)


def test_tokenizer_without_pad_token_pads_with_eos_and_keeps_its_vocabulary(tiny_llama):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_llama)
    assert raw.pad_token is None  # the fixture is Llama-like: no pad token
    model = _llm(tiny_llama)
    assert model.tokenizer.pad_token == model.tokenizer.eos_token == "</s>"
    assert len(model.tokenizer) == len(raw) == model.encoder.config.vocab_size
    assert model.encoder.get_input_embeddings().weight.shape[0] == len(raw)


@pytest.mark.parametrize("side", ["left", "right"])
def test_eos_appended_exactly_once_also_after_truncation(tiny_llm, side):
    model = _llm(tiny_llm)
    model.tokenizer.padding_side = side
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    long, short = "word " * 50, "hi"
    plain = model.tokenizer([long, short])["input_ids"]
    batch = model.tokenize([long, short], max_length=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 8)
    real = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert real[0] == plain[0][:7] + [eos]  # truncated to max_length - 1, then EOS
    assert real[1] == plain[1] + [eos]
    assert [r.count(eos) for r in real] == [1, 1]
    assert mask[1].sum() == len(plain[1]) + 1
    padding = ids[1][~mask[1].bool()]
    assert (padding == pad).all()  # pad id == EOS id: the mask, not the id, tells them apart
    assert (mask[1][:len(real[1])].all() if side == "right" else mask[1][-len(real[1]):].all())


def test_a_tokenizer_that_adds_eos_itself_gets_no_second_one(tiny_llama):
    from tokenizers import processors

    model = _llm(tiny_llama)
    bos, eos = model.tokenizer.bos_token_id, model.tokenizer.eos_token_id
    model.tokenizer._tokenizer.post_processor = processors.TemplateProcessing(  # Llama's add_eos_token=True
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    assert model.tokenizer("hi")["input_ids"][-1] == eos
    batch = model.tokenize(["word " * 50, "hi"], max_length=8)
    real = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert len(real[0]) == 8 and real[0][0] == bos and real[0][-1] == eos
    assert real[1] == model.tokenizer("hi")["input_ids"]
    assert [r.count(eos) for r in real] == [1, 1]


# -- padding sides and batches

@pytest.mark.parametrize("pool", list(POOLINGS))
def test_left_right_and_alone_give_the_same_embedding(tiny_llm, pool):
    model = _llm(tiny_llm, pool)
    alone = np.stack([model.encode([t]) [0] for t in TEXTS])
    model.tokenizer.padding_side = "right"
    right = model.encode(TEXTS)
    model.tokenizer.padding_side = "left"
    left = model.encode(TEXTS)
    assert np.abs(right - alone).max() < 1e-5 and np.abs(left - alone).max() < 1e-5


def test_last_token_pooling_reads_the_eos_state(tiny_llama):
    model = _llm(tiny_llama)
    model.normalize = False
    model.tokenizer.padding_side = "left"
    batch = model.tokenize(TEXTS)
    hidden = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(min=0)).last_hidden_state
    assert (batch["input_ids"][:, -1] == model.tokenizer.eos_token_id).all()
    torch.testing.assert_close(model(**batch), hidden[:, -1])


# -- gradient checkpointing

def test_gradient_checkpointing_with_a_frozen_embedding_gives_the_same_gradients(tiny_llama):
    def grads(checkpointing):
        torch.manual_seed(0)
        encoder = load_encoder(tiny_llama)
        encoder.get_input_embeddings().weight.requires_grad_(False)
        if checkpointing:
            enable_gradient_checkpointing(encoder)
        encoder.train()
        ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 2]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        encoder(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        return {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "layers.0.self_attn.q_proj.weight" in plain
    for name, g in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6)


# -- training through the loop

def _run(tmp_path, model_path, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=llm", f"model.name_or_path={model_path}", "model.query_max_length=32",
            "model.document_max_length=64", "data.max_train_pairs=16", "data.max_test_queries=8",
            "train.batch_size=8", "train.max_steps=3", "train.lr=1e-3", "train.log_every=1",
            "eval.before=false", "eval.after=false", *overrides])
    return logged(train, cfg, tmp_path), cfg


def _losses(tmp_path):
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_llm_trains_with_last_token_pooling(tmp_path, tiny_llm, lora, checkpointing):
    import embtune

    summary, cfg = _run(tmp_path, tiny_llm, [f"model.gradient_checkpointing={checkpointing}",
                                             *([] if lora else ["model.lora=null"])])
    assert summary["steps"] == 3 and all(np.isfinite(_losses(tmp_path)))
    saved = tmp_path / "model"
    meta = json.loads((saved / "embtune.json").read_text())
    assert meta["pooling"] == "LastToken" and meta["append_eos"] is True  # model=llm's default pooling
    assert not (saved / "adapter_config.json").exists()  # LoRA merged: a plain model folder
    base = load_encoder(tiny_llm).state_dict()
    tuned = load_encoder(saved).state_dict()
    assert tuned.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed)
    if lora:  # LoRA leaves what it does not target (embeddings, norms) untouched
        assert not any("embed_tokens" in k or "norm" in k for k in changed)
    emb = embtune.load(str(saved)).encode(TEXTS, kind="query")
    assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_lora_trains_only_the_adapters_and_a_merged_save_equals_the_adapter_model(tiny_qwen2, tmp_path):
    import embtune

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "save": "merged"}
    model = _llm(tiny_qwen2, lora=lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA starts at B = 0; move it so that merging has something to merge
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    before = model.encode(TEXTS, kind="query")
    save(model, tmp_path / "merged")
    assert np.abs(embtune.load(str(tmp_path / "merged")).encode(TEXTS, kind="query") - before).max() < 1e-5


def test_lora_adapter_save_loads_with_its_base(tiny_qwen2, tmp_path):
    import embtune

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "adapter"}
    model = _llm(tiny_qwen2, lora=lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    before = model.encode(TEXTS)
    save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert np.abs(embtune.load(str(tmp_path / "adapter")).encode(TEXTS) - before).max() < 1e-5


def test_an_adapter_names_its_base_by_the_hub_id_it_was_named_by_and_loads_from_it(tiny_qwen2, tmp_path, monkeypatch):
    """A base named by hub id resolves to a local cache folder; the adapter must name the hub id (what
    another machine can download), while a base named by its folder keeps that path."""
    import embtune
    from embtune.model import io

    real = io.resolve_model_path
    cache = {"fake-org/tiny-qwen2": tiny_qwen2}  # the hub id and the folder the HF cache would hold
    monkeypatch.setattr(io, "resolve_model_path", lambda name: cache.get(name) or real(name))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "adapter"}
    model = _llm("fake-org/tiny-qwen2", lora=lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    before = model.encode(TEXTS)
    save(model, tmp_path / "from_hub")
    config = json.loads((tmp_path / "from_hub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "fake-org/tiny-qwen2"
    # loading finds the base through the same resolver (cache, hub), and the adapter on top of it
    assert np.abs(embtune.load(str(tmp_path / "from_hub")).encode(TEXTS) - before).max() < 1e-5

    save(_llm(tiny_qwen2, lora=lora), tmp_path / "from_folder")
    config = json.loads((tmp_path / "from_folder" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_qwen2


@pytest.mark.parametrize("lora,match", [
    ({"r": 0, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "merged"}, r"model.lora.r=0"),
    ({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["no_such_proj"], "save": "merged"},
     r"model.lora.target_modules=\['no_such_proj'\]"),
    ({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "zip"}, r"model.lora.save='zip'"),
])
def test_bad_lora_settings_are_named(tiny_qwen2, lora, match):
    with pytest.raises(ValueError, match=match):
        _llm(tiny_qwen2, lora=lora)


def test_bad_dtype_is_named(tiny_qwen2):
    with pytest.raises(ValueError, match=r"model.dtype='fp8'"):
        _llm(tiny_qwen2, dtype="fp8")


# -- dtype

def test_auto_dtype_is_bf16_only_for_lora_on_a_bf16_gpu(monkeypatch):
    from embtune.model.llm import weight_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weight_dtype("auto", {"r": 4}) == torch.bfloat16
    assert weight_dtype("auto", None) == torch.float32  # full fine-tuning keeps float32 master weights
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert weight_dtype("auto", {"r": 4}) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert weight_dtype("auto", {"r": 4}) == torch.float32 and weight_dtype("bfloat16", None) == torch.bfloat16


def test_bf16_base_with_float32_adapters_trains_and_encodes(tiny_qwen2):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "merged"}
    model = _llm(tiny_qwen2, dtype="bfloat16", lora=lora)
    assert model.encoder.get_input_embeddings().weight.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # peft keeps adapters fp32
    model.train()
    model(**model.tokenize(TEXTS)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in trainable.items() if "lora_B" in n)
    emb = model.encode(TEXTS)
    reference = _llm(tiny_qwen2).encode(TEXTS)  # float32 weights; LoRA starts at zero, so the same model
    assert emb.dtype == np.float32 and np.abs(emb - reference).max() < 0.05  # bf16 keeps ~3 digits
