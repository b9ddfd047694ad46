"""Fault injection: interrupted, killed and resumed runs, damaged checkpoints, a full disk, non-finite
steps, low temperatures, and secrets that must never be written anywhere.

The reference is one uninterrupted 8-step run on a tiny BERT (dropout on) with hard negatives sampled
per step and a learnable temperature, crossing two epoch boundaries: every random state and the data
position must be restored for a resumed run to end with the same weights.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CONF, DATA, REPO, interrupt_at, logged
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import embtune.recipes.finetune as train_module
from embtune.objectives import Contrastive
from embtune.run.logger import RunLogger
from embtune.training import checkpoint
from embtune.training.numerics import finite_or_missing

TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"  # 10 rows, 1-8 negatives each
N, EVERY = 8, 2
SETTINGS = ["data=jsonl", f"data.path={TOY}", "data.dev_queries=0", "data_format=multi_negative", "data_format.positive=pos",
            "data_format.negatives=neg", "negatives=hard", "negatives.group_size=3", "loss.learnable=true",
            "train.batch_size=4", f"train.max_steps={N}", f"train.checkpoint_every={EVERY}", "train.log_every=1",
            "train.lr=1e-3", "eval.before=false", "eval.after=false"]  # 10 rows / 4 = 3 batches an epoch


def _cfg(tiny_bert, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"model.name_or_path={tiny_bert}", *SETTINGS, *overrides])


def _train(cfg, run_dir):
    return logged(train_module.train, cfg, run_dir)


def _losses(run_dir) -> dict[int, float]:
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["train/loss"] for e in events if "train/loss" in e}


def _assert_same_result(run_dir, reference):
    ref_losses, got = _losses(reference), _losses(run_dir)
    assert got and all(abs(got[s] - ref_losses[s]) < 1e-6 for s in got), (got, ref_losses)
    a, b = load_file(run_dir / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    s, r = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert s["steps"] == r["steps"] == N and abs(s["temperature"] - r["temperature"]) < 1e-6


@pytest.fixture(scope="module")
def straight(tiny_bert, tmp_path_factory):
    """The uninterrupted run: its folder (losses, checkpoints at steps 6 and 8, final model)."""
    run_dir = tmp_path_factory.mktemp("straight")
    _train(_cfg(tiny_bert, ["train.keep_checkpoint=true"]), run_dir)  # later tests resume from its checkpoints
    return run_dir


def test_a_completed_run_drops_its_checkpoints_unless_asked_to_keep_them(tiny_bert, straight, tmp_path):
    assert checkpoint.load(straight)[0]["step"] == N  # train.keep_checkpoint=true
    _train(_cfg(tiny_bert), tmp_path / "default")
    assert not (tmp_path / "default" / checkpoint.FOLDER).exists()
    assert (tmp_path / "default" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["status"] == "completed"


def test_interrupt_half_way_then_resume_equals_a_straight_run(tiny_bert, straight, tmp_path, monkeypatch):
    stop = interrupt_at(monkeypatch, N // 2)  # Ctrl-C during step N/2
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's handler, when started in the background
    with pytest.raises(SystemExit) as stopped:
        _train(_cfg(tiny_bert), tmp_path / "first")
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    state, _ = checkpoint.load(tmp_path / "first")
    assert state["step"] == N // 2 and state["done"] == 1 and state["epoch"] == 1  # mid-epoch 2
    stopped_at = json.loads((tmp_path / "first" / "summary.json").read_text())  # how far it got, and what it ran
    assert stopped_at["status"] == "interrupted" and stopped_at["steps"] == N // 2 and stopped_at["signal"] == "SIGINT"
    assert stopped_at["precision"] in ("fp32", "bf16-autocast") and stopped_at["data"]["train_rows"] == 10
    assert stopped_at["checkpoint"].endswith(checkpoint.LAST) and "final" not in stopped_at
    stop()
    summary = _train(_cfg(tiny_bert, [f"resume_from={tmp_path / 'first'}"]), tmp_path / "second")
    assert summary["resumed_from"].endswith("ckpt-last.pt")
    assert sorted(_losses(tmp_path / "second")) == list(range(N // 2 + 1, N + 1))
    _assert_same_result(tmp_path / "second", straight)


def test_an_interrupted_summary_is_replaced_by_its_completed_resume_and_never_replaces_a_completed_one(
        tiny_bert, tmp_path, monkeypatch):
    stop = interrupt_at(monkeypatch, 2, signal.SIGTERM)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        _train(_cfg(tiny_bert), run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    stop()
    _train(_cfg(tiny_bert, [f"resume_from={run_dir}"]), run_dir)  # resumed in its own folder
    completed = (run_dir / "summary.json").read_text()
    assert json.loads(completed)["status"] == "completed" and json.loads(completed)["steps"] == N

    interrupt_at(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit):  # a run stopped in a folder that holds a completed run's summary
        _train(_cfg(tiny_bert, ["train.max_steps=4"]), run_dir)
    assert (run_dir / "summary.json").read_text() == completed


CHILD = textwrap.dedent("""
    import json, os, sys
    from hydra import compose, initialize_config_dir
    import embtune.recipes.finetune as T
    from embtune.objectives import Contrastive
    from embtune.run.logger import RunLogger

    sig, at, run_dir, conf, overrides = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    real, calls = Contrastive.loss, []

    def loss(*args, **kwargs):  # the signal arrives from outside, in the middle of step `at`
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    Contrastive.loss = loss
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    logger = RunLogger(run_dir, wandb=False)
    try:
        T.train(cfg, run_dir, logger)
    finally:
        logger.finish()
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_process_resumes_to_the_straight_result(tiny_bert, straight, tmp_path, sig):
    seed = random.randrange(10**6)
    at = random.Random(seed).randint(EVERY + 1 if sig == signal.SIGKILL else 1, N - 1)  # SIGKILL: after a checkpoint
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    overrides = [f"model.name_or_path={tiny_bert}", *SETTINGS]
    child = subprocess.run([sys.executable, str(script), str(int(sig)), str(at), str(tmp_path / "killed"), str(CONF),
                            json.dumps(overrides)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's embtune, not an installed one
    why = f"signal {sig.name} at step {at} (seed {seed}): {child.stderr[-2000:]}"
    assert child.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), why
    state, _ = checkpoint.load(tmp_path / "killed")
    expected = (at - 1) // EVERY * EVERY if sig == signal.SIGKILL else at  # last periodic one / the stop step
    assert state["step"] == expected, why
    if sig != signal.SIGKILL:
        assert "resume_from=" in child.stderr, why
        stopped_at = json.loads((tmp_path / "killed" / "summary.json").read_text())
        assert stopped_at["status"] == "interrupted" and stopped_at["steps"] == at, why
    _train(_cfg(tiny_bert, [f"resume_from={tmp_path / 'killed'}"]), tmp_path / "resumed")
    _assert_same_result(tmp_path / "resumed", straight)


def _copy_checkpoints(straight, tmp_path):
    shutil.copytree(straight / checkpoint.FOLDER, tmp_path / "run" / checkpoint.FOLDER)
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_damaged_last_checkpoint_falls_back_to_the_previous_with_a_warning(straight, tmp_path, caplog, damage):
    run = _copy_checkpoints(straight, tmp_path)
    last = run / checkpoint.FOLDER / checkpoint.LAST
    data = bytearray(last.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    last.write_bytes(bytes(data))
    state, path = checkpoint.load(run)
    assert path.name == checkpoint.PREV and state["step"] == N - EVERY
    warning = "checksum mismatch" if damage == "flip a byte" else "not a complete embtune checkpoint"
    assert any(warning in r.getMessage() and "resuming from the previous checkpoint" in r.getMessage()
               for r in caplog.records)
    (run / checkpoint.FOLDER / checkpoint.PREV).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        checkpoint.load(run)


def test_resume_from_the_previous_checkpoint_still_equals_the_straight_run(tiny_bert, straight, tmp_path):
    run = _copy_checkpoints(straight, tmp_path)
    (run / checkpoint.FOLDER / checkpoint.LAST).write_bytes(b"half a file")
    _train(_cfg(tiny_bert, [f"resume_from={run}"]), tmp_path / "resumed")
    assert sorted(_losses(tmp_path / "resumed")) == [N - 1, N]
    _assert_same_result(tmp_path / "resumed", straight)


def test_resume_refuses_changed_data_before_the_model_loads(tiny_bert, straight, tmp_path, monkeypatch):
    import embtune.model

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    state, _ = checkpoint.load(straight)
    state["fingerprint"] = "0" * 64
    checkpoint.save(tmp_path / "run", state)
    monkeypatch.setattr(embtune.model, "from_pretrained", no_model)  # what model=encoder's _target_ calls
    with pytest.raises(ValueError, match="training data changed since the checkpoint"):
        _train(_cfg(tiny_bert, [f"resume_from={tmp_path / 'run'}"]), tmp_path / "resumed")


def test_resume_from_a_missing_folder_or_an_empty_one_says_which(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"typo: no such run folder or checkpoint file to resume from"):
        _train(_cfg(tiny_bert, [f"resume_from={tmp_path / 'typo'}"]), tmp_path / "resumed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no checkpoint \(checkpoints/ckpt-last.pt"):
        _train(_cfg(tiny_bert, [f"resume_from={tmp_path / 'empty'}"]), tmp_path / "resumed")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_never_runs_pickled_code(tmp_path):
    checkpoint.save(tmp_path, {"step": 1, "payload": _Evil()})  # a checksum-valid file with a code object
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        checkpoint.read(tmp_path / checkpoint.FOLDER / checkpoint.LAST)
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"step": 1, "w": torch.ones(3)})
    checkpoint.save(tmp_path, {"step": 2, "w": torch.ones(3)})
    folder = tmp_path / checkpoint.FOLDER
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class FullDisk:  # writes a little, then the disk is full
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(checkpoint, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match=r"No space left on device.*earlier checkpoints are intact") as e:
        checkpoint.save(tmp_path, {"step": 3, "w": torch.ones(3)})
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)[0]["step"] == 2


