"""Several processes under ``torchrun`` or SLURM's ``srun``: DDP, a rank-sharded batch sampler, cross-device
candidates.

One process per device (``torchrun --nproc_per_node N -m embtune.cli ...``, or ``srun --ntasks N python -m
embtune.cli ...``: :func:`process_env` reads either launcher's variables). ``train.batch_size`` is
the batch of one process; a step sees W·B examples. The gradient is that of the whole W·B batch on one
process, whatever W (``tests/test_cross_device.py`` checks it within 1e-5):

- each process's loss is the mean over its own B anchors, scored against the W·B gathered candidates;
- :func:`gather` is ``torch.distributed.nn.functional.all_gather``, whose backward *sums* every
  process's gradient with respect to a gathered slice into the process that owns it;
- DDP then *averages* the parameter gradients over the W processes:
  (1/W)·Σ_r ∂L_r/∂θ = ∂/∂θ (mean over all W·B anchors) — the single-process loss, so no extra scaling.
  (Gathering without gradient and replacing the local slice instead would need every process to compute
  the loss over all W·B anchors, scaled by W to undo DDP's average.)

This holds for losses that average over anchors (InfoNCE, triplet); losses that average over pairs
(hinge) match when every process has the same number of real pairs.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler


@dataclass
class Dist:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process (rank 0) logs, evaluates and saves."""
        return self.rank == 0


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """The device ``train.device`` names: ``auto`` is CUDA where this torch has a CUDA device, else the CPU.

    Raises:
        ValueError: a name torch does not know (``train.device=tpu``), or a CUDA device this torch or machine
            does not have (``train.device=cuda`` on a CPU-only build), naming the option and the value.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}={name!r}: not a device (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}={name}: this torch has no CUDA device (torch.cuda.is_available() is false); "
                         f"use {option}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup(device_kind: str) -> Dist:
    """Join the process group when started by ``torchrun`` or ``srun`` with more than one process
    (:func:`process_env`): NCCL on CUDA, gloo on CPU. A plain ``python -m embtune.cli`` run is a world of
    one and starts nothing.

    Raises:
        ValueError: (from :func:`process_env`) SLURM variables that do not make a process group.
    """
    env = process_env(os.environ)
    if env is None:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if env["launcher"] == "torchrun":  # its rendezvous set MASTER_ADDR/PORT, RANK, WORLD_SIZE
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"tcp://{env['master_addr']}:{env['master_port']}",
                                    rank=env["rank"], world_size=env["world"])
    return Dist(dist.get_rank(), dist.get_world_size(), env["local_rank"])


def process_env(environ) -> dict | None:
    """This process's place in a multi-process run, from its launcher's environment variables, or None for
    a world of one.

    - ``torchrun`` (``WORLD_SIZE`` set; it wins when SLURM's variables are there too, as under
      ``srun torchrun ...``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; its rendezvous gives the address.
    - ``srun`` (``SLURM_PROCID`` and ``SLURM_NTASKS`` > 1, no ``WORLD_SIZE``): rank ``SLURM_PROCID``,
      world ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``; the address is ``MASTER_ADDR``, else the first
      host of ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``; :func:`first_host`); the port ``MASTER_PORT``,
      else 20000 + the last four digits of ``SLURM_JOB_ID`` (the same on every task of a job, and
      different for jobs sharing a node, unless their ids end alike), else 29500.

    Returns:
        ``{launcher, rank, world, local_rank, master_addr, master_port}`` (address and port None under
        torchrun), or None when there is one process.
    Raises:
        ValueError: a SLURM rank outside 0..world−1, or no node list and no ``MASTER_ADDR``.
    """
    if "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        if world == 1:
            return None
        return {"launcher": "torchrun", "rank": int(environ.get("RANK", "0")), "world": world,
                "local_rank": int(environ.get("LOCAL_RANK", "0")), "master_addr": None, "master_port": None}
    if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return None
    rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} not in 0..SLURM_NTASKS-1 ({world - 1})")
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not environ.get("MASTER_ADDR") and not nodes:
        raise ValueError("srun with SLURM_NTASKS > 1 but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: "
                         "set MASTER_ADDR to the host of task 0")
    job = environ.get("SLURM_JOB_ID", "")
    port = int(environ.get("MASTER_PORT") or (20000 + int(job[-4:]) if job.isdigit() else 29500))
    return {"launcher": "srun", "rank": rank, "world": world, "local_rank": int(environ.get("SLURM_LOCALID", "0")),
            "master_addr": environ.get("MASTER_ADDR") or first_host(nodes), "master_port": port}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list in its compact form: ``node[01-03,07],gpu5`` -> ``node01``,
    ``a1,b2`` -> ``a1``, ``rack[2-3]-n[4-5]`` -> ``rack2-n4`` (the first value of every bracket, zero
    padding kept). ``scontrol show hostnames`` expands the whole list; only the first host is needed here.

    Raises:
        ValueError: an empty list or an unclosed bracket.
    """
    host, depth, balanced = "", 0, True
    for ch in nodelist.strip():  # up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        balanced = balanced and 0 <= depth <= 1
        if ch == "," and depth == 0:
            break
        host += ch
    if not host or depth != 0 or not balanced:
        raise ValueError(f"SLURM node list {nodelist!r}: not a host list like node[01-03,07]")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], host)


