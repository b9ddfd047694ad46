"""Training throughput: embtune vs sentence-transformers, same model, data, batches and settings.

all-MiniLM-L6-v2 (bundled) on SciFact train pairs, in-batch InfoNCE (τ = 0.05 = MNRL scale 20),
batch 32, query max length 64, document max length 256 (sentence-transformers: its single
max_seq_length, 256), fp32 on CPU; bf16 autocast and batch 128 on a CUDA device. Each side runs in
its own process (its own peak memory); after ``--warmup`` steps each, the sides run the same
``--steps`` batches in turn, ``--rounds`` times (who goes first alternates). Prints pairs/s per side
and round, the median ratio, peak RSS, both losses after the same steps, tokens/s and the fraction of
the measured matmul peak a training step reaches. The last line is the summary.

    python benchmarks/train_throughput.py                         # the acceptance run
    python benchmarks/train_throughput.py --steps 1 --rounds 3    # quicker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import Side, alternate, batch_plan, matmul_peak, median, pick_device, scifact_examples, train_flops  # noqa: E402
from sides import embtune_side, st_side  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/scifact"))
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=3, help="steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="alternations (>= 3 for a median)")
    p.add_argument("--warmup", type=int, default=1, help="steps per side before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    device = pick_device(a.device)
    bs = a.batch_size or (128 if device.type == "cuda" else 32)
    examples = scifact_examples(a.data, "train")
    plan = batch_plan(examples, bs, a.warmup + a.rounds * a.steps, a.seed)
    common = dict(data=a.data, pairs="train", device=a.device, seed=a.seed, threads=a.threads)
    sides = {"embtune": Side(embtune_side, **common), "sentence-transformers": Side(st_side, **common)}
    # one plan per side, the same batches: the warm-up, then a.steps batches per round
    rounds = [plan[:a.warmup]] + [plan[a.warmup + r * a.steps: a.warmup + (r + 1) * a.steps] for r in range(a.rounds)]
    results = alternate(sides, {name: rounds for name in sides}, a.rounds, lambda r, name, res: print(
        f"round {r + 1} {name:>21}: {res['pairs'] / res['seconds']:7.2f} pairs/s loss {res['losses'][-1]:.4f}",
        flush=True))

    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rate = {n: [x["pairs"] / x["seconds"] for x in rs] for n, rs in results.items()}
    ratios = [e / s for e, s in zip(rate["embtune"], rate["sentence-transformers"])]
    for name, rs in results.items():
        seconds = sum(x["seconds"] for x in rs)
        real = sum(sum(x["lengths"]) for x in rs)
        padded = sum(x["padded_tokens"] for x in rs)
        flops = sum(train_flops(x["config"], x["lengths"]) for x in rs)
        print(f"{name}: median {median(rate[name]):.2f} pairs/s, {real / seconds:.0f} real tokens/s "
              f"({padded / seconds:.0f} with padding), {flops / seconds / 1e9:.1f} GFLOP/s = "
              f"{flops / seconds / peak:.1%} of the measured matmul peak ({peak / 1e9:.1f} GFLOP/s), "
              f"peak RSS {max(x['peak_rss_gib'] for x in rs):.2f} GiB "
              f"(after model load {rs[0]['rss_after_load_gib']:.2f} GiB)"
              + (f", GPU peak {max(x['gpu_peak_gib'] for x in rs):.2f} GiB" if device.type == "cuda" else ""))
    e_loss = [v for x in results["embtune"] for v in x["losses"]]
    s_loss = [v for x in results["sentence-transformers"] for v in x["losses"]]
    diff = max(abs(x - y) for x, y in zip(e_loss, s_loss))
    print(f"losses per timed step: embtune {[round(v, 4) for v in e_loss]}")
    print(f"                       sentence-transformers {[round(v, 4) for v in s_loss]}")
    print(f"SUMMARY train {device.type} batch {bs}: embtune/sentence-transformers = {median(ratios):.3f} "
          f"(median of {len(ratios)}: {', '.join(f'{x:.3f}' for x in ratios)}); pairs/s "
          f"{median(rate['embtune']):.2f} vs {median(rate['sentence-transformers']):.2f}; loss after "
          f"{a.warmup + a.rounds * a.steps} steps {e_loss[-1]:.4f} vs {s_loss[-1]:.4f} (max step diff {diff:.4f}); "
          f"peak RSS {max(x['peak_rss_gib'] for x in results['embtune']):.2f} vs "
          f"{max(x['peak_rss_gib'] for x in results['sentence-transformers']):.2f} GiB")


if __name__ == "__main__":
    main()
