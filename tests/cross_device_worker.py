"""Run by tests/test_cross_device.py: one training step's gradients with a loss over hard negatives.

``python tests/cross_device_worker.py MODEL OUT SYMMETRIC``: one process, the whole batch of 4 examples.
``torchrun --nproc_per_node 2 tests/cross_device_worker.py MODEL OUT SYMMETRIC``: two processes (gloo,
CPU), each with 2 of the 4 examples, DDP and cross-device negatives; rank 0 writes the averaged gradients.
SYMMETRIC: ``1`` for InfoNCE in both directions, ``0`` for anchors to candidates only.
"""

import random
import sys

import torch

from embtune.data.batching import candidate_batch
from embtune.data.formats import Example
from embtune.losses.info_nce import InfoNCE
from embtune.model import from_pretrained
from embtune.model.pooling import Mean
from embtune.negatives import Hard
from embtune.objectives import objective_for
from embtune.training import distributed

EXAMPLES = [
    Example("how to sort a list", "sorted(xs) returns a new list", ("open a file", "join two paths")),
    Example("read a file", "open(path).read()", ("sort in place", "parse json text")),
    Example("parse json", "json.loads(s)", ("split a string", "read bytes")),
    # its first negative is example 0's positive (on the other process): a false negative for example 0
    Example("reverse a list", "xs[::-1]", ("sorted(xs) returns a new list", "format a date")),
]


def main(model_dir: str, out: str, symmetric: str) -> None:
    d = distributed.setup("cpu")
    torch.manual_seed(0)
    model = from_pretrained(model_dir, pooling=Mean()).eval()  # eval: no dropout, same maths everywhere
    loss_fn = InfoNCE(temperature=0.05, learnable=True, symmetric=symmetric == "1")
    per = len(EXAMPLES) // d.world
    mine = EXAMPLES[d.rank * per:(d.rank + 1) * per]
    batch = candidate_batch(model, mine, group_size=3, rng=random.Random(0))
    trained = distributed.wrap(model, d, torch.device("cpu"))
    loss, _ = objective_for(loss_fn, Hard(group_size=3, cross_device=True)).loss(trained, batch, [(32, 1.0)])
    loss.backward()
    distributed.average_gradients([loss_fn.log_inv_temperature], d)
    if d.main:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        grads["loss.log_inv_temperature"] = loss_fn.log_inv_temperature.grad
        torch.save(grads, out)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
