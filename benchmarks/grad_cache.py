"""GradCache at a large batch vs the plain step at batch 32: peak memory and time per pair.

all-MiniLM-L6-v2 with in-batch InfoNCE (τ 0.05), document max length 256. The train set has only 919
pairs, so the pairs here are the SciFact corpus' (title, abstract) pairs (5183; abstracts mostly reach
256 tokens). Two embtune processes: the plain step at ``--plain-batch-size`` (32) and GradCache
(``train.grad_cache=true``) at ``--batch-size`` (1024) with ``--mini-batch-size`` (32); after a warm-up
step each, they alternate ``--rounds`` times. Acceptance: GradCache's peak RSS < 6 GiB and its time per
pair <= 1.4x the plain step's. The last line is the summary.

    python benchmarks/grad_cache.py                                 # the acceptance run (1024 pairs a step)
    python benchmarks/grad_cache.py --batch-size 128 --rounds 1     # quicker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import Side, alternate, batch_plan, median, pick_device, scifact_examples, side_env  # noqa: E402
from sides import embtune_side  # noqa: E402

from embtune.training.precision import native_bf16  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/scifact"))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--mini-batch-size", type=int, default=32)
    p.add_argument("--plain-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    device = pick_device(a.device)
    examples = scifact_examples(a.data, "corpus")
    big = batch_plan(examples, a.batch_size, 1 + a.rounds, a.seed)
    # the plain side sees the same pairs as GradCache, cut into batches of --plain-batch-size
    small = [b[i:i + a.plain_batch_size] for b in big for i in range(0, len(b), a.plain_batch_size)]
    per = len(small) // len(big)
    # bf16 where native (train.bf16=true there), and the OpenMP settings of the embtune command
    common = dict(data=a.data, pairs="corpus", device=a.device, seed=a.seed, threads=a.threads,
                  bf16=native_bf16(device), env=side_env(True))
    sides = {"grad_cache": Side(embtune_side, grad_cache=True, mini_batch_size=a.mini_batch_size, **common),
             "plain": Side(embtune_side, **common)}
    # plan 0, the warm-up, is one large batch's worth for each side
    plans = {"grad_cache": [[b] for b in big], "plain": [small[i * per:(i + 1) * per] for i in range(len(big))]}
    runs = alternate(sides, plans, a.rounds, lambda r, name, x: print(
        f"round {r + 1} {name:>10}: {1000 * x['seconds'] / x['pairs']:.1f} ms/pair, peak RSS {x['peak_rss_gib']:.2f} GiB",
        flush=True))
    ms = {n: [1000 * x["seconds"] / x["pairs"] for x in rs] for n, rs in runs.items()}
    ratios = [g / q for g, q in zip(ms["grad_cache"], ms["plain"])]
    rss = {n: max(x["peak_rss_gib"] for x in rs) for n, rs in runs.items()}
    gpu = (f"; GPU peak {max(x['gpu_peak_gib'] for x in runs['grad_cache']):.2f} vs "
           f"{max(x['gpu_peak_gib'] for x in runs['plain']):.2f} GiB" if device.type == "cuda" else "")
    print(f"SUMMARY grad_cache {device.type} batch {a.batch_size} (mini-batch {a.mini_batch_size}) vs plain batch "
          f"{a.plain_batch_size}: time per pair ratio {median(ratios):.3f} (median of {len(ratios)}: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; {median(ms['grad_cache']):.1f} vs {median(ms['plain']):.1f} ms/pair); "
          f"peak RSS {rss['grad_cache']:.2f} GiB (plain {rss['plain']:.2f} GiB){gpu}")


if __name__ == "__main__":
    main()
