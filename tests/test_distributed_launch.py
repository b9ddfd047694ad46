"""How processes find each other: torchrun's variables, SLURM's (srun without torchrun), SLURM host lists,
and a multi-node-style torchrun (c10d rendezvous, ``--nnodes 1``) training run."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO

from embtune.training import checkpoint, distributed
from embtune.training.distributed import first_host, process_env

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE",
               "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-03,07]", "node01"),            # a range then a single value; zero padding kept
    ("node[07,01-03]", "node07"),            # the first listed, not the smallest
    ("gpu5", "gpu5"),                        # one host
    ("a1,b[2-4]", "a1"),                     # several groups: the first group's first host
    ("c[10-11],node[01-02]", "c10"),         # the comma inside brackets is not a separator
    ("rack[2-3]-n[4-5]", "rack2-n4"),        # two brackets in one name
    ("n[7]", "n7"),
    ("10.0.0.5", "10.0.0.5"),
])
def test_first_host_of_a_slurm_host_list(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "node[01-03", "node]1["])
def test_a_malformed_host_list_is_refused(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        first_host(bad)


def test_slurm_variables_give_rank_world_local_rank_address_and_port():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4711234"}
    assert process_env(env) == {"launcher": "srun", "rank": 3, "world": 8, "local_rank": 1,
                                "master_addr": "gpu12", "master_port": 20000 + 1234}
    # MASTER_ADDR / MASTER_PORT given: they win over the node list and the job id
    given = process_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "6000"})
    assert (given["master_addr"], given["master_port"]) == ("head", 6000)
    # SLURM_NODELIST when SLURM_JOB_NODELIST is missing; no job id: torch's usual port
    old = process_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "x[3-4]"})
    assert (old["master_addr"], old["master_port"], old["local_rank"]) == ("x3", 29500, 0)


def test_torchrun_variables_win_over_slurm_ones():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n1",
           "WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}  # srun torchrun ...: torchrun's own numbering
    got = process_env(env)
    assert (got["launcher"], got["rank"], got["world"], got["local_rank"]) == ("torchrun", 2, 4, 0)
    assert process_env({**env, "WORLD_SIZE": "1"}) is None  # torchrun --nproc_per_node 1: a world of one


def test_one_slurm_task_or_none_is_a_world_of_one():
    assert process_env({}) is None
    assert process_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}) is None
    assert process_env({"SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}) is None  # not a task of a step


def test_slurm_variables_that_make_no_group_are_refused():
    with pytest.raises(ValueError, match="SLURM_PROCID=4 not in 0..SLURM_NTASKS-1"):
        process_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"})
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        process_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def _free_port(low: int = 0, high: int = 0) -> int:
    """A port nothing listens on: any (the system's pick), or the first free one in low..high−1."""
    for port in range(low, high) if high else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}..{high - 1}")


