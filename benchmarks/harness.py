"""Shared pieces of the benchmarks: SciFact pairs, fixed batches, one training side per subprocess
(so each side's peak memory is its own), a measured matmul peak, and FLOPs from real token counts.

A side runs in its own spawned process and waits on a pipe; the parent tells the sides in turn to run
the same batches, so they alternate in time and share whatever else the machine is doing equally.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import resource
import statistics
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


class Side:
    """One training side in its own process: ``run(batch_indices) -> stats``; ``close()`` ends it."""

    def __init__(self, target, **kwargs):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child,), kwargs=kwargs, daemon=True)
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


def alternate(sides: dict[str, Side], plans: dict[str, list], rounds: int, report) -> dict[str, list[dict]]:
    """Warm each side up on ``plans[name][0]``, then run ``rounds`` timed rounds, round r on
    ``plans[name][1 + r]``, the sides' order reversed every other round (neither always goes first on a
    warm cache); ``report(r, name, stats)`` after each. Closes every side. Returns name -> stats per round."""
    results: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for name, side in sides.items():
            side.run(plans[name][0])
        for r in range(rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                results[name].append(sides[name].run(plans[name][1 + r]))
                report(r, name, results[name][-1])
    finally:
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
