"""AdamW parameter groups and the learning-rate schedule of a fine-tuning run."""

from __future__ import annotations

import re

from omegaconf import DictConfig


def lr_at(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``
    (Goyal et al. 2017 warm-up; the schedule of HF's ``get_linear_schedule_with_warmup``)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def param_groups(model, loss_fn, t: DictConfig) -> list[dict]:
    """AdamW parameter groups.

    - Layer-wise learning-rate decay for the encoder (Clark et al. 2020, ELECTRA, App. A): layer l of L
      gets lr · decay^(L−l), embeddings decay^L; ``train.layerwise_lr_decay=1.0`` turns it off.
    - No weight decay on biases and LayerNorm weights (Devlin et al. 2019's BERT recipe, as in HF Trainer).
    - The loss's own parameters (a learnable temperature, ArcFace's class weights) at
      lr · ``loss.weight_lr_multiplier`` (1 when the loss has none).
    """
    n_layers = model.encoder.config.num_hidden_layers
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = re.search(r"\.layers?\.(\d+)\.", name)
        depth = int(layer.group(1)) + 1 if layer else (0 if "embed" in name else n_layers)
        decay = 0.0 if p.dim() < 2 else t.weight_decay  # biases and norm weights are 1-D
        groups.setdefault((t.lr * t.layerwise_lr_decay ** (n_layers - depth), decay), []).append(p)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.setdefault((t.lr * getattr(loss_fn, "weight_lr_multiplier", 1.0), 0.0), []).extend(loss_params)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