def test_disk_full_while_saving_the_model_leaves_no_half_folder(tiny_bert, tmp_path, monkeypatch):
    import embtune

    model = embtune.load(tiny_bert)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model.encoder, "save_pretrained", full)
    from embtune.model import save

    with pytest.raises(OSError, match="No space left"):
        save(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# --- numerics ----------------------------------------------------------------------------------------


def _poisoned(monkeypatch, at: int, how: str):
    real, calls = Contrastive.loss, []

    def poisoned(objective, model, *args, **kwargs):
        loss, extra = real(objective, model, *args, **kwargs)
        calls.append(1)
        if len(calls) != at:
            return loss, extra
        if how == "loss":
            return loss * float("nan"), extra
        p = next(model.parameters())  # finite loss, NaN gradient: d/dp sqrt(0·p) = 0·∞
        return loss + torch.sqrt(p.abs().sum() * 0), extra

    monkeypatch.setattr(Contrastive, "loss", poisoned)


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_non_finite_step_is_skipped_counted_and_logged(tiny_bert, tmp_path, monkeypatch, how):
    _poisoned(monkeypatch, 2, how)
    summary = _train(_cfg(tiny_bert, ["train.max_steps=3", "train.checkpoint_every=null"]), tmp_path)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "train/skipped_steps": 1} in events
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_step_stops_naming_the_step_and_the_rows(tiny_bert, tmp_path, monkeypatch):
    _poisoned(monkeypatch, 2, "loss")
    with pytest.raises(FloatingPointError, match=rf"step 2: non-finite loss .*batch rows: {TOY}:\d+, {TOY}:\d+"):
        _train(_cfg(tiny_bert, ["train.on_nonfinite=stop"]), tmp_path)


