"""Model selection during training (embtune.training.selection): the best evaluation and its weights,
a NaN or missing metric never best, early stopping, eval.keep, and a killed run that resumes with the
best model and its step."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CONF, REPO, logged
from safetensors.torch import load_file

import embtune.recipes.finetune as train_module
from embtune.training import checkpoint
from embtune.training.selection import Best, check_selection


def _model(value):
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value), m.bias.fill_(value)
    return m


def test_selection_over_half_nan_and_point_six_picks_point_six():
    best, model = Best("ndcg@10"), _model(0)
    steps = {10: 0.5, 20: math.nan, 30: 0.6}
    improved = []
    for step, value in steps.items():
        with torch.no_grad():
            model.weight.fill_(step)
        improved.append(best.update(step, {"ndcg@10": value, "mrr@10": 0.1}, model))
    assert improved == [True, False, True] and best.step == 30 and best.value == 0.6
    with torch.no_grad():
        model.weight.fill_(-1)
    assert best.restore(model) and model.weight.eq(30).all()


@pytest.mark.parametrize("values,best_step", [
    ([math.nan, 0.2], 2), ([None, 0.2], 2), ([0.3, None, 0.2], 1), ([0.3, 0.3], 1),  # a tie is no improvement
])
def test_nan_or_missing_is_never_best(values, best_step):
    best = Best("ndcg@10")
    for step, v in enumerate(values, 1):
        best.update(step, {} if v is None else {"ndcg@10": v}, _model(step))
    assert best.step == best_step


def test_early_stopping_after_patience_evaluations_without_improvement():
    best = Best("ndcg@10", patience=2)
    stops = []
    for step, v in enumerate([0.5, 0.4, 0.6, 0.6, math.nan], 1):
        best.update(step, {"ndcg@10": v}, _model(step))
        stops.append(best.should_stop)
    assert stops == [False, False, False, False, True] and best.step == 3
    assert not Best("ndcg@10").should_stop


def test_keep_last_holds_no_weights_and_restores_nothing():
    best, model = Best("ndcg@10", keep="last"), _model(1)
    best.update(1, {"ndcg@10": 0.9}, model)
    assert best.weights is None and not best.restore(model) and best.step == 1


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    best = Best("ndcg@10", patience=3)
    best.update(5, {"ndcg@10": 0.7, "recall@10": None}, _model(5))
    best.update(10, {"ndcg@10": 0.1}, _model(10))
    path = checkpoint.save(tmp_path, {"selection": best.state_dict()})
    again = Best("ndcg@10", patience=3)
    again.load_state_dict(checkpoint.read(path)["selection"])
    model = _model(0)
    assert (again.step, again.value, again.since_best, again.evaluations) == (5, 0.7, 1, 2)
    assert again.restore(model) and model.weight.eq(5).all()


@pytest.mark.parametrize("args,match", [
    ((0, "best", None), r"eval.every_steps=0"), ((5, "first", None), r"eval.keep='first'"),
    ((5, "best", 0), r"train.early_stopping_patience=0"),
    ((None, "best", 3), r"train.early_stopping_patience=3 needs evaluations during training"),
])
def test_bad_selection_settings_are_refused_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        check_selection(*args)


# -- in the loop: a scripted metric per step (the evaluator itself is tested in test_evaluate.py)
TOY = REPO.parent / "shared" / "data" / "triplets" / "flagembedding_toy_finetune_data.jsonl"
SETTINGS = ["data=jsonl", f"data.path={TOY}", "data.dev_queries=2", "data_format=multi_negative",
            "train.batch_size=4", "train.max_steps=8", "train.checkpoint_every=2", "train.lr=1e-3",
            "eval.before=false", "eval.every_steps=2"]
SCRIPT = {2: 0.5, 4: 0.7, 6: float("nan"), 8: 0.4}  # the best is step 4's


def _scripted(script, seen):
    real = train_module.evaluate_and_select

    def evaluate_and_select(evaluator, model, data, dims, best, step, proc):
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        scripted = lambda *a: {"ndcg@10": script[step]}  # noqa: E731
        return real(scripted, model, data, dims, best, step, proc)

    return evaluate_and_select


def _train(tiny_bert, run_dir, overrides=()):
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.name_or_path={tiny_bert}", *SETTINGS, *overrides])
    return logged(train_module.train, cfg, run_dir)


def _saved(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def _same(saved, state, tol=0.0):
    """The saved tensors equal the model's state_dict (whose names carry the model's module prefix)."""
    named = {k: next(v for n, v in state.items() if n == k or n.endswith("." + k)) for k in saved}
    return all((saved[k] - named[k]).abs().max() <= tol for k in saved)


def test_the_saved_model_is_the_best_evaluated_and_logged_on_the_step_axis(tiny_bert, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "evaluate_and_select", _scripted(SCRIPT, seen))
    summary = _train(tiny_bert, tmp_path / "best")
    events = [json.loads(x) for x in (tmp_path / "best" / "metrics.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["eval/ndcg@10"] for e in events if "eval/ndcg@10" in e}
    assert list(logged) == [2, 4, 6, 8] and logged[6] is None  # NaN logged as missing
    assert summary["selection"]["best_step"] == 4 and summary["selection"]["best_value"] == 0.7
    assert summary["final"] == {"ndcg@10": 0.7} and summary["last"] == {"ndcg@10": 0.4}
    saved = _saved(tmp_path / "best")
    assert _same(saved, seen[4]) and not _same(saved, seen[8])
    monkeypatch.setattr(train_module, "evaluate_and_select", _scripted(SCRIPT, {}))
    last = _train(tiny_bert, tmp_path / "last", ["eval.keep=last"])
    assert last["final"] == {"ndcg@10": 0.4} and _same(_saved(tmp_path / "last"), seen[8])


def test_early_stopping_stops_the_run(tiny_bert, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "evaluate_and_select", _scripted({2: 0.5, 4: 0.4, 6: 0.3, 8: 0.9}, seen))
    summary = _train(tiny_bert, tmp_path, ["train.early_stopping_patience=2"])
    assert summary["steps"] == 6 and list(seen) == [2, 4, 6]
    assert summary["selection"]["stopped_early"] and summary["selection"]["best_step"] == 2


CHILD = textwrap.dedent("""
    import json, os, sys
    from hydra import compose, initialize_config_dir
    import embtune.recipes.finetune as T
    from embtune.objectives import Contrastive
    from embtune.run.logger import RunLogger

    at, run_dir, conf, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    real_loss, real_select, calls = Contrastive.loss, T.evaluate_and_select, []
    script = {2: 0.5, 4: 0.7, 6: float("nan"), 8: 0.4}

    def loss(*args, **kwargs):  # killed from outside in the middle of step `at`
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), 9)
        return real_loss(*args, **kwargs)

    def evaluate_and_select(evaluator, model, data, dims, best, step, proc):
        return real_select(lambda *a: {"ndcg@10": script[step]}, model, data, dims, best, step, proc)

    Contrastive.loss, T.evaluate_and_select = loss, evaluate_and_select
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    logger = RunLogger(run_dir, wandb=False)
    try:
        T.train(cfg, run_dir, logger)
    finally:
        logger.finish()
