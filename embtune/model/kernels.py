"""CPU kernels: training with dropout and encoding, the same computation with fewer passes over memory.

On a CPU, PyTorch's scaled-dot-product attention has no fused kernel with dropout, so training falls
back to its math path: it writes the whole [B,H,T,T] attention matrix several times over and draws one
Bernoulli variable per entry (a fifth of a MiniLM training step at batch 32 and 256 tokens goes to that
draw alone). Here instead:

- :func:`drop_mask` draws 64 random bits per four entries and drops an entry when its 16-bit slice is
  below ``round(p * 65536)``: the drop probability is ``p`` rounded to a multiple of 2^-16 (0.1 ->
  0.100006), and kept entries are scaled by the exact inverse of the keep probability, so the expected
  output equals the input as in inverted dropout (Srivastava et al. 2014, JMLR 15). The kernels apply
  it as :func:`keep_mask`, a 0/1 tensor they multiply by (vectorised, where ``masked_fill`` is not).
- :func:`attention` computes softmax(QKᵀ·scale + mask) with dropout, then the weighted sum of values, a
  few sequences at a time (chunks of about 2^20 scores, which stay in cache) and recomputes the
  probabilities in backward (as FlashAttention does, Dao et al. 2022), keeping only the keep mask
  (1 byte an entry; 2 in bf16).
- :class:`Dropout` is ``nn.Dropout`` with that mask (1 byte per entry kept for backward, not 4).

For encoding (no gradients) on a CPU, :func:`fused_linear` runs every ``nn.Linear`` through oneDNN
with prepacked weights and the bias added inside the matrix product, and a feed-forward block's exact
(erf) GELU fused onto its first product (what ``torch.compile``'s CPU backend does for frozen weights):
the same numbers, two passes fewer over each feed-forward activation.

Under bf16 autocast (``train.bf16``) q, k and v arrive in bf16: the scores are rounded to bf16 by their
product, then masked and soft-maxed in fp32, and the probabilities go back to bf16 for the product with V
(forward and backward). ``fused_linear(..., dtype=torch.bfloat16)`` packs bf16 copies of the weights.
On a busy machine these many short parallel regions need OpenMP's passive wait policy, which the ``embtune``
command sets (``embtune.training.threads``): with the default spinning policy a step of all-MiniLM-L6-v2
beside one busy core took several times longer than with it (docs/performance.md).

Off a CPU, without dropout (evaluation) or for anything unusual (causal or grouped-query attention,
position biases) :func:`attention` is transformers' own SDPA path. :func:`fast_dropout` switches a model
to these kernels for the length of a ``with`` block and back, so a saved model names plain SDPA.
Measured with ``benchmarks/train_throughput.py`` and ``benchmarks/encode_throughput.py`` (README,
Performance): training went from 0.77x sentence-transformers' pairs/s to 1.30x, at 55 % of its peak memory.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

NAME = "embtune_sdpa"  # the attention implementation transformers dispatches to while fast_dropout is on
_CHUNK_SCORES = 1 << 20  # attention scores per chunk: 4 MiB in fp32, so a chunk's passes stay in cache


def _threshold(p: float) -> int:
    return min(65536, max(0, round(p * 65536)))


def _slices(n: int) -> Tensor:
    """``n`` uniform 16-bit values (int16), four per 64-bit draw of PyTorch's default CPU generator."""
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2 ** 63), 2 ** 63 - 1)
    return bits.view(torch.int16)[:n]


def drop_mask(shape: tuple[int, ...], p: float) -> Tensor:
    """A bool mask of ``shape``, each entry True (dropped) with probability ``round(p·65536)/65536``.

    Draws from PyTorch's default CPU generator, so ``torch.manual_seed`` (and restoring its state, as
    GradCache does) reproduces it.
    """
    return (_slices(math.prod(shape)) < _threshold(p) - 32768).view(shape)


def keep_mask(shape: tuple[int, ...], p: float, out: Tensor | None = None) -> Tensor:
    """``~drop_mask(shape, p)`` from the same draws, as uint8 (1 = kept), or written to ``out`` (contiguous,
    of ``shape``, any dtype: 1 and 0 in it) when given. The kernels multiply by it: on a CPU a product with a 0/1 tensor is
    vectorised, where ``masked_fill`` with a bool mask runs element by element (about 6x slower)."""
    out = torch.empty(shape, dtype=torch.uint8) if out is None else out
    torch.ge(_slices(math.prod(shape)), _threshold(p) - 32768, out=out.view(-1))
    return out


def keep_scale(p: float) -> float:
    """1 / P(keep) for :func:`drop_mask` at ``p``: scaling kept entries by it leaves the mean unchanged."""
    return 65536 / (65536 - _threshold(p))


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        kept = keep_mask(tuple(x.shape), p)
        ctx.save_for_backward(kept)
        ctx.scale = keep_scale(p)
        return (x * ctx.scale).mul_(kept)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (kept,) = ctx.saved_tensors
        return (grad * ctx.scale).mul_(kept), None


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`keep_mask` in training on a CPU (any shape; the same
    shape out). Elsewhere, or with p = 1 (everything dropped), it is ``nn.Dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or _threshold(self.p) >= 65536:
            return super().forward(x)
        return _DropoutFn.apply(x, self.p)


