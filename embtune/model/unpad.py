"""An unpadded ("packed") forward for BERT-family encoders: per-token layers run on real tokens only.

A batch padded to its longest text spends every ``nn.Linear``, LayerNorm and GELU of every layer on the
padding too; queries (at most 64 tokens, typically ~20) padded to the longest of 32 waste a large share.
:func:`hidden_states` runs the embeddings on the padded batch [B,T] as the model does, then gathers the N
real tokens (``attention_mask.flatten().nonzero()``) into hidden [N,H]. In each layer the Q/K/V
projections, the attention output (dense, dropout, residual LayerNorm) and the feed-forward block
(dense + GELU, dense, dropout, residual LayerNorm) run on [N,H]; only the attention itself sees [B,T]:
q, k and v are scattered back to [B,heads,T,d] (zeros at the pads) and given, with the padding mask, to
the model's own attention function (SDPA, or :func:`embtune.model.kernels.attention` while
``fast_dropout`` is on), whose output [B,T,heads,d] is gathered back to [N,H]. The idea is the one of
FlashAttention's variable-length path, NVIDIA's packed BERT and ModernBERT's unpadding; here the
attention is re-padded instead of run varlen, so it works with any attention kernel.

Why it is exact: every layer except attention maps each token's vector on its own (a row-wise product,
a row-wise LayerNorm, an element-wise GELU and residual sum), so it commutes with selecting rows; and
the attention of a real query over keys with the pads masked out never reads a pad's value. The real
tokens' hidden states therefore equal the padded forward's, up to floating-point summation order (about
1e-6 in fp32). The returned [B,T,H] holds zeros at the pads, where the padded forward holds values that
poolings mask out anyway.

Dropout: masks of the per-token layers are drawn on [N,H], not [B,T,H], so a training run draws other
random numbers than the padded forward would (same distribution, different values); the embeddings'
and the attention probabilities' masks keep their padded shapes.

The layer's own modules are called (its ``nn.Linear``\\ s, LayerNorms, dropouts and activation), so LoRA
adapters (peft), bf16 autocast, :func:`embtune.model.kernels.fast_dropout`'s Dropout and
:func:`embtune.model.kernels.fused_linear`'s packed layers work unchanged. :func:`supported` decides
by explicit checks of module types and config; everything else takes the plain forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from embtune.model import kernels

_ATTENTION = ("sdpa", kernels.NAME)  # implementations whose padding mask create_bidirectional_mask builds
_KWARGS = {"position_ids", "token_type_ids"}  # what the embeddings take; any other keyword: the plain forward


def _families() -> dict[type, tuple[type, ...]]:
    """Model class -> (layer, attention, self-attention, attention output, intermediate, output) classes:
    the layer structure :func:`_layer` reproduces (modeling_bert.py, modeling_roberta.py, modeling_xlm_roberta.py)."""
    from transformers.models.bert import modeling_bert as b
    from transformers.models.roberta import modeling_roberta as r
    from transformers.models.xlm_roberta import modeling_xlm_roberta as x

    return {
        b.BertModel: (b.BertLayer, b.BertAttention, b.BertSelfAttention, b.BertSelfOutput, b.BertIntermediate,
                      b.BertOutput),
        r.RobertaModel: (r.RobertaLayer, r.RobertaAttention, r.RobertaSelfAttention, r.RobertaSelfOutput,
                         r.RobertaIntermediate, r.RobertaOutput),
        x.XLMRobertaModel: (x.XLMRobertaLayer, x.XLMRobertaAttention, x.XLMRobertaSelfAttention,
                            x.XLMRobertaSelfOutput, x.XLMRobertaIntermediate, x.XLMRobertaOutput),
    }


def base_model(encoder: nn.Module) -> nn.Module | None:
    """The transformers model inside ``encoder`` that :func:`hidden_states` can run unpadded, or None.

    ``encoder`` itself, or the base model of a peft LoRA model (adapters only wrap linear layers). None for
    anything else: another architecture (decoder LLMs, DeBERTa's relative positions, T5's position biases...),
    a decoder or cross-attention configuration, non-absolute position embeddings, an attention other than
    SDPA (eager, flash: ``output_attentions`` needs eager), output of attentions or all hidden states asked
    by the config, other peft methods (prompt tuning changes the inputs), or layers replaced by a subclass
    (FSDP2's sharded layers, whose hooks run in the layer's own call).
    """
    model = encoder
    if type(encoder).__module__.startswith("peft."):
        from peft import PeftModel, PeftType

        if not isinstance(encoder, PeftModel):
            return None
        configs = list(encoder.peft_config.values())
        if not configs or any(c.peft_type != PeftType.LORA or c.is_prompt_learning for c in configs):
            return None
        model = encoder.get_base_model()
    family = _families().get(type(model))
    config = getattr(model, "config", None)
    if family is None or config is None:
        return None
    if (config.is_decoder or getattr(config, "add_cross_attention", False)
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or config._attn_implementation not in _ATTENTION
            or getattr(config, "output_attentions", False) or getattr(config, "output_hidden_states", False)):
        return None
    layer_t, attention_t, self_t, self_out_t, inter_t, out_t = family
    for layer in model.encoder.layer:
        if (type(layer) is not layer_t or type(layer.attention) is not attention_t
                or type(layer.attention.self) is not self_t or type(layer.attention.output) is not self_out_t
                or type(layer.intermediate) is not inter_t or type(layer.output) is not out_t
                or getattr(layer, "add_cross_attention", False)):
            return None
    return model


def supported(encoder: nn.Module, **kwargs) -> bool:
    """Whether :func:`hidden_states` runs ``encoder`` with these extra forward keywords (see :func:`base_model`;
    only ``position_ids`` and ``token_type_ids`` are taken)."""
    return set(kwargs) <= _KWARGS and base_model(encoder) is not None


def hidden_states(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
    """The last hidden state [B,T,H] of a :func:`supported` encoder, its layers run on real tokens only.

    Args:
        encoder: a BERT, RoBERTa or XLM-R model (or a peft LoRA model around one).
        input_ids, attention_mask: [B,T] (1 = real token; padding on either side, or none).
        **kwargs: ``position_ids`` / ``token_type_ids`` [B,T] for the embeddings.
    Returns:
        [B,T,H] in the dtype the last layer computes in (bf16 under bf16 autocast's linears, as the plain
        forward), zeros at the pads. The pooler is not run (``pooler_output`` is never used for embeddings).
    Raises:
        ValueError: an encoder :func:`supported` refuses (callers check first).
    """
    from transformers.masking_utils import create_bidirectional_mask

    model = base_model(encoder)
    if model is None or not set(kwargs) <= _KWARGS:
        raise ValueError(f"no unpadded forward for {type(encoder).__name__} with {sorted(kwargs)}")
    B, T = input_ids.shape
    embedded = model.embeddings(input_ids=input_ids, **kwargs)  # [B,T,H], with the embeddings' own dropout
    H = embedded.shape[-1]
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=embedded, attention_mask=attention_mask)
    real = attention_mask.flatten().nonzero().squeeze(1)  # [N] indices into B*T
    dense = real.numel() == B * T  # no padding: gathering and scattering are views
    hidden = embedded.reshape(B * T, H) if dense else embedded.reshape(B * T, H).index_select(0, real)

    def pad(x: Tensor) -> Tensor:  # [N,A] -> [B*T,A], zeros at the pads
        return x if dense else x.new_zeros(B * T, x.shape[-1]).index_copy(0, real, x)

    def unpad(x: Tensor) -> Tensor:  # [B*T,A] -> [N,A]
        return x if dense else x.index_select(0, real)

    for layer in model.encoder.layer:
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            # as transformers' GradientCheckpointingLayer: non-reentrant, the RNG replayed for the recompute
            hidden = checkpoint(_layer, layer, hidden, mask, pad, unpad, B, T, use_reentrant=False)
        else:
            hidden = _layer(layer, hidden, mask, pad, unpad, B, T)
    return pad(hidden).view(B, T, -1)


def _layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None, pad, unpad, B: int, T: int) -> Tensor:
    """One BERT layer on real tokens: hidden [N,H] -> [N,H]; attention on [B,heads,T,d] with ``mask``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = layer.attention.self
    q, k, v = attn.query(hidden), attn.key(hidden), attn.value(hidden)  # [N,A] each, A = heads * d
    qkv = pad(torch.cat([q, k, v], dim=-1)).view(B, T, 3, -1, attn.attention_head_size)  # one scatter, not 3
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B,heads,T,d] each
    function = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
    context, _ = function(attn, q, k, v, mask, dropout=attn.dropout.p if attn.training else 0.0,
                          scaling=attn.scaling)  # [B,T,heads,d]
    context = unpad(context.reshape(B * T, -1))  # [N,A]
    attended = layer.attention.output(context, hidden)  # dense, dropout, LayerNorm(· + hidden)
    return layer.output(layer.intermediate(attended), attended)  # GELU feed-forward, dropout, LayerNorm(· + ·)
