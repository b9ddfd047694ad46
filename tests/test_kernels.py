"""embtune.model.kernels: the CPU dropout mask's rate, and attention and dropout that equal the textbook
formulas (forward and every gradient) when given the same mask; the model-level switch and its undoing."""

import random

import pytest
import torch
from torch import nn

import embtune.model.kernels as K
from embtune.data.batching import candidate_batch
from embtune.losses.info_nce import InfoNCE
from embtune.model import from_pretrained
from embtune.model.pooling import Mean
from embtune.negatives import Hard
from embtune.objectives import objective_for
from embtune.training.grad_cache import grad_cache_backward


def test_the_drop_rate_is_p_rounded_to_a_multiple_of_2_to_the_minus_16_and_seeded():
    torch.manual_seed(0)
    m = K.drop_mask((1000, 1000), 0.1)
    p = 6554 / 65536  # round(0.1 * 65536) / 65536
    sd = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(m.float().mean().item() - p) < 5 * sd
    assert K.keep_scale(0.1) == pytest.approx(1 / (1 - p), rel=1e-12)
    torch.manual_seed(0)
    assert torch.equal(K.drop_mask((1000, 1000), 0.1), m)
    assert not K.drop_mask((4096,), 0.0).any() and K.keep_scale(0.0) == 1.0


def test_the_keep_mask_is_the_complement_of_the_drop_mask_from_the_same_draws():
    torch.manual_seed(1)
    dropped = K.drop_mask((3, 5, 7), 0.3)
    torch.manual_seed(1)
    out = torch.full((2, 3, 5, 7), 9, dtype=torch.uint8)
    kept = K.keep_mask((3, 5, 7), 0.3, out=out[1])
    assert kept.dtype == torch.uint8 and kept.data_ptr() == out[1].data_ptr()
    assert torch.equal(out[1], (~dropped).to(torch.uint8)) and bool((out[0] == 9).all())


def _reference_attention(q, k, v, mask, p, scale, seed):
    """softmax(Q Kᵀ·scale + mask), dropped entries zeroed and kept ones scaled by 1/P(keep), times V;
    the masks redrawn from ``seed`` one sequence at a time, as the kernel draws them at one row per chunk."""
    torch.manual_seed(seed)
    b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    dropped = torch.cat([K.drop_mask((1, h, tq, tk), p) for _ in range(b)])
    scores = q @ k.transpose(-1, -2) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    weights = scores.softmax(-1).masked_fill(dropped, 0) * K.keep_scale(p)
    return (weights @ v).transpose(1, 2)


def _masks(b, tq, tk):
    lengths = torch.tensor([tk, tk - 2, 3])[:b]
    padding = (torch.arange(tk)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, tq, tk)
    arbitrary = torch.rand(b, 1, tq, tk, generator=torch.Generator().manual_seed(5)) > 0.3
    arbitrary[..., 0] = True
    additive = torch.zeros(b, 1, tq, tk, dtype=torch.float64).masked_fill(~arbitrary, -1e4)
    return {"padding (expanded bool)": padding, "any bool": arbitrary, "additive float": additive}


@pytest.mark.parametrize("kind", list(_masks(3, 5, 7)))
def test_attention_equals_the_formula_with_the_same_masks(kind, monkeypatch):
    b, h, tq, tk, d = 3, 2, 5, 7, 4
    monkeypatch.setattr(K, "_CHUNK_SCORES", h * tq * tk)  # one sequence per chunk: several chunks
    torch.manual_seed(0)
    # HF hands over transposed views [B,H,T,d] of [B,T,H,d] projections: not contiguous
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for t in (tq, tk, tk))
    mask = _masks(b, tq, tk)[kind]
    torch.manual_seed(7)
    out, weights = K.attention(nn.Module(), q, k, v, mask, dropout=0.3, scaling=0.4)
    ref = _reference_attention(q, k, v, mask, 0.3, 0.4, seed=7)
    assert weights is None and out.shape == (b, tq, h, d)
    assert (out - ref).abs().max().item() < 1e-12
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert max((g - x).abs().max().item() for g, x in zip(got, want)) < 1e-12


