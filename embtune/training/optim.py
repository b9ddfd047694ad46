"""AdamW parameter groups, the learning-rate schedule and the after-step clamp of a fine-tuning run."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn


def lr_at(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``
    (Goyal et al. 2017 warm-up; the schedule of HF's ``get_linear_schedule_with_warmup``)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def transformer_layers(tower: nn.Module) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks nearest the root of one tower (see
    :func:`layer_depths` for the names it takes in each family), or None when it has none."""
    n = getattr(tower.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in tower.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return min(lists, key=lambda item: item[0].count("."))[1] if lists else None  # T5: encoder.block, not block.N.layer


def layer_depths(tower: nn.Module) -> tuple[dict[int, int], int]:
    """The depth of each parameter of one transformer ``tower``, read from the model's own structure.

    The layers are the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks nearest the root, whatever
    its name: ``encoder.layer`` (BERT, RoBERTa), ``transformer.layer`` (DistilBERT), ``h`` (GPT-2, Falcon,
    BLOOM), ``layers`` (Llama, Qwen2, Mistral), ``encoder.block`` (T5, whose blocks hold a list of sub-layers
    of their own); under peft the same list inside the wrapper. Layer i (from 0) has depth i + 1; the
    parameters registered before the first layer (the embeddings) depth 0; those after the last (final
    norm, pooler) depth L.

    Returns:
        ``({id(parameter): depth}, L)``.

    Raises:
        ValueError: the tower has no such list (ALBERT's layers, for one, share a single set of weights).
    """
    layers = transformer_layers(tower)
    if layers is None:
        n = getattr(tower.config, "num_hidden_layers", None)
        raise ValueError(f"train.layerwise_lr_decay: {type(tower).__name__} has no list of num_hidden_layers={n} "
                         "layers to decay over; set train.layerwise_lr_decay=1.0")
    in_layer = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
    depths, seen_layer = {}, False
    for p in tower.parameters():
        seen_layer = seen_layer or id(p) in in_layer
        depths[id(p)] = in_layer.get(id(p), len(layers) if seen_layer else 0)
    return depths, len(layers)


def param_groups(model, loss_fn, t: DictConfig) -> list[dict]:
    """AdamW parameter groups.

    - Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA, App. A): a parameter at depth l of L
      (:func:`layer_depths`: embeddings 0, layer i + 1, final norm and pooler L) gets lr · decay^(L−l), so
      the top layer trains at ``train.lr`` and the embeddings at lr · decay^L; parameters outside the
      towers (a multi-vector projection) at lr. ``train.layerwise_lr_decay=1.0`` turns it off.
    - No weight decay on biases and LayerNorm weights (Devlin et al. 2019's BERT recipe, as in HF Trainer).
    - The loss's own parameters (a learnable temperature, ArcFace's class weights) at
      lr · ``loss.weight_lr_multiplier`` (1 when the loss has none).

    Raises:
        ValueError: layer-wise decay on a model without a layer list (see :func:`layer_depths`).
    """
    depth, n_layers = {}, 0
    if t.layerwise_lr_decay != 1.0:
        for tower in (model.encoder, getattr(model, "document_encoder", None)):
            if tower is not None:
                tower_depths, n_layers = layer_depths(tower)
                depth.update(tower_depths)
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.dim() < 2 else t.weight_decay  # biases and norm weights are 1-D
        lr = t.lr * t.layerwise_lr_decay ** (n_layers - depth.get(id(p), n_layers))
        groups.setdefault((lr, decay), []).append(p)
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.setdefault((t.lr * getattr(loss_fn, "weight_lr_multiplier", 1.0), 0.0), []).extend(loss_params)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def clamp_after_step(loss_fn) -> None:
    """After each optimiser step: a loss with a learnable temperature clamps it into its bounds
    (:meth:`embtune.losses.info_nce.InfoNCE.clamp_temperature`, CLIP's rule); other losses have none."""
    clamp = getattr(loss_fn, "clamp_temperature", None)
    if clamp is not None:
        clamp()