def _loss_inputs(name, B=4, C=8):
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(B, 16), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(C, 16), dim=-1)
    scores = (a @ c.T).requires_grad_()
    masked = scores.masked_fill(torch.eye(B, C, dtype=torch.bool).roll(1, 1), float("-inf"))  # padded candidates
    if name in ("cosent", "pointwise_bce"):
        return scores, (scores[:, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    if name == "listwise":
        return scores, (scores, torch.arange(C, dtype=torch.float).repeat(B, 1), torch.ones(B, C, dtype=torch.bool))
    return scores, (masked, torch.arange(B))


@pytest.mark.parametrize("tau", [0.01, 0.001])
@pytest.mark.parametrize("name", ["info_nce", "binary", "logistic", "multi_label_softmax", "cosent", "pointwise_bce",
                                  "listwise"])
def test_low_temperatures_keep_loss_and_gradients_finite(name, tau):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF / "loss" / f"{name}.yaml")
    node.temperature = tau
    if "min_temperature" in node:
        node.min_temperature = tau
    loss_fn = instantiate(node)
    scores, inputs = _loss_inputs(name)
    loss = loss_fn(*inputs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


def test_a_metric_that_cannot_be_computed_is_missing_not_nan(tmp_path):
    from embtune.eval.metrics import sts_spearman

    same = torch.ones(4, 3)  # every cosine equal: Spearman is undefined
    assert sts_spearman(same, same, [0.0, 1.0, 2.0, 3.0]) is None
    assert finite_or_missing({"ndcg@10": float("nan"), "mrr@10": 0.5}) == {"ndcg@10": None, "mrr@10": 0.5}
    logger = RunLogger(tmp_path, wandb=False)
    logger.log({"eval/spearman": float("nan")}, step=0)
    logger.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "eval/spearman": None}


# --- secrets -----------------------------------------------------------------------------------------

HF_SECRET = "hf_" + "Q7x" * 12
WANDB_SECRET = "0123456789abcdef" * 2 + "deadbeef"


def test_no_token_lands_in_logs_configs_wandb_or_the_model(tiny_bert, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_TOKEN": HF_SECRET, "WANDB_API_KEY": WANDB_SECRET, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={TOY}",
           "data_format.positive=pos", "train.batch_size=4", "train.max_steps=1", "train.keep_checkpoint=true",
           f"logger.name=pasted-{HF_SECRET}", f"hydra.run.dir={run_dir}", "logger=wandb", "logger.mode=offline"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "embtune.json" for p in written) and any(p.name == checkpoint.LAST for p in written)
    assert any("wandb" in p.parts for p in written) and (run_dir / ".hydra" / "overrides.yaml").is_file()
    for secret in (HF_SECRET, WANDB_SECRET):
        assert secret not in out.stdout + out.stderr
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert leaks == [], leaks
    assert "pasted-***" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_redact_masks_secret_keys_token_shapes_and_env_values(monkeypatch):
    from embtune.run.redact import redact

    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    cfg = {"model": {"name_or_path": "org/model", "trust_remote_code": False, "query_max_length": 64},
           "hf_token": "anything", "url": "https://user:pw@host/x", "note": "uses s3cr3t-value-123",
           "tags": [f"a-{HF_SECRET}"], "fingerprint": "ab" * 32}
    assert redact(cfg) == {"model": cfg["model"], "hf_token": "***", "url": "https://***@host/x",
                           "note": "uses ***", "tags": ["a-***"], "fingerprint": "ab" * 32}


def test_redacted_hydra_yaml_still_loads_and_keeps_ordinary_keys(tmp_path):
    import yaml

    from embtune.run.redact import redact_yaml_file

    path = tmp_path / "config.yaml"
    path.write_text("train:\n  cache_tokens: true\n  max_tokens: 8\nhydra:\n  job:\n    env_set:\n"
                    "      HF_TOKEN: abcdefgh12345\n  overrides:\n    - wandb.api_key=xyz123456\n")
    redact_yaml_file(path)
    assert yaml.safe_load(path.read_text()) == {  # a bare *** would be a YAML alias: the mask is quoted
        "train": {"cache_tokens": True, "max_tokens": 8},
        "hydra": {"job": {"env_set": {"HF_TOKEN": "***"}}, "overrides": ['wandb.api_key="***"']}}


def test_remote_code_is_off_by_default():
    cfg = _cfg("unused")
    assert cfg.model.trust_remote_code is False
    import inspect

    from embtune.model import from_pretrained

    assert inspect.signature(from_pretrained).parameters["trust_remote_code"].default is False


def test_ctrl_c_during_the_final_evaluation_keeps_the_trained_model(tiny_bert, tmp_path, monkeypatch):
    from embtune.eval.evaluators import Retrieval

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises once training's own signal handler is gone

    monkeypatch.setattr(Retrieval, "__call__", stopped)
    with pytest.raises(SystemExit) as stop:
        _train(_cfg(tiny_bert, ["data.dev_queries=3", "eval.after=true"]), tmp_path / "run")
    assert stop.value.code == 128 + signal.SIGINT
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == N and summary["final"] == {}
    assert summary["final_evaluation"] == "stopped by SIGINT"
