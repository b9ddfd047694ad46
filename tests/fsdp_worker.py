"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: one step's gradients under FSDP2.

``torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL OUT POOLING GRAD_CACHE LORA``: rank 0 first computes the
reference alone, on a plain (unsharded) copy of the model: the whole batch of 4 examples, loss over hard
negatives, a plain backward. Then both processes shard the model (``embtune.training.fsdp.wrap``), each takes
2 of the 4 examples with cross-device negatives (and GradCache, one row at a time, when GRAD_CACHE is 1),
and rank 0 writes both sets of gradients (the sharded ones gathered whole) and the clipped norms to OUT.
LORA: ``1`` trains rank-4 LoRA adapters on every linear layer (peft; the base weights frozen), ``0`` all weights.
"""

import random
import sys

import torch

from embtune.data.batching import candidate_batch
from embtune.data.formats import Example
from embtune.losses.info_nce import InfoNCE
from embtune.model import from_pretrained
from embtune.model.pooling import LastToken, Mean
from embtune.negatives import Hard
from embtune.objectives import objective_for
from embtune.training import distributed, fsdp
from embtune.training.grad_cache import grad_cache_backward

EXAMPLES = [
    Example("how to sort a list", "sorted(xs) returns a new list", ("open a file", "join two paths")),
    Example("read a file", "open(path).read()", ("sort in place", "parse json text")),
    Example("parse json", "json.loads(s)", ("split a string", "read bytes")),
    # its first negative is example 0's positive (on the other process): a false negative for example 0
    Example("reverse a list", "xs[::-1]", ("sorted(xs) returns a new list", "format a date")),
]
MAX_NORM = 0.01  # small enough that clipping scales every gradient


def _model(model_dir: str, pooling: str, lora: str):
    torch.manual_seed(0)  # the same LoRA initialisation in every copy
    pool = LastToken() if pooling == "last_token" else Mean()
    adapters = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "save": "merged"}
    # eval: no dropout, the same maths on every process; llm-style EOS for last-token pooling
    return from_pretrained(model_dir, pooling=pool, append_eos=pooling == "last_token",
                           lora=adapters if lora == "1" else None).eval()


def _grads(model, loss_fn) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():  # every process gathers every sharded gradient, in the same order
        if p.grad is not None:
            out[n] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
    out["loss.log_inv_temperature"] = loss_fn.log_inv_temperature.grad.clone()
    return out


def main(model_dir: str, out: str, pooling: str, grad_cache: str, lora: str) -> None:
    d = distributed.setup("cpu")
    result = {}
    if d.main:  # the reference: one process, the whole batch, no sharding, no GradCache
        model, loss_fn = _model(model_dir, pooling, lora), InfoNCE(temperature=0.05, learnable=True)
        batch = candidate_batch(model, EXAMPLES, group_size=3, rng=random.Random(0))
        loss, _ = objective_for(loss_fn, Hard(group_size=3)).loss(model, batch, [(32, 1.0)])
        loss.backward()
        result["reference"] = _grads(model, loss_fn)
        params = [*(p for p in model.parameters() if p.requires_grad), loss_fn.log_inv_temperature]
        result["reference_norm"] = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        result["reference_clipped"] = _grads(model, loss_fn)

    model, loss_fn = _model(model_dir, pooling, lora), InfoNCE(temperature=0.05, learnable=True)
    per = len(EXAMPLES) // d.world
    batch = candidate_batch(model, EXAMPLES[d.rank * per:(d.rank + 1) * per], group_size=3, rng=random.Random(0))
    trained = fsdp.wrap(model, d, torch.device("cpu"))
    objective = objective_for(loss_fn, Hard(group_size=3, cross_device=True))
    if grad_cache == "1":
        grad_cache_backward(trained, batch, lambda e: objective.loss(trained, batch, [(32, 1.0)], e), 1)
    else:
        loss, _ = objective.loss(trained, batch, [(32, 1.0)])
        loss.backward()
    distributed.average_gradients([loss_fn.log_inv_temperature], d)
    sharded = _grads(trained, loss_fn)
    norm = fsdp.clip_grad_norm_([*(p for p in trained.parameters() if p.requires_grad), loss_fn.log_inv_temperature],
                                MAX_NORM)
    clipped = _grads(trained, loss_fn)
    if d.main:
        result.update(sharded=sharded, sharded_norm=norm, sharded_clipped=clipped)
        torch.save(result, out)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:6])
