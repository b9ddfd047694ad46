"""FSDP2 (``train.strategy=fsdp``): each of W processes holds 1/W of every weight, gradient and optimiser state.

For models whose weights, gradients and AdamW moments (16 bytes a parameter in fp32) do not fit on one
device beside the activations, as DDP needs (decoder-LLM embedders, large encoders). Zhao et al. 2023,
"PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (VLDB), §3, in its per-parameter form
(``torch.distributed.fsdp.fully_shard``, "FSDP2"): every parameter is a DTensor split along dim 0. Each
transformer layer of each tower is one unit, the rest of the model (embeddings, final norm, pooler,
projection) the root unit; a unit's weights are all-gathered just before its forward and its backward and
freed after, and its gradients are reduce-scattered, *averaged* over the W processes as DDP's all-reduce
averages them, so the gradient is the whole W·B batch's (:mod:`embtune.training.distributed` gives the
argument; ``tests/test_fsdp.py`` checks it against one process within 1e-5).

GradCache (:mod:`embtune.training.grad_cache`) composes as it is: its graph-free first pass is a forward
under ``no_grad`` (gather, compute, free; no gradient hooks), and each mini-batch's re-forward and
backward reduce-scatters that mini-batch's share, summed into the sharded ``.grad``. Gradient sync is
left on for every backward (``set_requires_gradient_sync(False)`` would keep full-size unsharded
gradients until the last one: the memory FSDP is there to save). Every process runs the same number of
backward passes because every process has the same number of rows (``ShardedBatchSampler``).

What the loop does differently (``embtune.recipes.finetune``):

- gradient clipping takes the norm over all shards (:func:`clip_grad_norm_`);
- checkpoints are sharded through ``torch.distributed.checkpoint`` (:func:`save_sharded`), so no process
  holds the whole optimiser state;
- after training, the whole weights are gathered to rank 0's CPU into an unsharded copy of the model
  (:func:`skeleton`, :func:`full_model`), which evaluates and saves the sentence-transformers folder.

Each process loads the whole weights once before they are sharded (peak: one copy of the weights, in
``model.dtype``, per process); evaluation during training is refused (``embtune.config``).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embtune.training import checkpoint
from embtune.training.distributed import Dist
from embtune.training.optim import transformer_layers

log = logging.getLogger(__name__)

SHARDS = "shards-step{step:08d}"  # a sharded checkpoint's folder beside its ckpt-*.pt file


def active(strategy: str, d: Dist) -> bool:
    """Whether this run shards: ``train.strategy=fsdp`` in a world of more than one process. A world of one
    holds the whole model whatever the strategy, so ``fsdp`` there trains as a plain run (logged once)."""
    if strategy != "fsdp":
        return False
    if d.world == 1:
        log.info("train.strategy=fsdp with one process: nothing to shard, training as a single process")
    return d.world > 1


def layers(tower: nn.Module) -> list[nn.Module]:
    """The transformer blocks of one tower (a transformers model, or a peft model around one): its list of
    ``config.num_hidden_layers`` blocks (:func:`embtune.training.optim.transformer_layers`); [] when it has
    none (then the whole tower is sharded as part of the root unit)."""
    found = transformer_layers(tower)
    return list(found) if found is not None else []


def skeleton(model: nn.Module) -> nn.Module:
    """An unsharded copy of ``model`` whose parameters live on the meta device (no memory), made before
    :func:`wrap`; :func:`full_model` fills it with the gathered weights. Buffers (rotary tables, position
    ids) are copied, since a state dict may leave them out; the tokenizer and token cache are shared."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    for shared in (getattr(model, "token_cache", None), getattr(model, "tokenizer", None)):
        if shared is not None:
            memo[id(shared)] = shared
    return copy.deepcopy(model, memo)


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over the W processes: each tower's transformer layers (:func:`layers`),
    then the root. Returns ``model``, now an FSDP module whose parameters are DTensors; build the
    optimiser after this, from ``model.parameters()``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    towers = [t for t in (getattr(model, "encoder", None), getattr(model, "document_encoder", None)) if t is not None]
    for tower in towers:
        for layer in layers(tower):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` (sharded DTensors and plain tensors, e.g. a learnable temperature
    averaged by hand) so that their joint L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does on one process (which cannot mix the two kinds). Every process
    must call it: the norm of a sharded gradient is an all-reduce over its shards.

    Returns:
        The total norm before clipping, a scalar tensor, the same on every process.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float32) for g in grads]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    device = norms[0].device if norms else torch.device("cpu")
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2) if norms else torch.zeros(())
    scale = min(1.0, max_norm / (total.item() + 1e-6))  # one host sync a step; a float scales DTensors too
    for g in grads:
        g.mul_(scale)
    return total


def full_model(trained: nn.Module, plain: nn.Module, d: Dist, device: torch.device) -> nn.Module | None:
    """The trained weights, gathered to rank 0's CPU (``get_model_state_dict`` with a full state dict and
    CPU offload: one layer at a time on the device), loaded into ``plain`` (:func:`skeleton`) and moved to
    ``device``. Every process must call it; rank 0 gets the unsharded model, the others None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    plain.load_state_dict(full, assign=True)
    return plain.to(device)


def save_sharded(run_dir: str | Path, state: dict, model: nn.Module, optimizer, negatives_rng, d: Dist) -> Path | None:
    """A checkpoint of a sharded run; every process must call it.

    The weights and optimiser state go through ``torch.distributed.checkpoint`` (each process writes its own
    shards, no process gathers them) into ``checkpoints/shards-stepNNNNNNNN/``, with each process's random
    state beside them (``rng-RANK.pt``: each process samples its own hard negatives). Once every process has
    written, rank 0 writes ``state`` (the rest of :func:`embtune.training.checkpoint.training_state`, with
    ``weights=False``) as ``ckpt-last.pt`` naming that folder, as for one process, and removes the shard
    folders that neither ``ckpt-last.pt`` nor ``ckpt-prev.pt`` names. Shards are written under a temporary
    name first, so a crash leaves the earlier checkpoints as they were.

    Returns:
        The path of ``ckpt-last.pt`` on rank 0, None on the others.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / checkpoint.FOLDER
    name = SHARDS.format(step=state["step"])
    tmp = folder / f".{name}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    torch.save(checkpoint.rng_state(negatives_rng), tmp / f"rng-{d.rank}.pt")
    dist.barrier()
    path = None
    if d.main:
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        path = checkpoint.save(run_dir, {**state, "shards": name, "world": d.world})
        keep = {checkpoint.read(p).get("shards") for p in (folder / checkpoint.LAST, folder / checkpoint.PREV)
                if p.exists()}
        for old in folder.glob("shards-step*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def restore_sharded(state: dict, model: nn.Module, optimizer, negatives_rng, d: Dist) -> None:
    """Load what :func:`save_sharded` wrote into the sharded ``model`` and ``optimizer`` and this process's
    random state (``state`` from :func:`embtune.training.checkpoint.load`, which sets ``shards_dir``).

    A parameter that never had a gradient (a BERT pooler under mean pooling) has no AdamW state in the
    checkpoint, while ``get_state_dict`` gives a fresh optimiser state for every parameter: those are loaded
    partially and their state dropped again, so the optimiser is the one that was saved.

    Raises:
        ValueError: the run has another number of processes than the one that wrote the checkpoint (each
            process's share of the data, and its random state, would differ); a weight of the model is
            missing from the checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if d.world != state["world"]:
        raise ValueError(f"{state['shards_dir']}: a train.strategy=fsdp checkpoint of {state['world']} processes; "
                         f"resume it with {state['world']} processes (torchrun --nproc_per_node), not {d.world}")
    saved = set(dcp.FileSystemReader(state["shards_dir"]).read_metadata().state_dict_metadata)
    model_state, optim_state = get_state_dict(model, optimizer)
    missing = [k for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise ValueError(f"{state['shards_dir']}: the checkpoint has no weights for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}: it was written for another model")
    stateless = [k for k in optim_state["state"] if not any(s.startswith(f"optimizer.state.{k}.") for s in saved)]
    shards = {"model": model_state, "optimizer": optim_state}
    dcp.load(shards, checkpoint_id=state["shards_dir"], planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    params = dict(model.named_parameters())
    for name in stateless:
        optimizer.state.pop(params[name], None)
    rng = torch.load(Path(state["shards_dir"]) / f"rng-{d.rank}.pt", weights_only=True)
    checkpoint.set_rng_state(rng, negatives_rng)