def _srun_task(rank: int, job_id: str, out: str) -> None:
    """One of the two tasks srun would start: SLURM's variables only, no torchrun."""
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    os.environ.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                       "SLURM_JOB_NODELIST": "localhost,node[02-03]", "SLURM_JOB_ID": job_id})
    d = distributed.setup("cpu")
    ranks = distributed.gather_no_grad(torch.tensor([d.rank]))  # every process's rank, by collective
    result = {"rank": d.rank, "world": d.world, "local_rank": d.local_rank, "group_rank": torch.distributed.get_rank(),
              "ranks": ranks.tolist(), "backend": torch.distributed.get_backend()}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    distributed.teardown()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_srun_variables_set_by_hand_form_a_group_of_two(tmp_path):
    port = _free_port(24000 + os.getpid() % 5000, 30000)  # embtune's port from a job id: 20000 + its last 4 digits
    job_id = f"9{port - 20000:04d}"
    mp.spawn(_srun_task, args=(job_id, str(tmp_path / "task")), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"task.{r}").read_text()) for r in (0, 1)]
    for r, g in enumerate(got):
        assert (g["rank"], g["world"], g["local_rank"], g["group_rank"]) == (r, 2, r, r)
        assert g["ranks"] == [0, 1] and g["backend"] == "gloo"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_embtune_commands_with_srun_variables_train_as_one_run(tiny_bert, tmp_path):
    """srun starts the command once per task with SLURM_PROCID set and no RANK: task 1 must know it is
    not rank 0 before the group forms (it used to take the run folder as its own, and task 0 waited forever)."""
    run, data = tmp_path / "run", tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i}"}) + "\n" for i in range(20)))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={data}",
           "data.dev_queries=4", "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "eval.before=false",
           "negatives.cross_device=true", "logger=none", f"hydra.run.dir={run}"]
    tasks = [subprocess.Popen(cmd, cwd=REPO, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [t.communicate(timeout=300)[0] for t in tasks]
    finally:  # a task waiting for a peer that never comes would outlive the test
        for t in tasks:
            t.kill()
    assert [t.returncode for t in tasks] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    train = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in e]
    assert [(e["step"], e["train/candidates"]) for e in train] == [(1, 8.0), (2, 8.0)]  # 2 processes x 4 positives
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_a_bad_setting_under_torchrun_is_one_line_from_every_process(tmp_path):
    """Every process meets the bad value; each says so in one line, none with a traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "embtune.cli",
           "data=jsonl", f"data.path={tmp_path / 'pairs.jsonl'}", "train.strategy=bogus", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Error: train.strategy must be ddp or fsdp, got 'bogus'" in out  # rank 0
    assert "Error (rank 1): train.strategy must be ddp or fsdp, got 'bogus'" in out
    assert "Error executing job" not in out and 'File "' + str(REPO) not in out  # no embtune traceback


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_torchrun_c10d_rendezvous_one_node_trains_and_rank_zero_saves_once(tiny_bert, tmp_path):
    """The multi-node command shape (``--nnodes``, ``--node_rank``, ``--rdzv_backend c10d``,
    ``--rdzv_endpoint``) on one machine: 2 gloo processes train a tiny model; only rank 0 logs and saves."""
    from test_data_loaders import write_beir

    run, data, beir = tmp_path / "run", tmp_path / "pairs.jsonl", write_beir(tmp_path / "beir")
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i}"}) + "\n" for i in range(16)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "embtune-test",
           "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={data}",
           f"data.test_path={beir}", "train.batch_size=4", "train.max_steps=2", "train.log_every=1",
           "eval.before=false", "negatives.cross_device=true", "logger=none", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in train if "train/loss" in e]
    assert [e["step"] for e in train] == [1, 2]  # one line a step: rank 1 logged nothing
    assert all(e["train/candidates"] == 8.0 for e in train)  # 2 processes x 4 positives: the group formed
    # saved once: a second save of model/ would have raised FileExistsError and failed the run
    assert [p.name for p in run.glob("model*")] == ["model"] and (run / "model" / "model.safetensors").is_file()



@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_torchrun_processes_train_on_a_stream_and_resume_it_exactly(strategy, tiny_bert, tmp_path):
    """data.streaming=true under torchrun: each process reads its share of the file (12 of 24 rows: 3 batches
    of 4 an epoch), the checkpoint records both positions, two processes resumed from step 2 end on the
    uninterrupted weights, and resuming with one process is refused."""
    from safetensors.torch import load_file

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i}"}) + "\n" for i in range(24)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def embtune(run, *overrides, procs=2):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs == 2 else []
        cmd = [sys.executable, *launch, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "data=jsonl",
               f"data.path={data}", "data.streaming=true", "data.shuffle_buffer=8", "train.batch_size=4",
               "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoint=true",
               f"train.strategy={strategy}", "eval.before=false", "eval.after=false", "negatives.cross_device=true",
               "logger=none", f"hydra.run.dir={run}", *overrides]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    def steps(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [e["step"] for e in lines if "train/loss" in e and e["train/candidates"] == 8.0]  # 2 x 4 positives

    straight = tmp_path / "straight"
    done = embtune(straight)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert steps(straight) == [1, 2, 3, 4]
    folder = straight / checkpoint.FOLDER
    # step 4 = epoch 2's first batch on each process: a process's epoch is its 12 rows, not the file's 24
    last, prev = checkpoint.read(folder / checkpoint.LAST), checkpoint.read(folder / checkpoint.PREV)
    assert [(p["epoch"], p["batches"]) for p in last["stream"]] == [(1, 1), (1, 1)]
    assert prev["step"] == 2 and [(p["epoch"], p["batches"]) for p in prev["stream"]] == [(0, 2), (0, 2)]

    resumed = tmp_path / "resumed"
    done = embtune(resumed, f"resume_from={folder / checkpoint.PREV}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert steps(resumed) == [3, 4]
    a, b = (load_file(r / "model" / "model.safetensors") for r in (resumed, straight))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    alone = embtune(tmp_path / "alone", f"resume_from={folder / checkpoint.PREV}", procs=1)
    assert alone.returncode != 0 and "resume with the same number" in alone.stdout + alone.stderr

def _draws(negatives) -> dict:
    """The next value of every random source a training step reads on this process."""
    import random

    import numpy as np

    return {"torch": torch.rand(4), "dropout": torch.nn.functional.dropout(torch.ones(16), 0.5, training=True),
            "numpy": torch.from_numpy(np.random.rand(3)), "python": random.random(), "negatives": negatives.random()}


def _resume_task(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes: draw on its own (rank-dependent) path, checkpoint, draw on (uninterrupted),
    then scramble the state, resume from the checkpoint and draw again; and the same from a format-3 checkpoint."""
    import logging
    import random
    from pathlib import Path

    import numpy as np

    from embtune.training import checkpoint
    from embtune.training.distributed import Dist

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    d, run = Dist(rank, 2), Path(folder)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("embtune.training.checkpoint").addHandler(handler)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as train(): one seed on every process
    negatives = random.Random(0)
    for _ in range(1 + rank):  # each process's batches differ (shapes, negatives sampled): so do its draws
        _draws(negatives), torch.rand(7 * (1 + rank))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loss_fn": torch.nn.Module()}
    rngs = checkpoint.rng_states(negatives, d)  # every process, as train()'s save_checkpoint
    if d.main:
        state = checkpoint.training_state(**parts, negatives_rng=negatives, step=1, epoch=0, done=1, seen=8,
                                          skipped=0, seconds=1.0, base={}, fingerprint="f", config={},
                                          rng_by_rank=rngs)
        checkpoint.save(run / "new", state)
        old = {k: v for k, v in state.items() if k != "rng_by_rank"}  # what format 3 wrote: rank 0's only
        checkpoint.save(run / "old", {**old, "format": 3})
    torch.distributed.barrier()
    uninterrupted = _draws(negatives)
    got = {"uninterrupted": uninterrupted}
    for name in ("new", "old"):
        random.seed(99), np.random.seed(99), torch.manual_seed(99), negatives.seed(99)  # a fresh process
        state, _ = checkpoint.load(run / name)
        checkpoint.restore_training(state, **parts, negatives_rng=negatives, fingerprint="f", rank=rank, world=2)
        got[name] = _draws(negatives)
        got[f"{name}_format"] = state["format"], len(state.get("rng_by_rank", [])), state["config"]
    got["messages"] = messages
    torch.save(got, run / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_a_resumed_ddp_run_restores_each_processs_own_random_state(tmp_path):
    """Each process's dropout mask, torch/NumPy/Python draws and negative sampler after a resume are those of
    its uninterrupted run (not rank 0's); a format-3 checkpoint (rank 0's state only) still resumes, every
    process from rank 0's state, with a warning."""
    from embtune.training.checkpoint import FORMAT

    mp.spawn(_resume_task, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)

    a, b = got[0]["uninterrupted"], got[1]["uninterrupted"]
    assert all(not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]) for k in a)  # ranks differ
    for r in (0, 1):
        assert got[r]["new_format"] == (FORMAT, 2, {})  # every process's state in the checkpoint
        assert same(got[r]["new"], got[r]["uninterrupted"])  # its own, as if never interrupted
        # read as today's format, the config upgraded: before format 5, bf16 auto meant fp32 on a CPU
        assert got[r]["old_format"] == (FORMAT, 0, {"train": {"bf16": False}})
        assert same(got[r]["old"], got[0]["uninterrupted"])  # rank 0's, on every process
    assert any("only one process's (format 3 or older)" in m for m in got[0]["messages"])
    assert not got[1]["messages"]  # the warning once, from rank 0