""")


def test_a_killed_run_resumes_with_the_best_model_and_its_step(tiny_bert, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_module, "evaluate_and_select", _scripted(SCRIPT, seen))
    straight = _train(tiny_bert, tmp_path / "straight")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    overrides = [f"model.name_or_path={tiny_bert}", *SETTINGS]
    child = subprocess.run([sys.executable, str(script), "7", str(tmp_path / "killed"), str(CONF),
                            json.dumps(overrides)], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    state, _ = checkpoint.load(tmp_path / "killed")
    assert state["step"] == 6 and state["selection"]["step"] == 4  # the best so far is in the checkpoint
    resumed_seen = {}
    monkeypatch.setattr(train_module, "evaluate_and_select", _scripted(SCRIPT, resumed_seen))
    resumed = _train(tiny_bert, tmp_path / "resumed", [f"resume_from={tmp_path / 'killed'}"])
    assert list(resumed_seen) == [8]  # only step 8 evaluated after the resume; step 4 came from the checkpoint
    assert resumed["selection"]["best_step"] == straight["selection"]["best_step"] == 4
    assert resumed["final"] == straight["final"] == {"ndcg@10": 0.7}
    saved = _saved(tmp_path / "resumed")
    assert _same(saved, seen[4], tol=1e-6) and not _same(saved, seen[8], tol=1e-6)
