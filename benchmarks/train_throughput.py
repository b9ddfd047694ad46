"""Training throughput: embtune vs sentence-transformers, same model, data, batches and settings.

all-MiniLM-L6-v2 (bundled) on SciFact train pairs, in-batch InfoNCE (τ = 0.05 = MNRL scale 20),
batch 32 on CPU, 128 on CUDA, query max length 64, document max length 256 (sentence-transformers: its
single max_seq_length, 256). Sides, each in its own process (its own peak memory):

- ``embtune``: in bf16 autocast where the device has native bf16 (``train.bf16=true`` there;
  ``embtune.training.precision.native_bf16``), else fp32, with the OpenMP settings the ``embtune`` command sets;
- ``st-fp32``: sentence-transformers in fp32;
- ``st-bf16``: sentence-transformers under bf16 autocast (its trainer's ``bf16=True``), where the device
  has native bf16 (its fastest setting there; elsewhere st-fp32 is).

After ``--warmup`` steps each, the sides run the same ``--steps`` batches in turn, ``--rounds`` times
(who goes first rotates). ``--contend`` then runs the same rounds again beside a fixed CPU load (one
process spinning on one core, ``harness.contention``) and reports those ratios too. Prints pairs/s per
side and round, the median ratios against st-fp32 and against sentence-transformers' fastest side, peak
RSS, the losses after the same steps, tokens/s and the fraction of the measured matmul peak (bf16 peak
for a bf16 side). The last line is the summary.

    python benchmarks/train_throughput.py                         # the acceptance run
    python benchmarks/train_throughput.py --contend               # and beside a busy core
    python benchmarks/train_throughput.py --steps 1 --rounds 3    # quicker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import (  # noqa: E402
    Side,
    alternate,
    batch_plan,
    contention,
    matmul_peak,
    median,
    pick_device,
    scifact_examples,
    side_env,
    train_flops,
)
from sides import embtune_side, st_side  # noqa: E402

from embtune.training.precision import native_bf16  # noqa: E402


def ratios(rate: dict[str, list[float]]) -> dict[str, list[float]]:
    """embtune's pairs/s over st-fp32's and over sentence-transformers' fastest side (by median), per round."""
    st = [n for n in rate if n.startswith("st-")]
    fastest = max(st, key=lambda n: median(rate[n]))
    return {"st-fp32": [e / s for e, s in zip(rate["embtune"], rate["st-fp32"])],
            f"fastest ({fastest})": [e / s for e, s in zip(rate["embtune"], rate[fastest])]}


def report(results: dict[str, list[dict]], peaks: dict[bool, float], label: str) -> str:
    """Per-side lines, and the summary part: both median ratios with their rounds."""
    rate = {n: [x["pairs"] / x["seconds"] for x in rs] for n, rs in results.items()}
    for name, rs in results.items():
        seconds = sum(x["seconds"] for x in rs)
        real, padded = sum(sum(x["lengths"]) for x in rs), sum(x["padded_tokens"] for x in rs)
        flops = sum(train_flops(x["config"], x["lengths"]) for x in rs)
        peak = peaks[rs[0]["bf16"]]
        print(f"{label}{name} ({'bf16' if rs[0]['bf16'] else 'fp32'}): median {median(rate[name]):.2f} pairs/s, "
              f"{real / seconds:.0f} real tokens/s ({padded / seconds:.0f} with padding), {flops / seconds / 1e9:.1f} "
              f"GFLOP/s = {flops / seconds / peak:.1%} of the measured {'bf16' if rs[0]['bf16'] else 'fp32'} matmul "
              f"peak ({peak / 1e9:.1f} GFLOP/s), peak RSS {max(x['peak_rss_gib'] for x in rs):.2f} GiB (after model "
              f"load {rs[0]['rss_after_load_gib']:.2f} GiB)"
              + (f", GPU peak {max(x['gpu_peak_gib'] for x in rs):.2f} GiB" if rs[0]["gpu_peak_gib"] else ""))
    return "; ".join(f"embtune/{n} = {median(r):.3f} ({', '.join(f'{x:.3f}' for x in r)})"
                     for n, r in ratios(rate).items()) + "; pairs/s " + ", ".join(
        f"{n} {median(r):.2f}" for n, r in rate.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/scifact"))
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 128 on CUDA")
    p.add_argument("--steps", type=int, default=3, help="steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (>= 3 for a median)")
    p.add_argument("--warmup", type=int, default=1, help="steps per side before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--contend", action="store_true", help="also run the rounds beside one busy core")
    a = p.parse_args()
    device = pick_device(a.device)
    bs = a.batch_size or (128 if device.type == "cuda" else 32)
    bf16 = native_bf16(device)
    examples = scifact_examples(a.data, "train")
    rounds_of = a.rounds * (2 if a.contend else 1)
    plan = batch_plan(examples, bs, 2 * a.warmup + rounds_of * a.steps, a.seed)
    common = dict(data=a.data, pairs="train", device=a.device, seed=a.seed, threads=a.threads)
    sides = {"embtune": Side(embtune_side, env=side_env(True), bf16=bf16, **common),
             "st-fp32": Side(st_side, env=side_env(False), **common)}
    if bf16:
        sides["st-bf16"] = Side(st_side, env=side_env(False), bf16=True, **common)

    def rounds(start: int) -> list:  # the warm-up, then a.steps batches per round, from batch `start` on
        timed = start + a.warmup
        return [plan[start:timed]] + [plan[timed + r * a.steps: timed + (r + 1) * a.steps] for r in range(a.rounds)]

    def show(label):
        return lambda r, name, res: print(f"{label}round {r + 1} {name:>8}: {res['pairs'] / res['seconds']:7.2f} "
                                          f"pairs/s loss {res['losses'][-1]:.4f}", flush=True)

    results = alternate(sides, {n: rounds(0) for n in sides}, a.rounds, show(""), close=not a.contend)
    contended = None
    if a.contend:
        with contention() as cpu:
            print(f"-- beside one process spinning on CPU {cpu}", flush=True)
            contended = alternate(sides, {n: rounds(a.warmup + a.rounds * a.steps) for n in sides}, a.rounds,
                                  show("busy "))

    peaks = {False: matmul_peak(device, torch.float32)}
    if bf16 or device.type == "cuda":
        peaks[True] = matmul_peak(device, torch.bfloat16)
    quiet = report(results, peaks, "")
    busy = report(contended, peaks, "busy ") if contended else None
    e_loss = [v for x in results["embtune"] for v in x["losses"]]
    s_loss = [v for x in results["st-fp32"] for v in x["losses"]]
    diff = max(abs(x - y) for x, y in zip(e_loss, s_loss))
    print(f"losses per timed step: embtune {[round(v, 4) for v in e_loss]}")
    print(f"                       st-fp32 {[round(v, 4) for v in s_loss]}")
    print(f"SUMMARY train {device.type} batch {bs} embtune {'bf16' if bf16 else 'fp32'}: {quiet}; loss after "
          f"{a.warmup + a.rounds * a.steps} steps {e_loss[-1]:.4f} vs st-fp32 {s_loss[-1]:.4f} (max step diff "
          f"{diff:.4f}); peak RSS " + " vs ".join(f"{max(x['peak_rss_gib'] for x in rs):.2f}" for rs in results.values())
          + " GiB" + (f"; BUSY CORE: {busy}" if busy else ""))


if __name__ == "__main__":
    main()