def barrier(d: Dist) -> None:
    """Wait for every process (rank 0 evaluates and saves while the others wait)."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` (picklable, e.g. a metrics dict) on every process; ``obj`` itself in a world of one."""
    if d.world == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, d: Dist) -> list | None:
    """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the others; ``[obj]`` in a world
    of one. Every process must call it."""
    if d.world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * d.world if d.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def agreed_signal(signum: int | None, d: Dist) -> int | None:
    """The largest signal number any process has received (None: none), the same on every process, so that
    all of them save the last checkpoint at the same step (each gives its random state, or its shards). One
    all-reduce; ``signum`` itself in a world of one."""
    if d.world == 1 or not dist.is_initialized():
        return signum
    box = torch.tensor([signum or 0])
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item()) or None


def teardown() -> None:
    """Leave the process group, if any, once the command is done (a two-stage run trains twice in it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """The model as the loop calls it: DDP across processes (gradients averaged at backward), else itself."""
    if d.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: an encoder's pooler (BERT's) is in the model but unused by our pooling
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Embedder inside a DDP wrapper (for ``normalize``, ``tokenize``, ``save``)."""
    return getattr(model, "module", model)


def average_gradients(params: list[Tensor], d: Dist) -> None:
    """Average over processes the gradients of parameters DDP does not hold (a learnable temperature,
    ArcFace's class weights, which live in the loss), so every process takes the same step."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world


def mean_over_processes(x: Tensor, d: Dist) -> float:
    """The mean of a scalar tensor over all processes (one all-reduce), as a float; ``x`` itself on one
    process. Every process must call it at the same step."""
    if d.world == 1:
        return x.item()
    total = x.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total.item() / d.world


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: Tensor) -> Tensor:
    """[N,...] on each of W processes -> [W·N,...] in rank order, every process the same. Gradients
    flow back to the local slice from every process's loss (the backward sums them). N must be equal on
    every process: :class:`ShardedBatchSampler` makes it so."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.13 marks it deprecated for a private replacement; it still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """As :func:`gather`, for tensors without gradient (masks, text keys)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class ShardedBatchSampler(Sampler[list[int]]):
    """Splits each batch of a global batch sampler into W equal contiguous parts, part ``rank`` for this
    process: process r gets examples [r·B, (r+1)·B) of each global batch, so the gathered candidates are
    the global batch in its order. The global sampler is built with batch size W·B, so its guarantees
    (e.g. no text twice, ``NoDuplicatesBatchSampler``) hold across all processes. A global batch that
    does not split evenly would be cut to a multiple of W (and dropped if that leaves no example per
    process), so every process runs the same number of steps with the same batch size; the loop's
    sampler plans multiples of W (``multiple=W``) and counts what it leaves out, so nothing is cut here.

    Raises:
        ValueError: rank not in 0..world−1.
    """

    def __init__(self, batches: Sampler[list[int]], rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in 0..{world - 1}")
        self.batches, self.rank, self.world = batches, rank, world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan the global batches of ``epoch``, starting at global batch ``start``."""
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch, start)

    def unbatched_in(self, epoch: int) -> int:
        """Rows the global plan of ``epoch`` leaves out (``NoDuplicatesBatchSampler.unbatched_in``)."""
        return self.batches.unbatched_in(epoch)

    def _parts(self) -> Iterator[list[int]]:
        for batch in self.batches:
            per = len(batch) // self.world
            if per:
                yield batch[self.rank * per:(self.rank + 1) * per]

    def __iter__(self) -> Iterator[list[int]]:
        return self._parts()

    def __len__(self) -> int:
        """Steps in the whole epoch, also when a resumed run starts it later."""
        start = getattr(self.batches, "start", 0)
        if start:
            self.batches.start = 0
        try:
            return sum(1 for _ in self._parts())
        finally:
            if start:
                self.batches.start = start
