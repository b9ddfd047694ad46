"""Shared pieces of the benchmarks: SciFact pairs, fixed batches, one training side per subprocess
(so each side's peak memory is its own), a measured matmul peak, and FLOPs from real token counts.

A side runs in its own spawned process and waits on a pipe; the parent tells the sides in turn to run
the same batches, so they alternate in time and share whatever else the machine is doing equally.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from embtune.data.formats import Example
from embtune.data.sampler import NoDuplicatesBatchSampler

BUNDLED = "sentence-transformers/all-MiniLM-L6-v2"


def scifact_examples(path: str, source: str = "train") -> list[Example]:
    """``train``: the train qrels' (claim, abstract) pairs (919); ``corpus``: (title, abstract) of every
    corpus document (5183), for batches larger than the train set."""
    if source == "train":
        from embtune.data.beir import load_beir

        return [Example(r["query"], r["positive"]) for r in load_beir(path).rows]
    rows = [json.loads(line) for line in (Path(path) / "corpus.jsonl").read_text().splitlines() if line.strip()]
    return [Example(r["title"].strip(), r["text"].strip()) for r in rows if r["title"].strip() and r["text"].strip()]


def batch_plan(examples: list[Example], batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """``n_batches`` full batches of example indices, no text twice in a batch (embtune's training sampler),
    epochs repeated as needed.

    Raises:
        ValueError: fewer examples than ``batch_size``.
    """
    if batch_size > len(examples):
        raise ValueError(f"--batch-size {batch_size} > {len(examples)} examples; use --pairs corpus")
    out, epoch = [], 0
    sampler = NoDuplicatesBatchSampler(lambda i: (examples[i].query, examples[i].positive), len(examples),
                                       batch_size, drop_last=True, seed=seed)
    while len(out) < n_batches:
        sampler.set_epoch(epoch)
        out += list(sampler)
        epoch += 1
    return out[:n_batches]


def pick_device(name: str) -> torch.device:
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best FLOP/s of a square matmul (n = 1024 on CPU, 8192 on GPU) over ``seconds``: the peak the
    training step is compared with (measured, since a shared CPU's nominal peak means little)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(config, lengths: list[int]) -> float:
    """FLOPs of one forward pass (encoding): a third of :func:`train_flops`."""
    return train_flops(config, lengths) / 3


def train_flops(config, lengths: list[int]) -> float:
    """FLOPs of one training step (forward + backward = 3 × forward) for sequences of the given real
    lengths: per sequence of T tokens, forward = 2·N·T (N = non-embedding weights, Kaplan et al. 2020,
    "Scaling Laws for Neural Language Models", §2.1) + 4·L·T²·H (QKᵀ and the weighted sum of values,
    bidirectional attention)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    n = layers * (4 * h * h + 2 * h * inter)  # Q, K, V, output projections; the two feed-forward matrices
    return 3 * sum(2 * n * t + 4 * layers * t * t * h for t in lengths)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def side_env(embtune: bool) -> dict[str, str | None]:
    """The OpenMP environment a side starts with: embtune's side gets what the ``embtune`` command sets
    before torch loads (``embtune.training.threads.openmp_defaults``), sentence-transformers' side the
    environment as it is (what its users run with). None: unset."""
    from embtune.training.threads import openmp_defaults

    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if embtune:
        openmp_defaults(env)
    return {k: env.get(k) for k in keys}


@contextlib.contextmanager
def environment(values: dict[str, str | None]):
    """``os.environ`` with ``values`` set (None: removed) inside the block, restored after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def contention(cpu: int | None = None):
    """A fixed CPU load for the length of the block: one process spinning a pure-Python loop, pinned to
    ``cpu`` (default: the last CPU this process may use), as a test suite or another job on a shared
    machine would be. Yields the CPU it runs on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    cpu = cpus[-1] if cpu is None else cpu
    load = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(load.pid, {cpu})
        time.sleep(0.5)  # running before the first timed step
        yield cpu
    finally:
        load.kill()
        load.wait()


class Side:
    """One training side in its own process: ``run(batch_indices) -> stats``; ``close()`` ends it.
    ``env``: environment variables the process starts with (see :func:`side_env`)."""

    def __init__(self, target, env: dict[str, str | None] | None = None, **kwargs):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child,), kwargs=kwargs, daemon=True)
        with environment(env or {}):  # a spawned child reads os.environ as it starts
            self.proc.start()
        msg = self.conn.recv()  # "ready", once the model is loaded
        if isinstance(msg, BaseException):
            raise msg

    def run(self, batches: list[list[int]]) -> dict:
        self.conn.send(batches)
        msg = self.conn.recv()
        if isinstance(msg, BaseException):
            raise msg
        return msg

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
        self.proc.join(timeout=60)


def alternate(sides: dict[str, Side], plans: dict[str, list], rounds: int, report,
              close: bool = True) -> dict[str, list[dict]]:
    """Warm each side up on ``plans[name][0]``, then run ``rounds`` timed rounds, round r on
    ``plans[name][1 + r]``, the sides' order turned by one every round (none always goes first on a
    warm cache); ``report(r, name, stats)`` after each. Closes every side (unless ``close`` is false and
    nothing failed). Returns name -> stats per round."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    names, ok = list(sides), False
    try:
        for name, side in sides.items():
            side.run(plans[name][0])
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(sides[name].run(plans[name][1 + r]))
                report(r, name, results[name][-1])
        ok = True
    finally:
        if close or not ok:
            for side in sides.values():
                side.close()
    return results


def serve(conn, step, setup_stats: dict) -> None:
    """The child side of :class:`Side`: run ``step(indices) -> (loss, lengths)`` over each batch sent,
    answer timings, losses, real and padded token counts and memory."""
    conn.send("ready")
    device = setup_stats.pop("device")
    while (batches := conn.recv()) is not None:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, lengths, padded, t = [], [], 0, time.perf_counter()
            for b in batches:
                loss, lens, pad = step(b)
                losses.append(loss)
                lengths += lens
                padded += pad
            _sync(device)
            seconds = time.perf_counter() - t
            gpu = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            conn.send({"seconds": seconds, "pairs": sum(map(len, batches)), "losses": losses, "lengths": lengths,
                       "padded_tokens": padded, "peak_rss_gib": peak_rss_gib(), "gpu_peak_gib": gpu,
                       **setup_stats})
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            conn.send(e)
            return


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
