"""data.streaming=true (embtune.data.streaming): rows read from the file as training goes.

Rows are streamed whole, once an epoch, in an order of the seed and the epoch; two processes read disjoint rows
that cover the file; a bad row met mid-stream raises the error the on-disk path gives for it; what a stream
cannot do is refused by name before the model loads; a resumed run trains on exactly the batches of an
uninterrupted one and ends with its weights; a short run trains and records that its data was streamed.
"""

import json
import re

import pytest
from conftest import CONF, DATA, NOT_A_MODEL, interrupt_at, logged
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import embtune.recipes.finetune as train_module
from embtune.config import build, check_run
from embtune.data import load_jsonl, load_mixture, streaming
from embtune.data.checks import make_examples
from embtune.objectives import Contrastive
from embtune.recipes import run as run_recipe
from embtune.training import checkpoint
from embtune.training.distributed import Dist

TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"  # 10 rows, 1-8 negatives each
STREAM = ["data=jsonl", "data.streaming=true", "train.max_steps=3",
          "eval.before=false", "eval.after=false", "logger=none"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _rows_file(tmp_path, n=40, bad=None, name="rows.jsonl"):
    """n rows ``{"query": "q<i>", "pos": ["p<i>"]}`` (line i+1), line ``bad`` replaced by a given text."""
    lines = [json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) for i in range(n)]
    if bad is not None:
        lines[bad[0] - 1] = bad[1]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


class _Texts:
    """A stand-in model: "tokenising" keeps the texts, so a batch shows which rows it holds."""

    def tokenize(self, texts, kind):
        return {"texts": list(texts)}


def _batches(path, overrides=(), rank=0, world=1):
    """The stream's loader as the training loop builds it, for process ``rank`` of ``world``."""
    cfg = _compose([*STREAM, f"data.path={path}", "data.shuffle_buffer=8", "train.min_batch_size=1", *overrides])
    data, data_format = build(cfg, "data"), build(cfg, "data_format")
    negatives, loss_fn = build(cfg, "negatives"), build(cfg, "loss")
    objective = check_run(cfg, data_format, negatives, loss_fn, build(cfg, "eval"), None)
    examples, _ = streaming.make_examples(data, data_format, objective)
    sampler, rng = streaming.plan_batches(examples, objective, cfg.train, Dist(rank, world))
    return streaming.make_loader(examples, objective, cfg.train, _Texts(), sampler, rng)


def _epoch(loader, epoch):
    """The lines (``file:line``) of each batch of one epoch, and the queries of each."""
    loader.set_epoch(epoch)
    got = [(rows, batch["query"]["texts"]) for rows, batch in loader]
    return [[int(r.rsplit(":", 1)[1]) for r in rows] for rows, _ in got], [q for _, q in got]


def test_one_process_streams_every_row_once_an_epoch_in_an_order_of_the_seed_and_the_epoch(tmp_path):
    path = _rows_file(tmp_path)
    loader = _batches(path, ["train.batch_size=4"])
    lines0, queries0 = _epoch(loader, 0)
    lines1, _ = _epoch(loader, 1)
    flat0, flat1 = sum(lines0, []), sum(lines1, [])
    assert sorted(flat0) == sorted(flat1) == list(range(1, 41))  # every row once an epoch
    assert all(len(b) == 4 for b in lines0)
    assert all(f"q{line - 1}" == q for b, qs in zip(lines0, queries0) for line, q in zip(b, qs))  # the row's own texts
    assert flat0 != list(range(1, 41)) and flat0 != flat1  # shuffled, a new order each epoch
    assert sum(_epoch(_batches(path, ["train.batch_size=4"]), 1)[0], []) == flat1  # the same seed and epoch: same
    assert sum(_epoch(_batches(path, ["train.batch_size=4", "train.seed=7"]), 1)[0], []) != flat1


