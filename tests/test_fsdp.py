"""train.strategy=fsdp (FSDP2, embtune.training.fsdp): two gloo processes give the single-process gradient,
a tiny decoder LLM trains sharded and saves a folder sentence-transformers loads, a sharded checkpoint
resumes to the uninterrupted run's weights, and what cannot be sharded is refused before the model loads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONF, NOT_A_MODEL, REPO
from hydra import compose, initialize_config_dir

from embtune.training import checkpoint, fsdp
from embtune.training.distributed import Dist

WORKER = REPO / "tests" / "fsdp_worker.py"
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


def _run(cmd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _torchrun(*args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)])


# -- gradients (about 30 s each on the 2-core machine: two processes load torch and the model)

@pytest.mark.slow
@needs_dist
@pytest.mark.parametrize("model, pooling, grad_cache, lora", [
    ("tiny_bert", "mean", "0", "0"), ("tiny_bert", "mean", "1", "0"), ("tiny_qwen2", "last_token", "0", "0"),
    ("tiny_qwen2", "last_token", "1", "1")],
    ids=["encoder", "encoder-grad_cache", "decoder-last_token", "decoder-lora-grad_cache"])
def test_fsdp_gradient_equals_the_single_process_gradient(model, pooling, grad_cache, lora, tmp_path, request):
    """Two processes, each 2 of 4 examples, sharded weights, cross-device hard negatives (and GradCache one
    row at a time; LoRA adapters on frozen base weights): every gradient, gathered whole, equals one
    process's on all 4 examples within 1e-5, and so do the norm and the clipped gradients."""
    out = tmp_path / "grads.pt"
    _torchrun(WORKER, request.getfixturevalue(model), out, pooling, grad_cache, lora)
    r = torch.load(out)
    ref, got = r["reference"], r["sharded"]
    assert set(ref) == set(got) and len(ref) > 10  # every trained weight and the learnable temperature
    assert all(("lora_" in k) == (lora == "1") for k in ref if k != "loss.log_inv_temperature")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5
    assert ref["loss.log_inv_temperature"].abs().item() > 1e-3  # real gradients, and cross-device ones matter
    assert r["sharded_norm"].item() == pytest.approx(r["reference_norm"].item(), rel=1e-5)
    assert r["reference_norm"].item() > 1  # clipping at 0.01 scales every gradient down
    ref, got = r["reference_clipped"], r["sharded_clipped"]
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-7


# -- a decoder LLM trained sharded, saved, loaded in sentence-transformers, resumed

def _train_llm(tiny_qwen2, data, beir, run, *extra):
    return _torchrun("-m", "embtune.cli", "model=llm", f"model.name_or_path={tiny_qwen2}", "model.lora=null",
                     "model.gradient_checkpointing=true", "train.strategy=fsdp", "data=jsonl", f"data.path={data}",
                     f"data.test_path={beir}", "train.batch_size=4", "train.max_steps=4", "train.lr=1e-3",
                     "train.grad_cache=true", "train.mini_batch_size=2", "negatives.cross_device=true",
                     "train.checkpoint_every=2", "train.keep_checkpoint=true", "train.log_every=1",
                     "eval.before=false", "logger=none", f"hydra.run.dir={run}", *extra)


@pytest.fixture(scope="module")
def fsdp_run(tiny_qwen2, tmp_path_factory):
    """A 4-step fsdp run of a tiny Qwen2 with 2 processes; checkpoints at steps 2 and 4 kept."""
    from test_data_loaders import write_beir

    tmp = tmp_path_factory.mktemp("fsdp")
    data, beir, run = tmp / "pairs.jsonl", write_beir(tmp / "beir"), tmp / "run"
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer number {i}"}) + "\n"
                            for i in range(32)))
    _train_llm(tiny_qwen2, data, beir, run)
    return tmp, data, beir, run


@pytest.mark.slow
@needs_dist
def test_fsdp_llm_trains_and_saves_a_folder_sentence_transformers_loads(fsdp_run, tiny_qwen2):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    import embtune

    _, _, _, run = fsdp_run
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4] and all(e["train/candidates"] == 8.0 for e in train)
    assert json.loads((run / "summary.json").read_text())["final"]  # rank 0 evaluated the gathered model
    trained, start = load_file(run / "model" / "model.safetensors"), load_file(f"{tiny_qwen2}/model.safetensors")
    assert all(trained[k].shape == start[f"model.{k}"].shape for k in trained)  # whole tensors, not shards
    assert max((trained[k] - start[f"model.{k}"]).abs().max().item() for k in trained) > 1e-4  # it trained
    texts = ["def add(a, b): return a + b", "query: how do I join paths?", "the quick brown fox"]
    ours = embtune.load(str(run / "model")).encode(texts)
    st = SentenceTransformer(str(run / "model"), device="cpu").encode(texts)
    assert np.abs(ours - st).max() < 1e-5