def _chunks(batch: int, per_row: int):
    step = max(1, _CHUNK_SCORES // max(1, per_row))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16, fp16 -> fp32; fp32, fp64 unchanged


def _probs(q: Tensor, k: Tensor, blocked: Tensor | None, bias: Tensor | None, rows: slice) -> Tensor:
    """Attention probabilities of the chunk ``rows``, in fp32 or wider (bf16 q, k: their product is
    rounded to bf16, then the mask and the softmax run in fp32)."""
    scores = torch.matmul(q[rows], k[rows].transpose(-1, -2))  # q comes pre-scaled
    scores = scores.to(_wide(scores.dtype))
    if bias is not None:
        scores.add_(bias[rows] if bias.shape[0] > 1 else bias)
    if blocked is not None:  # finfo.min, not -inf: a fully masked row gets uniform weights, not NaN (as HF's eager path)
        scores.masked_fill_(blocked[rows] if blocked.shape[0] > 1 else blocked, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


class _AttentionFn(torch.autograd.Function):
    """softmax(Q Kᵀ · scale + mask) with dropout, times V; q [B,H,Tq,d], k and v [B,H,Tk,d] -> [B,H,Tq,d].
    ``blocked`` (bool, True = may not attend) or ``bias`` (additive float) broadcast to [B,H,Tq,Tk]."""

    @staticmethod
    def forward(ctx, q, k, v, blocked, bias, p, scale):
        # contiguous once here, not a copy per chunk; the scale goes on q [B,H,Tq,d], not on the scores
        q, k, v = (q * scale).contiguous(), k.contiguous(), v.contiguous()
        b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        out = torch.empty(b, h, tq, v.shape[-1], dtype=q.dtype)
        # a 16-bit v gets its mask in its own dtype (2 bytes an entry): a product of equal dtypes needs no
        # conversion pass; fp32 keeps 1-byte uint8, a quarter of what its own dtype would hold
        kept = torch.empty(b, h, tq, tk, dtype=v.dtype if v.dtype.itemsize == 2 else torch.uint8)
        with torch.autocast("cpu", enabled=False):  # the dtypes are set here, the same in backward
            for rows in _chunks(b, h * tq * tk):
                probs = _probs(q, k, blocked, bias, rows)
                keep = keep_mask(tuple(probs.shape), p, out=kept[rows])
                torch.matmul(probs.to(v.dtype).mul_(keep), v[rows], out=out[rows])
        ctx.save_for_backward(q, k, v, blocked, bias, kept)
        ctx.scale, ctx.keep_scale = scale, keep_scale(p)
        return out.mul_(ctx.keep_scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, blocked, bias, kept = ctx.saved_tensors  # q pre-scaled
        grad = (grad.contiguous() * ctx.keep_scale).to(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for rows in _chunks(q.shape[0], q.shape[1] * q.shape[2] * k.shape[2]):
            probs = _probs(q, k, blocked, bias, rows)  # recomputed in fp32: only the keep mask was kept
            keep = kept[rows]
            weights = probs.to(v.dtype, copy=True).mul_(keep)  # a copy: probs is needed below
            torch.matmul(weights.transpose(-1, -2), grad[rows], out=dv[rows])
            d_probs = torch.matmul(grad[rows], v[rows].transpose(-1, -2)).mul_(keep)
            d_scores = torch._softmax_backward_data(d_probs.to(probs.dtype), probs, -1, probs.dtype).to(q.dtype)
            torch.matmul(d_scores, k[rows], out=dq[rows])
            torch.matmul(d_scores.transpose(-1, -2), q[rows], out=dk[rows])
        return dq.mul_(ctx.scale), dk, dv, None, None, None, None


def _one_row(mask: Tensor) -> bool:
    """Whether every query row of ``mask`` [B,1,Tq,Tk] equals the first: a padding mask, which transformers
    materialises in full (one pass over B·Tq·Tk bytes, against a ``masked_fill`` per chunk it saves)."""
    row = mask[..., :1, :]
    return mask.stride(-2) == 0 or torch.equal(mask, row.expand_as(mask))


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query [B,H,Tq,d], key and value [B,H,Tk,d], mask
    broadcastable to [B,1,Tq,Tk] (bool: True = attend; or additive float) -> ([B,Tq,H,d], None).

    The chunked kernel above in training with dropout on a CPU for plain (bidirectional, one key head
    per query head) attention; transformers' SDPA function otherwise.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    chunked = (dropout > 0 and query.device.type == "cpu" and _threshold(dropout) < 65536
               and not getattr(module, "is_causal", False) and getattr(module, "num_key_value_groups", 1) == 1
               and key.shape[1] == query.shape[1] and not kwargs.get("is_causal")
               and all(kwargs.get(k) is None for k in ("position_bias", "softcap", "sliding_window", "s_aux")))
    if not chunked:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    blocked = bias = None
    if attention_mask is not None and attention_mask.dtype == torch.bool and _one_row(attention_mask):
        # padding only (every query row the same): an additive row [B,1,1,Tk] is cheaper to apply
        wide = _wide(query.dtype)  # the scores' dtype (see _probs)
        bias = torch.zeros(attention_mask[..., :1, :].shape, dtype=wide).masked_fill_(
            ~attention_mask[..., :1, :], torch.finfo(wide).min)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = ~attention_mask
    elif attention_mask is not None:
        bias = attention_mask
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _AttentionFn.apply(query, key, value, blocked, bias, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as SDPA


@contextlib.contextmanager
def _swapped(model: nn.Module, replacement):
    """Inside the block, each child module for which ``replacement(parent, name, child)`` returns a module
    is that module; every original is put back on exit, even on error."""
    swaps = [(parent, name, child, new) for parent in list(model.modules())
             for name, child in parent.named_children() if (new := replacement(parent, name, child)) is not None]
    for parent, name, _, new in swaps:
        setattr(parent, name, new)
    try:
        yield
    finally:
        for parent, name, child, _ in swaps:
            setattr(parent, name, child)


def _fast(parent: nn.Module, name: str, child: nn.Module) -> nn.Module | None:
    if type(child) is not nn.Dropout:
        return None
    return Dropout(child.p, child.inplace).train(child.training)


@contextlib.contextmanager
def fast_dropout(model: nn.Module, enabled: bool = True):
    """Within the block, ``model``'s SDPA attention runs :func:`attention` and its ``nn.Dropout`` layers
    are :class:`Dropout`; both are put back on exit (even on error), so evaluation and saving see the
    model as loaded. Models not on SDPA keep their attention; ``enabled=False`` changes nothing."""
    if not enabled:
        yield
        return
    _register()
    configs = list({id(m.config): m.config for m in model.modules()
                    if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}.values())
    with _swapped(model, _fast):
        for c in configs:
            c._attn_implementation = NAME
        try:
            yield
        finally:
            for c in configs:
                c._attn_implementation = "sdpa"


class _PackedLinear(nn.Module):
    """``linear`` (weights prepacked for oneDNN in ``dtype``) followed by ``post`` ("none" or "gelu": exact
    erf GELU); the input is cast to ``dtype`` (bf16: as autocast would), the output is in ``dtype``."""

    def __init__(self, linear: nn.Linear, post: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None)
        self.bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        self.post, self.dtype = post, dtype

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # the packed weight is a copy: gradients would never reach the real one
            raise RuntimeError("embtune.model.kernels.fused_linear is for encoding under torch.no_grad(), not training")
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, self.post, [],
                                                  "none" if self.post == "gelu" else "")


def _exact_gelu(act) -> bool:
    return getattr(act, "act", None) is torch.nn.functional.gelu or type(act) is nn.GELU and act.approximate == "none"


@contextlib.contextmanager
def fused_linear(model: nn.Module, enabled: bool = True, dtype: torch.dtype = torch.float32):
    """Within the block (meant for ``torch.no_grad`` encoding of fp32 CPU models), every ``nn.Linear`` of
    ``model`` is a prepacked oneDNN product with its bias fused, and a feed-forward block's first product
    (a module with ``dense`` and an exact-GELU ``intermediate_act_fn``: BERT, RoBERTa, XLM-R, MPNet, ...)
    has the GELU fused too. ``dtype=torch.bfloat16`` packs bf16 copies of the weights and casts each
    layer's input to bf16, as bf16 autocast does for ``nn.Linear`` (the fp32 weights stay as they are).
    Everything is put back on exit; the weights are read when the block starts, so do not train inside
    it. Does nothing when ``enabled`` is false, oneDNN is missing, or any weight is not an fp32 CPU tensor.

    Raises:
        RuntimeError: (from a swapped layer) a forward with gradients enabled inside the block.
    """
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    usable = (enabled and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and dtype in (torch.float32, torch.bfloat16)
              and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears))
    if not usable:
        yield
        return
    fused = {id(m) for m in model.modules()  # feed-forward blocks whose GELU moves into their first product
             if type(getattr(m, "dense", None)) is nn.Linear and _exact_gelu(getattr(m, "intermediate_act_fn", None))}

    def packed(parent: nn.Module, name: str, child: nn.Module) -> nn.Module | None:
        if type(child) is nn.Linear:
            return _PackedLinear(child, "gelu" if name == "dense" and id(parent) in fused else "none", dtype)
        return nn.Identity() if name == "intermediate_act_fn" and id(parent) in fused else None

    with _swapped(model, packed):
        yield