def test_two_processes_read_disjoint_rows_that_cover_the_file(tmp_path):
    path = _rows_file(tmp_path, n=41)
    for epoch in (0, 1):
        parts = [sum(_epoch(_batches(path, ["train.batch_size=4"], rank=r, world=2), epoch)[0], []) for r in (0, 1)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == list(range(1, 42))
        assert {len(p) for p in parts} == {20, 21}


def test_no_text_repeats_in_a_batch_and_a_clashing_row_waits_for_the_next(tmp_path):
    path = tmp_path / "shared.jsonl"  # every query twice (its two positives as two rows): 20 distinct queries
    path.write_text("".join(json.dumps({"query": f"q{i // 2}", "pos": [f"p{i}"]}) + "\n" for i in range(40)))
    lines, queries = _epoch(_batches(path, ["train.batch_size=4"]), 0)
    assert all(len(set(q)) == len(q) for q in queries)
    assert sorted(sum(lines, [])) == list(range(1, 41))  # every row still in a batch


@pytest.mark.parametrize("bad,message", [
    ('{"query": ["a", "b"], "pos": ["p"]}', "field 'query' must be a string, got list"),
    ('{"query": "q", "pos"', "bad JSON"),
])
def test_a_bad_row_mid_stream_raises_the_error_the_on_disk_path_gives(tmp_path, monkeypatch, bad, message):
    path = _rows_file(tmp_path, bad=(30, bad))
    cfg = _compose([*STREAM, f"data.path={path}"])
    data_format = build(cfg, "data_format")
    objective = check_run(cfg, data_format, build(cfg, "negatives"), build(cfg, "loss"), build(cfg, "eval"), None)
    with pytest.raises(ValueError) as on_disk:
        make_examples(load_jsonl(str(path), dev_queries=0), data_format, objective)
    monkeypatch.setattr(streaming, "HEAD_ROWS", 5)  # the bad row comes after the rows read up front
    loader = _batches(path)
    with pytest.raises(ValueError) as streamed:
        _epoch(loader, 0)
    assert str(streamed.value) == str(on_disk.value)
    assert str(streamed.value).startswith(f"{path}:30: ") and message in str(streamed.value)


def test_a_bad_row_among_the_first_rows_is_refused_when_the_data_loads(tmp_path):
    path = _rows_file(tmp_path, bad=(3, '{"query": 5, "pos": ["p"]}'))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'query' must be a string, got int")):
        _batches(path)


def test_a_dropped_bad_row_is_counted_once_however_many_epochs_read_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(streaming, "HEAD_ROWS", 5)
    path = _rows_file(tmp_path, bad=(30, '{"query": "q"}'))
    loader = _batches(path, ["data.drop_bad_rows=true"])
    for epoch in (0, 1, 2):
        lines = sum(_epoch(loader, epoch)[0], [])
        assert sorted(lines) == [n for n in range(1, 41) if n != 30]
    assert loader.data.problems.summary()["dropped_rows"] == 1
    assert sum(f"{path}:30: missing field 'pos'" in r.message for r in caplog.records) == 1


REFUSED = {
    "train.max_steps=null": ["train.max_steps=null"],
    "train.cache_tokens=true": ["train.cache_tokens=true"],
    "data.max_train_pairs=5": ["data.max_train_pairs=5"],
    "data.dev_queries=3": ["data.dev_queries=3"],
    "data.shuffle_buffer=0": ["data.shuffle_buffer=0"],
    "loss=arcface": ["loss=arcface"],
    "loss=multi_label_softmax": ["loss=multi_label_softmax"],
    "data_format=raw_texts": ["data_format=raw_texts", "loss=simcse"],
    "teacher": ["teacher=cross_encoder", "teacher.name_or_path=/nonexistent/teacher", "loss=distill_kl",
                "data_format=triplet", "data_format.positive=pos", "data_format.negative=neg", "negatives=hard",
                "negatives.group_size=2"],
    "recipe=mining_rounds": ["recipe=mining_rounds", "negatives=hard", "data_format=multi_negative"],
    "recipe=two_stage": ["recipe=two_stage"],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_a_stream_cannot_do_is_refused_by_name_before_the_model_loads(name, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(train_module, "instantiate", no_model)
    cfg = _compose([*STREAM, f"data.path={TOY}", f"model.name_or_path={NOT_A_MODEL}", *REFUSED[name]])
    with pytest.raises(ValueError, match=r"streaming=true") as refused:
        run_recipe(cfg, tmp_path, None)
    assert name in str(refused.value)
    assert not (tmp_path / "model").exists()


def test_a_mixture_refuses_a_streamed_source(tmp_path):
    sources = [{"_target_": "embtune.data.load_jsonl", "path": str(TOY), "streaming": True}]
    with pytest.raises(ValueError, match=r"data.sources\[0\] \(.*\): streaming=true"):
        load_mixture(sources)


# -- training: a short run, and resume after an interruption


N, EVERY = 8, 2
TRAIN = [*STREAM, f"data.path={TOY}", "data.shuffle_buffer=4", "data_format=multi_negative",
         "data_format.positive=pos", "data_format.negatives=neg", "negatives=hard", "negatives.group_size=3",
         "loss.learnable=true", "train.batch_size=4", f"train.max_steps={N}", f"train.checkpoint_every={EVERY}",
         "train.log_every=1", "train.lr=1e-3"]  # 10 rows, batches of 4, 4 and 2: 3 an epoch


def _train(tiny_bert, run_dir, overrides=()):
    return logged(train_module.train, _compose([f"model.name_or_path={tiny_bert}", *TRAIN, *overrides]), run_dir)


def _losses(run_dir) -> dict[int, float]:
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["train/loss"] for e in events if "train/loss" in e}


@pytest.fixture
def seen_batches(monkeypatch):
    """Each batch tokenised, as its (query, positive) pairs, in order."""
    got, real = [], Contrastive.collate

    def collate(self, model, examples, rng):
        got.append([(e.query, e.positive) for e in examples])
        return real(self, model, examples, rng)

    monkeypatch.setattr(Contrastive, "collate", collate)
    return got


def test_a_short_streamed_run_trains_logs_its_loss_and_records_the_stream(tiny_bert, tmp_path, caplog):
    caplog.set_level("INFO")
    summary = _train(tiny_bert, tmp_path / "run", ["train.max_steps=3"])
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3] and all(v > 0 for v in losses.values())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["examples"] is None
    assert summary["data"]["streaming"] == {"shuffle_buffer": 4, "rows_read": 10}  # one epoch: 3 batches
    assert summary["data"]["dev_split"]["reason"] == "data.streaming=true"
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert any("streamed (data.streaming=true)" in r.message for r in caplog.records)


def test_an_interrupted_stream_resumes_on_exactly_the_batches_and_weights_of_a_straight_run(
        tiny_bert, tmp_path, monkeypatch, seen_batches):
    _train(tiny_bert, tmp_path / "straight")
    straight = list(seen_batches)
    assert len(straight) == N and straight[:3] != straight[3:6]  # a new order each epoch
    seen_batches.clear()

    stop = interrupt_at(monkeypatch, N // 2)  # Ctrl-C during step N/2
    with pytest.raises(SystemExit):
        _train(tiny_bert, tmp_path / "first")
    state, _ = checkpoint.load(tmp_path / "first")
    assert state["step"] == N // 2 and state["stream"] == [{"epoch": 1, "batches": 1, "rows": 4}]  # mid-epoch 2
    assert seen_batches == straight[:N // 2]
    seen_batches.clear()
    stop()

    summary = logged(train_module.train, OmegaConf.create({"resume_from": str(tmp_path / "first")}),
                     tmp_path / "second")
    assert seen_batches == straight[N // 2:]  # the skipped batches were re-read, not tokenised again
    ref, got = _losses(tmp_path / "straight"), _losses(tmp_path / "second")
    assert sorted(got) == list(range(N // 2 + 1, N + 1)) and all(abs(got[s] - ref[s]) < 1e-6 for s in got)
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "second", tmp_path / "straight"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert summary["steps"] == N and summary["resumed_from"].endswith("ckpt-last.pt")