@pytest.mark.slow
@needs_dist
def test_fsdp_checkpoints_are_sharded_and_resume_to_the_uninterrupted_weights(fsdp_run, tiny_qwen2):
    from safetensors.torch import load_file

    tmp, data, beir, run = fsdp_run
    folder = run / checkpoint.FOLDER
    state = checkpoint.read(folder / checkpoint.PREV)
    assert state["step"] == 2 and state["world"] == 2 and "model" not in state and "optimizer" not in state
    shards = folder / state["shards"]
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one file a process
    assert sorted(p.name for p in shards.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert sorted(p.name for p in folder.glob("shards-*")) == ["shards-step00000002", "shards-step00000004"]
    _train_llm(tiny_qwen2, data, beir, tmp / "resumed", f"resume_from={folder / checkpoint.PREV}")
    steps = [json.loads(x)["step"] for x in (tmp / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [3, 4]
    a, b = load_file(tmp / "resumed" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# -- in one process: the pieces, and the refusals


def test_transformer_layers_are_found_in_encoders_and_decoders(tiny_bert, tiny_qwen2):
    from transformers import AutoModel

    bert, qwen = AutoModel.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_qwen2)
    assert [type(m).__name__ for m in fsdp.layers(bert)] == ["BertLayer", "BertLayer"]
    assert fsdp.layers(bert) == list(bert.encoder.layer)
    assert fsdp.layers(qwen) == list(qwen.layers)  # Qwen2DecoderLayer x 2


def test_skeleton_holds_no_weights_but_keeps_the_buffers(tiny_qwen2):
    from embtune.model import from_pretrained
    from embtune.model.pooling import LastToken

    model = from_pretrained(tiny_qwen2, pooling=LastToken(), append_eos=True)
    plain = fsdp.skeleton(model)
    assert all(p.device.type == "meta" for p in plain.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the original is untouched
    assert all(b.device.type == "cpu" for b in plain.buffers()) and len(list(plain.buffers())) > 0  # rotary table
    assert plain.tokenizer is model.tokenizer
    plain.load_state_dict(model.state_dict(), assign=True)  # what full_model does with the gathered weights
    texts = ["def add(a, b): return a + b", "the quick brown fox"]
    assert np.abs(plain.encode(texts) - model.encode(texts)).max() == 0


def test_clipping_equals_torch_on_plain_tensors():
    torch.manual_seed(0)
    a, b = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], [torch.nn.Parameter(torch.randn(5, 3))
                                                                       for _ in range(2)]
    for p, q in zip(a, b):
        p.grad = torch.randn(5, 3) * 3
        q.grad = p.grad.clone()
    norm = fsdp.clip_grad_norm_(a, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert norm.item() == pytest.approx(expected.item()) and expected.item() > 0.5
    assert all(torch.allclose(p.grad, q.grad) for p, q in zip(a, b))


def test_fsdp_in_a_world_of_one_trains_as_one_process(caplog):
    with caplog.at_level("INFO"):
        assert fsdp.active("fsdp", Dist()) is False
    assert "nothing to shard" in caplog.text
    assert fsdp.active("ddp", Dist(0, 2, 0)) is False and fsdp.active("fsdp", Dist(1, 2, 1)) is True


def _refused(tmp_path, overrides):
    """train() on a model folder that does not exist: a refusal must come before the model loads."""
    from embtune.recipes.finetune import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i}"}) + "\n" for i in range(8)))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.name_or_path={NOT_A_MODEL}", "data=jsonl",
                                                       f"data.path={data}", "logger=none", *overrides])
    return lambda: train(cfg, tmp_path / "run", None)


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=fsdp", "eval.every_steps=10"], "train.strategy=fsdp with eval.every_steps=10"),
    (["train.strategy=fsdp", "model=multi_vector"], "train.strategy=fsdp with model=multi_vector"),
    (["train.strategy=zero3"], "train.strategy must be ddp or fsdp"),
])
def test_what_fsdp_cannot_do_is_refused_by_name_before_the_model_loads(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _refused(tmp_path, overrides)()