def test_without_dropout_or_for_causal_attention_it_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    causal = nn.Module()
    causal.is_causal = True
    for module, p in ((nn.Module(), 0.0), (causal, 0.0)):
        out, _ = K.attention(module, q, k, v, None, dropout=p, is_causal=getattr(module, "is_causal", False))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=getattr(module, "is_causal", False))
        assert (out - ref.transpose(1, 2)).abs().max().item() < 1e-6


def test_dropout_equals_the_formula_and_sends_gradients_through_kept_entries_only():
    x = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    layer = K.Dropout(0.25).train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = K.drop_mask((4, 6, 8), 0.25)
    assert torch.equal(y, (x * K.keep_scale(0.25)).masked_fill(dropped, 0))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.full_like(x, K.keep_scale(0.25)).masked_fill(dropped, 0))
    assert torch.equal(layer.eval()(x), x)


@pytest.fixture
def model(tiny_bert):
    torch.manual_seed(0)
    return from_pretrained(tiny_bert, pooling=Mean(), query_max_length=16, document_max_length=24)


def test_fast_dropout_switches_the_model_and_puts_it_back_even_on_error(model):
    tokens = model.tokenize(["a short one", "a much longer text about proteins in cells"])
    before = model.eval()(**tokens)
    with K.fast_dropout(model):
        assert model.encoder.config._attn_implementation == K.NAME
        assert all(type(m) is not nn.Dropout for m in model.modules())
        assert torch.allclose(model(**tokens), before, atol=1e-6)  # eval: no dropout, SDPA as before
    assert model.encoder.config._attn_implementation == "sdpa"
    assert sum(type(m) is nn.Dropout for m in model.modules()) > 0
    assert not any(isinstance(m, K.Dropout) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), K.fast_dropout(model):
        raise RuntimeError("inside")
    assert model.encoder.config._attn_implementation == "sdpa"
    with K.fast_dropout(model, enabled=False):
        assert model.encoder.config._attn_implementation == "sdpa"


def test_with_nothing_dropped_training_mode_equals_evaluation_mode(model, monkeypatch):
    """The kernels' plumbing through a real model (HF's masks, head layout): with every mask empty and no
    rescaling, a training-mode forward and its gradients equal the evaluation-mode SDPA ones."""
    monkeypatch.setattr(K, "keep_mask", lambda shape, p, out=None: (
        torch.empty(shape, dtype=torch.uint8) if out is None else out).fill_(1))
    monkeypatch.setattr(K, "keep_scale", lambda p: 1.0)
    tokens = model.tokenize(["a short one", "a much longer text about proteins in cells", "x"])
    want = model.eval()(**tokens)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.encoder.parameters()), allow_unused=True)
    with K.fast_dropout(model):
        got = model.train()(**tokens)
        got_grads = torch.autograd.grad(got.square().sum(), list(model.encoder.parameters()), allow_unused=True)
    assert (got - want).abs().max().item() < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(got_grads, want_grads) if a is not None) < 1e-5


def test_grad_cache_still_equals_the_plain_computation_under_fast_dropout(model):
    """GradCache replays the RNG to redraw each mini-batch's masks: that must hold for these masks too."""
    from test_grad_cache import _examples, _grads, _plain_chunked  # tests/ is on sys.path (pytest prepend mode)

    model.train()
    loss_fn = InfoNCE(temperature=0.05)
    batch = candidate_batch(model, _examples(2), 3, random.Random(0))
    loss_of = lambda e: objective_for(loss_fn, Hard(group_size=3)).loss(model, batch, [(32, 1.0)], e)  # noqa: E731
    with K.fast_dropout(model):
        torch.manual_seed(123)
        ref_loss = _plain_chunked(model, batch, loss_of, 3)
        ref = _grads(model, loss_fn)
        torch.manual_seed(123)
        loss, _ = grad_cache_backward(model, batch, loss_of, 3)
        got = _grads(model, loss_fn)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert got.keys() == ref.keys() and max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-5


