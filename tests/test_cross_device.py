"""Cross-device negatives: two gloo processes give the gradient of the whole batch on one process."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from embtune.data.sampler import NoDuplicatesBatchSampler
from embtune.training import distributed
from embtune.training.distributed import ShardedBatchSampler

WORKER = REPO / "tests" / "cross_device_worker.py"


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("symmetric", ["1", "0"], ids=["symmetric", "one-way"])
def test_two_processes_give_the_single_process_gradient(tiny_bert, tmp_path, symmetric):
    single, multi = tmp_path / "single.pt", tmp_path / "multi.pt"
    _run([sys.executable, str(WORKER), tiny_bert, str(single), symmetric], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(WORKER), tiny_bert, str(multi), symmetric], tmp_path)
    g1, g2 = torch.load(single), torch.load(multi)
    assert set(g1) == set(g2) and len(g1) > 10  # encoder weights and the learnable temperature
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert worst < 1e-5, worst
    # not trivially equal: the gradients are real, and local-only negatives would differ
    assert g1["loss.log_inv_temperature"].abs().item() > 1e-3


def test_sharded_sampler_splits_each_global_batch_into_equal_contiguous_parts():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # last one uneven: cut to 2 (1 per process)
    parts = [list(ShardedBatchSampler(batches, r, 2)) for r in (0, 1)]
    assert parts[0] == [[0, 1], [4, 5], [8]] and parts[1] == [[2, 3], [6, 7], [9]]
    assert len(ShardedBatchSampler(batches, 0, 2)) == 3
    assert list(ShardedBatchSampler([[0]], 1, 2)) == []  # too small to split: dropped on every process


def test_sharded_sampler_keeps_no_duplicates_across_processes():
    texts = [("q", "a"), ("q", "b"), ("r", "c"), ("s", "d"), ("t", "e"), ("u", "f")]
    global_batches = NoDuplicatesBatchSampler(lambda i: texts[i], len(texts), 4, seed=3)
    parts = [list(ShardedBatchSampler(global_batches, r, 2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1])
    for a, b in zip(*parts):
        together = [t for i in a + b for t in texts[i]]
        assert len(together) == len(set(together))  # "q" never twice in one global batch


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        ShardedBatchSampler([[0, 1]], 2, 2)


def test_torchrun_with_one_process_starts_no_process_group(monkeypatch):
    """``torchrun --nproc_per_node 1`` sets WORLD_SIZE=1 (and a rendezvous address): a world of one,
    trained as a plain run — no process group, the batches as planned, the gradients untouched."""
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():  # port 1: a process group would fail to start there
        monkeypatch.setenv(k, v)
    d = distributed.setup("cpu")
    assert not torch.distributed.is_initialized()
    assert (d.rank, d.world, d.main) == (0, 1, True)
    assert list(ShardedBatchSampler([[0, 1, 2], [3, 4]], d.rank, d.world)) == [[0, 1, 2], [3, 4]]
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.5, -2.0])
    distributed.average_gradients([p], d)
    assert p.grad.tolist() == [1.5, -2.0]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_torchrun_training_only_rank_zero_logs_evaluates_and_saves(tiny_bert, tmp_path):
    """About 2 minutes on the 2-core development machine (two processes load torch and the model)."""
    import json

    from test_data_loaders import write_beir

    run, data, beir = tmp_path / "run", tmp_path / "pairs.jsonl", write_beir(tmp_path / "beir")
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i}"}) + "\n" for i in range(24)))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "embtune.cli",
          f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={data}", f"data.test_path={beir}",
          "train.batch_size=4", "train.max_steps=3", "train.log_every=1", "negatives.cross_device=true",
          "logger=none", f"hydra.run.dir={run}"], tmp_path)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3]  # one line per step: rank 1 wrote nothing
    assert all(e["train/candidates"] == 8.0 for e in train)  # 2 processes x 4 positives
    assert sum("eval/ndcg@10" in e for e in events) == 2 and train[-1]["train/epoch"] == 1.0  # 24 / (2 x 4) steps
    assert (run / "summary.json").is_file() and (run / "model" / "embtune.json").is_file()
