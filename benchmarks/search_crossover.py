"""Where exact search should move from torch to faiss: ``embtune.eval.index.search`` forced onto each path
(``faiss_min_docs`` huge: torch blocks; 0: faiss) on random unit vectors, for each corpus size N and query
count Q, the two paths taking turns for ``--rounds`` rounds (who goes first alternates). Prints seconds per
path and the median faiss/torch time ratio per (Q, N); the last line is the summary: the smallest N from which
faiss is faster for every Q (``embtune.eval.index.FAISS_MIN_DOCS`` holds the figure).

    python benchmarks/search_crossover.py                                 # N 1k..64k, Q 100 and 1000, 3 rounds
    python benchmarks/search_crossover.py --docs 1000 4000 --queries 100  # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import median  # noqa: E402


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, nargs="+", default=[1_000, 4_000, 16_000, 64_000])
    p.add_argument("--queries", type=int, nargs="+", default=[100, 1_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=111, help="depth: the miner's range_max 100 + a few positives")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    from embtune.eval.index import search

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    paths = {"torch": 10 ** 18, "faiss": 0}  # faiss_min_docs forcing each path
    faster_from = {}
    for nq in a.queries:
        q = unit(rng, nq, a.dim)
        for n in sorted(a.docs):
            d = unit(rng, n, a.dim)
            seconds: dict[str, list[float]] = {name: [] for name in paths}
            for name, threshold in paths.items():  # warm-up (faiss's first call starts its thread pool)
                search(q[:8], d, a.k, faiss_min_docs=threshold)
            for r in range(a.rounds):
                for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
                    t = time.perf_counter()
                    search(q, d, a.k, faiss_min_docs=paths[name])
                    seconds[name].append(time.perf_counter() - t)
            ratio = median([f / t for f, t in zip(seconds["faiss"], seconds["torch"])])
            best = min(seconds["faiss"]) / min(seconds["torch"])  # the least disturbed round of each, on a busy machine
            print(f"Q {nq:>6} N {n:>8}: torch {median(seconds['torch']):8.3f} s  faiss {median(seconds['faiss']):8.3f} s"
                  f"  faiss/torch {ratio:.2f} (median of {a.rounds}; fastest rounds {best:.2f})", flush=True)
            if ratio < 1 and nq not in faster_from:
                faster_from[nq] = n
            elif ratio >= 1:
                faster_from.pop(nq, None)
    worst = max(faster_from.values()) if len(faster_from) == len(a.queries) else None
    print(f"SUMMARY search D {a.dim} k {a.k} threads {a.threads}: faiss faster than torch from N = "
          f"{worst if worst is not None else 'never (in the sizes run)'} for every Q in {a.queries}")


if __name__ == "__main__":
    main()