def test_fused_linear_encodes_the_same_numbers_and_puts_the_layers_back(model):
    texts = ["a short one", "a much longer text about proteins in cells", "x", "dna repair in yeast"]
    with torch.no_grad():
        want = model.eval()(**model.tokenize(texts)).numpy()  # plain layers
    linears = sum(type(m) is nn.Linear for m in model.modules())
    with K.fused_linear(model):
        packed = [m for m in model.modules() if isinstance(m, K._PackedLinear)]
        assert len(packed) == linears and not any(type(m) is nn.Linear for m in model.modules())
        # one feed-forward block per layer gets its GELU fused; its activation step is then the identity
        assert sum(m.post == "gelu" for m in packed) == model.encoder.config.num_hidden_layers
        with torch.no_grad():
            got = model(**model.tokenize(texts))
        with pytest.raises(RuntimeError, match="no_grad"):  # training through a packed copy would lose gradients
            model(**model.tokenize(texts))
    assert sum(type(m) is nn.Linear for m in model.modules()) == linears
    assert not any(isinstance(m, (K._PackedLinear, nn.Identity)) for m in model.modules())
    assert abs(got.numpy() - want).max() < 1e-6
    assert abs(model.encode(texts) - want).max() < 1e-6 and abs(model.encode(texts, bf16=False) - want).max() < 1e-6


def test_attention_in_bf16_is_the_fp64_formula_within_bf16_rounding_and_keeps_its_dtypes(monkeypatch):
    """bf16 q, k, v (as autocast hands them over): the same masks as the fp64 formula, outputs and
    gradients in bf16, and within bf16 rounding of it (8 significand bits: 2^-9 relative per rounding,
    a few roundings on the way: 3e-2 of the largest value)."""
    b, h, tq, tk, d = 3, 2, 5, 7, 4
    monkeypatch.setattr(K, "_CHUNK_SCORES", h * tq * tk)  # one sequence per chunk, as the reference draws
    torch.manual_seed(0)
    q64, k64, v64 = (torch.randn(b, t, h, d, dtype=torch.float64).transpose(1, 2) for t in (tq, tk, tk))
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q64, k64, v64))
    mask = _masks(b, tq, tk)["padding (expanded bool)"]
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = K.attention(nn.Module(), q, k, v, mask, dropout=0.3, scaling=0.4)
    # the reference from the bf16-rounded inputs in fp64: only the kernel's own roundings differ
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference_attention(*ref_in, mask, 0.3, 0.4, seed=7)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max().item() < 3e-2 * ref.abs().max().item()
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), ref_in)
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert all((g.double() - x).abs().max().item() < 3e-2 * x.abs().max().item() for g, x in zip(got, want))


def test_dropout_under_bf16_autocast_keeps_bf16_and_drops_as_in_fp32():
    x = torch.randn(4, 6, 8).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = K.Dropout(0.25).train()(x)
    torch.manual_seed(3)
    dropped = K.drop_mask((4, 6, 8), 0.25)
    assert y.dtype == torch.bfloat16 and torch.equal(y == 0, dropped | (x == 0))
    assert torch.equal(y, (x * K.keep_scale(0.25)).masked_fill(dropped, 0))


def test_fused_linear_in_bf16_encodes_as_bf16_autocast_does(model, monkeypatch):
    """bf16 packed products (``encode(bf16=True)``) against the plain model under bf16 autocast: the same
    bf16 roundings of inputs and weights, so the two agree far closer than either agrees with fp32."""
    from embtune.training import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda *a: frozenset({"avx512_bf16"}))  # any CPU runs the test
    texts = ["a short one", "a much longer text about proteins in cells", "x", "dna repair in yeast"]
    tokens = model.tokenize(texts)
    with torch.no_grad():
        fp32 = model.eval()(**tokens).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(**tokens).float().numpy()
    got = model.encode(texts, bf16=True)
    assert model.bf16 is False  # put back
    assert got.dtype == fp32.dtype and abs(got - autocast).max() < 2e-2  # bf16 rounding: 2^-9 relative, a few times
    assert abs(got - fp32).max() < 5e-2 and abs(got - fp32).max() > 1e-6  # it did compute in bf16
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: frozenset({"avx2"}))
    with pytest.raises(ValueError, match=r"encode\(bf16=...\)=true"):
        model.encode(texts, bf16=True)
    assert abs(model.encode(texts, bf16="auto") - fp32).max() < 1e-6  # auto on a CPU without bf16: fp32
