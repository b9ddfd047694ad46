"""What decoder LLMs need to serve as embedders: a pad token, one EOS at the end of every text, LoRA,
gradient checkpointing and a weight dtype. Each helper also works on encoders (BERT-like models).

Shape letters: B batch, T tokens.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ensure_pad_token(tokenizer, name: str) -> None:
    """Give a tokenizer without a pad token one, without growing the vocabulary.

    Decoder tokenizers (Llama, Mistral) often have none. We reuse EOS (else UNK) as the pad token: the
    attention mask, not the token id, tells padding from text, so a real EOS is never mistaken for
    padding, and the embedding matrix keeps its size (no resize, no untrained row).

    Raises:
        ValueError: the tokenizer has neither a pad, an EOS nor an UNK token.
    """
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            log.info("model %s: tokenizer has no pad token; padding with %r", name, candidate)
            return
    raise ValueError(f"model {name}: the tokenizer has no pad, EOS or UNK token to pad with")


def append_eos(rows: dict[str, list[list[int]]], eos_id: int, max_length: int) -> dict[str, list[list[int]]]:
    """Make every sequence end in exactly one EOS, within ``max_length`` tokens.

    A sequence that does not end in EOS is cut to ``max_length - 1`` tokens and EOS is appended, so a
    truncated text still ends in EOS. A tokenizer that adds EOS itself (Llama's ``add_eos_token``)
    already ends in it: nothing is added then, so EOS never appears twice. Last-token pooling reads the
    state of this EOS (Wang et al. 2023, E5-Mistral, §3.1).

    Args:
        rows: ``input_ids`` (B lists of at most ``max_length`` ids) and optionally ``prompt_mask`` (same
            lengths; the EOS gets 0).
    Returns:
        The same keys, each ``input_ids`` row ending in ``eos_id`` and at most ``max_length`` long.
    Raises:
        ValueError: ``max_length`` < 2 (no room for a token and the EOS).
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: appending EOS needs room for at least one token and the EOS")
    out = {key: [] for key in rows}
    for i, ids in enumerate(rows["input_ids"]):
        ends = bool(ids) and ids[-1] == eos_id
        keep = len(ids) if ends else min(len(ids), max_length - 1)
        out["input_ids"].append(ids[:keep] + ([] if ends else [eos_id]))
        if "prompt_mask" in rows:
            out["prompt_mask"].append(rows["prompt_mask"][i][:keep] + ([] if ends else [0]))
    return out


def weight_dtype(dtype: str, lora) -> torch.dtype:
    """``model.dtype`` -> the dtype the weights load in.

    ``auto``: bfloat16 when LoRA is on and a CUDA device supports bf16 (the frozen base weights then take
    half the memory, and peft keeps the trainable adapters in float32); float32 otherwise, so full
    fine-tuning keeps float32 master weights while ``train.bf16`` autocast computes in bf16.

    Raises:
        ValueError: an unknown dtype name.
    """
    if dtype == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if lora is not None and bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def apply_lora(encoder, lora):
    """Wrap ``encoder`` with LoRA adapters through peft (Hu et al. 2021, LoRA: W + (alpha/r)·B·A, §4.1).

    Args:
        lora: a mapping with ``r``, ``alpha``, ``dropout``, ``target_modules`` (module names, or
            ``all-linear``) and ``save`` (read by :mod:`embtune.model.io`); None leaves the encoder as is.
    Returns:
        The encoder, or a peft model in which only the adapters require gradients.
    Raises:
        ValueError: ``r`` < 1, or target modules that name no layer of the model.
    """
    if lora is None:
        return encoder
    from peft import LoraConfig, TaskType, get_peft_model

    if int(lora["r"]) < 1:
        raise ValueError(f"model.lora.r={lora['r']}: the LoRA rank must be >= 1 (model.lora=null turns LoRA off)")
    if lora.get("save", "merged") not in ("merged", "adapter"):
        raise ValueError(f"model.lora.save={lora['save']!r}: use merged or adapter")
    targets = lora["target_modules"]
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=int(lora["r"]), lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=targets, bias="none", task_type=TaskType.FEATURE_EXTRACTION)
    try:
        return get_peft_model(encoder, config)
    except ValueError as e:  # peft's message names the missing modules
        raise ValueError(f"model.lora.target_modules={targets}: {e}") from None


def enable_gradient_checkpointing(encoder) -> None:
    """Recompute activations in the backward pass instead of storing them (Chen et al. 2016).

    Non-reentrant checkpointing, plus input embeddings that require grad: with a frozen embedding layer
    (LoRA, or frozen embeddings) the checkpointed blocks would otherwise see inputs without grad and
    reentrant checkpointing would pass no gradient to the trainable weights inside them.

    Raises:
        ValueError: the model does not support gradient checkpointing.
    """
    if not getattr(encoder, "supports_gradient_checkpointing", True):
        raise ValueError(f"model.gradient_checkpointing: {type(encoder).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5 names it so
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    encoder.enable_input_require_grads()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] positions counted over real tokens only (0 for left padding), so a left-padded text gets
    the same positions as the same text right-padded or alone."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)
