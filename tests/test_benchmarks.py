"""benchmarks/: the pieces that decide what is compared and reported, run on CPU tensors, the CUDA branch
of a side's server included (torch.cuda's memory and sync calls stand in); the benchmarks themselves are
not run here (the lead runs them on a quiet machine)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


class _Conn:
    """A pipe end: ``recv`` hands out the queued messages, ``send`` collects the answers."""

    def __init__(self, messages):
        self.inbox, self.sent = list(messages), []

    def recv(self):
        return self.inbox.pop(0)

    def send(self, msg):
        self.sent.append(msg)


def test_a_side_on_cuda_resets_and_reports_the_gpu_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append(("sync", str(d))))
    conn = _Conn([[[0, 1], [2]], None])
    step = lambda b: (float(len(b)), [5] * len(b), 8 * len(b))  # noqa: E731 (loss, real lengths, padded tokens)
    harness.serve(conn, step, {"device": torch.device("cuda", 0), "bf16": True})
    ready, stats = conn.sent
    assert ready == "ready" and calls == [("reset", "cuda:0"), ("sync", "cuda:0")]
    assert stats["gpu_peak_gib"] == 3.0 and stats["pairs"] == 3 and stats["losses"] == [2.0, 1.0]
    assert stats["lengths"] == [5, 5, 5] and stats["padded_tokens"] == 24 and stats["bf16"] is True


def test_a_side_on_cpu_reports_no_gpu_peak():
    conn = _Conn([[[0]], None])
    harness.serve(conn, lambda b: (0.5, [3], 4), {"device": torch.device("cpu")})
    assert conn.sent[1]["gpu_peak_gib"] is None and conn.sent[1]["seconds"] >= 0


def test_embtunes_side_starts_with_the_commands_openmp_settings_and_the_peer_with_the_users(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert harness.side_env(True) == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert harness.side_env(False) == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": None}
    with harness.environment({"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": None}):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_NUM_THREADS" not in os.environ
    assert "OMP_WAIT_POLICY" not in os.environ and os.environ["OMP_NUM_THREADS"] == "2"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this system")
def test_the_contention_load_runs_on_one_cpu_and_ends_with_the_block():
    import subprocess

    before = set(subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split())
    with harness.contention() as cpu:
        assert cpu == max(os.sched_getaffinity(0))
        children = set(subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True,
                                      text=True).stdout.split()) - before
        assert len(children) == 1
        (pid,) = children
        assert os.sched_getaffinity(int(pid)) == {cpu}
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_flops_of_a_forward_are_a_third_of_a_training_step():
    class Config:
        hidden_size, num_hidden_layers, intermediate_size = 4, 2, 8

    # per token 2·N with N = 2·(4·16 + 2·4·8) = 256, plus 4·L·T²·H = 4·2·9·4 for T = 3
    assert harness.forward_flops(Config, [3]) == 2 * 256 * 3 + 4 * 2 * 9 * 4
    assert harness.train_flops(Config, [3, 1]) == 3 * harness.forward_flops(Config, [3, 1])


def test_train_ratios_are_against_st_fp32_and_against_the_faster_st_side():
    from train_throughput import ratios

    rate = {"embtune": [10.0, 12.0, 9.0], "st-fp32": [5.0, 6.0, 4.5], "st-bf16": [8.0, 8.0, 6.0]}
    got = ratios(rate)
    assert got["st-fp32"] == pytest.approx([2.0, 2.0, 2.0])
    assert got["fastest (st-bf16)"] == pytest.approx([1.25, 1.5, 1.5])
    assert ratios({"embtune": [3.0], "st-fp32": [2.0]}) == {"st-fp32": [1.5], "fastest (st-fp32)": [1.5]}


def test_encode_sides_are_embtune_at_each_precision_and_each_st_model():
    from encode_throughput import sides_for

    class Ours:
        def encode(self, docs, kind, batch_size, bf16):
            return np.full((len(docs), 2), 2.0 if bf16 else 1.0, dtype=np.float32)

    class Theirs:
        def __init__(self, value):
            self.value = value

        def encode(self, docs, batch_size, convert_to_numpy, normalize_embeddings):
            return np.full((len(docs), 2), self.value, dtype=np.float64)

    sides = sides_for(Ours(), {"st-fp32": Theirs(3.0), "st-bf16": Theirs(4.0)}, ["a", "b"], 2)
    assert list(sides) == ["embtune-fp32", "embtune-bf16", "st-fp32", "st-bf16"]
    assert [float(f()[0, 0]) for f in sides.values()] == [1.0, 2.0, 3.0, 4.0]
    assert all(f().dtype == np.float32 for f in sides.values())
    assert list(sides_for(Ours(), {"st-fp32": Theirs(3.0)}, ["a"], 2)) == ["embtune-fp32", "st-fp32"]
