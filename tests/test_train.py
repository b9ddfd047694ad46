"""A few training steps on a tiny random model, end to end: metrics, summary, saved model."""

import json

import numpy as np
import pytest
from conftest import CONF, DATA, NOT_A_MODEL, logged
from hydra import compose, initialize_config_dir

from embtune.recipes.finetune import train

STDLIB_SMALL = ["data.max_train_pairs=24", "data.max_test_queries=12"]
SMALL = ["train.batch_size=8", "train.max_steps=2",
         "train.log_every=1", "eval.batch_size=16"]


def _run(tmp_path, tiny_bert, overrides):
    data = [] if any(o.startswith("data=") for o in overrides) else STDLIB_SMALL
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model.name_or_path={tiny_bert}", *SMALL, *data, *overrides])
    return logged(train, cfg, tmp_path)


def test_few_steps_write_metrics_summary_and_model(tmp_path, tiny_bert):
    from embtune.training.precision import native_bf16

    summary = _run(tmp_path, tiny_bert, ["train.bf16=false"])  # evaluation keeps eval.bf16=auto
    assert summary["precision"] == "fp32"
    assert summary["eval_precision"] == ("bf16-autocast" if native_bf16("cpu") else "fp32")
    assert summary["steps"] == 2
    assert set(summary["base"]) == set(summary["final"]) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    assert summary["temperature"] == pytest.approx(0.05) and summary["margin"] is None
    assert summary["data"]["train_rows"] == 24 and len(summary["data"]["fingerprint"]) == 64
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train_events] == [1, 2]
    assert {"train/lr", "train/temperature", "train/margin"} <= set(train_events[0])
    assert sum("eval/ndcg@10" in e for e in events) == 2  # base and final
    meta = json.loads((tmp_path / "model" / "embtune.json").read_text())
    assert meta["pooling"] == "Mean" and meta["config"]["loss"]["temperature"] == 0.05


def test_training_changes_the_weights_and_lowers_the_loss(tmp_path, tiny_bert):
    summary = _run(tmp_path, tiny_bert, ["train.max_steps=8", "train.lr=1e-3", "eval.before=false"])
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert summary["steps"] == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_matryoshka_reports_every_dimension(tmp_path, tiny_bert):
    summary = _run(tmp_path, tiny_bert, ["matryoshka=on", "matryoshka.dims=[32,16,8]", "matryoshka.weights=[1,1,1]"])
    assert {"ndcg@10", "dim16/ndcg@10", "dim8/ndcg@10"} <= set(summary["final"])
    assert json.loads((tmp_path / "model" / "embtune.json").read_text())["matryoshka_dims"] == [32, 16, 8]


def test_matryoshka_dim_larger_than_the_model_is_a_clear_error(tmp_path, tiny_bert):
    with pytest.raises(ValueError, match=r"matryoshka.dims \[64\] outside 1..32"):
        _run(tmp_path, tiny_bert, ["matryoshka=on", "matryoshka.dims=[64,16]", "matryoshka.weights=[1,1]"])


def test_hard_negatives_from_a_triplet_file(tmp_path, tiny_bert):
    toy = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
    summary = _run(tmp_path, tiny_bert, ["data=jsonl", f"data.path={toy}", "data.dev_queries=0", "data_format=triplet",
                                         "data_format.positive=pos", "data_format.negative=neg", "negatives=hard"])
    assert summary["steps"] == 2 and summary["base"] == {} and summary["examples"] == 10


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token", "weighted_mean", "max"])
def test_saved_model_loads_in_sentence_transformers_with_the_same_embeddings(tmp_path, tiny_bert, pooling):
    from sentence_transformers import SentenceTransformer

    import embtune

    _run(tmp_path, tiny_bert, [f"pooling={pooling}", "eval.before=false", "eval.after=false"])
    texts = ["def add(a, b): return a + b", "Return the sum of two numbers.", "ünïcode ✓ text"]
    ours = embtune.load(str(tmp_path / "model")).encode(texts)
    theirs = SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(texts)
    assert ours.dtype == np.float32 and ours.shape == (3, 32)
    assert np.abs(ours - theirs).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_saving_never_overwrites(tmp_path, tiny_bert):
    _run(tmp_path, tiny_bert, ["eval.before=false", "eval.after=false"])
    import embtune
    from embtune.model import save

    with pytest.raises(FileExistsError):
        save(embtune.load(str(tmp_path / "model")), tmp_path / "model")


STSB = DATA / "stsb" / "train.tsv"
TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
SCORED = ["data=jsonl", f"data.path={STSB}", "data.max_train_pairs=32", "data_format=scored_pairs"]


@pytest.mark.parametrize("overrides", [
    ["loss=binary"], ["loss=hinge"], ["loss=logistic"], ["loss=triplet"], ["loss=multi_label_softmax"],
    ["loss=simcse", "data_format.positive=query"],                     # unsupervised: same text twice
    ["loss=arcface"],                                                   # pairs as classes
    ["loss=arcface", "data_format=pointwise", "train.layerwise_lr_decay=0.8"],
    [*SCORED, "loss=cosent"], [*SCORED, "data_format.score_scale=5", "loss=pointwise_bce"],
    ["data=jsonl", f"data.path={TOY}", "data_format=multi_negative", "negatives=hard", "negatives.group_size=4"],
    ["data=jsonl", f"data.path={TOY}", "data_format=multi_negative", "negatives=hard", "negatives.group_size=4",
     "loss=hinge"],
], ids=lambda o: " ".join(x for x in o if not x.startswith("data.path")))
def test_every_loss_trains_a_few_steps(tmp_path, tiny_bert, overrides):
    summary = _run(tmp_path, tiny_bert, [*overrides, "eval.before=false"])
    assert summary["steps"] == 2
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert all(np.isfinite(losses))


def test_listwise_trains_on_graded_lists(tmp_path, tiny_bert):
    rows = [{"query": f"query {i}", "documents": [f"doc {i} a", f"doc {i} b", f"doc {i} c"][: 2 + i % 2],
             "scores": [3, 1, 0][: 2 + i % 2]} for i in range(16)]  # lists of 2 and 3: padding and masks
    path = tmp_path / "lists.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    summary = _run(tmp_path / "run", tiny_bert, ["data=jsonl", f"data.path={path}", "data_format=listwise",
                                                 "loss=listwise"])
    assert summary["steps"] == 2


@pytest.mark.parametrize("overrides,match", [
    (["train.batch_size=1"], r"train.batch_size=1 with negatives=in_batch"),
    (["train.batch_size=0"], r"^train.batch_size must be an integer >= 1 \(examples per step and process\), got 0$"),
    (["train.max_steps=0"], r"train.max_steps must be >= 1"),
    (["eval.k=10"], r"eval.k=10"),
    (["matryoshka=on", "matryoshka.weights=[1]"], r"matryoshka.dims .* same length"),
    (["data=beir", "data.path=./no/such/beir"], r"./no/such/beir: no such BEIR folder"),
    (["loss=cosent"], r"loss=cosent takes pair_scores examples, but data_format=pairwise"),
    (["loss=listwise", "data_format=triplet"], r"loss=listwise .* data_format=triplet"),
    ([*SCORED, "loss=info_nce"], r"loss=info_nce takes scores examples, but data_format=scored_pairs"),
    (["loss.symmetric=maybe"], r"loss.symmetric must be true or false, got 'maybe'"),
    (["negatives.cross_device=1"], r"negatives.cross_device must be true or false, got 1"),
    (["loss=arcface", "matryoshka=on"], r"matryoshka.dims with loss=arcface: its class centres are full-size"),
    (["train.min_batch_size=9"], r"train.min_batch_size must be in 1..train.batch_size \(8\) or null, got 9"),
    (["train.lr=-1"], r"^train.lr must be a number > 0 \(the peak learning rate\), got -1"),
    (["train.lr=0"], r"^train.lr must be a number > 0"),
    (["train.weight_decay=-0.1"], r"^train.weight_decay must be a number >= 0, got -0.1"),
    (["train.warmup_ratio=1.5"], r"^train.warmup_ratio must be in \[0, 1\]"),
    (["train.max_grad_norm=0"], r"^train.max_grad_norm must be a number > 0"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _run(tmp_path, NOT_A_MODEL, overrides)


def test_sts_evaluation_reports_spearman(tmp_path, tiny_bert):
    summary = _run(tmp_path, tiny_bert, [*SCORED, "loss=cosent", "eval=sts", f"eval.path={DATA / 'stsb' / 'dev.tsv'}"])
    assert -1 <= summary["base"]["spearman"] <= 1 and -1 <= summary["final"]["spearman"] <= 1


def test_lr_schedule_warms_up_then_decays_to_zero():
    from embtune.training.optim import lr_at

    # total 10, warm-up 2: 0, 0.5, then (10-s)/8 from step 2
    assert [lr_at(s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_logged_lr_is_the_configured_one_and_a_learnable_temperature_stays_in_its_bounds(tmp_path, tiny_bert):
    """Three steps with layer-wise decay 0.5 (the embeddings' group at lr/4) and a learnable τ whose bounds
    are 0.05 ± 0.00001, which AdamW's first real step (about lr = 1e-3 on log(1/τ)) overshoots."""
    import math

    from embtune.training import checkpoint

    _run(tmp_path, tiny_bert, ["train.max_steps=3", "train.lr=1e-3", "train.layerwise_lr_decay=0.5",
                               "loss.learnable=true", "loss.min_temperature=0.04999", "loss.max_temperature=0.05001",
                               "eval.before=false", "eval.after=false", "train.keep_checkpoint=true"])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/lr" in x]
    # train.lr · lr_at(step): 3 steps, warm-up ceil(0.1·3) = 1 step: 0, then (3 − s) / 2 for s = 1, 2
    assert [e["train/lr"] for e in events] == pytest.approx([0.0, 1e-3, 0.5e-3], rel=1e-12)
    # CLIP's rule: the parameter itself is clamped after each step, so it ends on a bound, not beyond it
    theta = checkpoint.load(tmp_path)[0]["loss"]["log_inv_temperature"].item()
    bounds = math.log(1 / 0.05001), math.log(1 / 0.04999)
    assert min(abs(theta - b) for b in bounds) < 1e-6, (theta, bounds)  # unmoved it would be 2e-4 from both
    assert all(0.04999 - 1e-7 <= e["train/temperature"] <= 0.05001 + 1e-7 for e in events)


def test_base_metrics_are_computed_once_and_reused(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    import embtune.eval.evaluators as evaluators

    real = evaluators.Retrieval.__call__

    def counting(self, model, data, dims):
        calls.append(model.training)
        return real(self, model, data, dims)

    monkeypatch.setattr(evaluators.Retrieval, "__call__", counting)
    first = _run(tmp_path / "a", tiny_bert, [])
    second = _run(tmp_path / "b", tiny_bert, [])
    assert len(calls) == 3  # base once, final twice
    assert first["base"] == second["base"] and len(list((tmp_path / "cache" / "base_eval").glob("*.json"))) == 1
    _run(tmp_path / "c", tiny_bert, ["eval.cache_base=false"])
    assert len(calls) == 5


def test_a_mistyped_local_model_path_is_named():
    from embtune.model import resolve_model_path

    with pytest.raises(FileNotFoundError, match=r"model './no/such/model': no such folder"):
        resolve_model_path("./no/such/model")


def test_a_missing_model_folder_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    import embtune.data

    def unread(*args, **kwargs):
        raise AssertionError("the data was read before the model folder was checked")

    monkeypatch.setattr(embtune.data, "load_stdlib", unread)  # data=stdlib's _target_
    with pytest.raises(FileNotFoundError, match=r"^model.name_or_path='/no/such/folder': no such folder"):
        _run(tmp_path, "/no/such/folder", [])


@pytest.mark.parametrize("device, match", [
    ("tpu", r"^train.device='tpu': not a device \(auto, cpu, cuda, cuda:N, \.\.\.\)$"),
    pytest.param("cuda", r"^train.device=cuda: this torch has no CUDA device", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_a_device_this_machine_lacks_is_refused_before_the_data_is_read(tmp_path, tiny_bert, monkeypatch, device,
                                                                       match):
    import embtune.data

    def unread(*args, **kwargs):
        raise AssertionError("the data was read before the device was checked")

    monkeypatch.setattr(embtune.data, "load_stdlib", unread)
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, tiny_bert, [f"train.device={device}"])


def test_a_folder_that_holds_no_model_is_named_as_such(tmp_path):
    from embtune.model import from_pretrained

    (tmp_path / "empty").mkdir()
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"a folder without config.json, adapter_config.json, modules.json: "
                                                r"not a model folder$"):
        from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"not a model folder \(an embtune run folder's model is its model/"):
        from_pretrained(str(tmp_path / "run"))


def test_one_string_encodes_to_one_vector(tiny_bert):
    from embtune.model import from_pretrained

    model = from_pretrained(tiny_bert)
    one, listed = model.encode("hello world", kind="query"), model.encode(["hello world"], kind="query")
    assert one.shape == (model.dim,)
    np.testing.assert_array_equal(one, listed[0])


def test_duplicate_heavy_data_trains_on_no_batch_below_the_floor(tmp_path, tiny_bert):
    """8 of 12 rows share a positive (tests/test_sampler.py: at seed 0 the plan was [4, 2, 1, 1, 1, 1, 1, 1],
    six steps with an in-batch loss of exactly 0). Batches of 4 have a floor of 2: 4 batches of 2 pairs,
    and the 4 rows that fit in no such batch are counted in summary.json."""
    path = tmp_path / "shared.jsonl"
    rows = [{"query": f"q{i}", "positive": "P"} for i in range(8)] + [{"query": f"q{i}", "positive": f"p{i}"}
                                                                      for i in range(8, 12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _run(tmp_path / "run", tiny_bert, ["data=jsonl", f"data.path={path}", "data.dev_queries=0", "train.batch_size=4",
                                                 "train.max_steps=null", "train.epochs=1", "train.seed=0",
                                                 "eval.before=false", "eval.after=false"])
    assert summary["steps"] == 4 and summary["unbatched_rows"] == 4
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert [e["train/candidates"] for e in events] == [2.0] * 4 and all(e["train/loss"] > 0 for e in events)


def test_data_that_makes_no_batch_above_the_floor_is_a_clear_error(tmp_path, tiny_bert):
    path = tmp_path / "one_positive.jsonl"  # every row has the same positive: no two rows fit in one batch
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": "P"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match=r"no batch of at least 4 examples \(train.min_batch_size\) .* 5 examples"):
        # a model that does not exist: the data is refused before any model loads
        _run(tmp_path / "run", NOT_A_MODEL, ["data=jsonl", f"data.path={path}", "data.dev_queries=0"])


def test_data_smaller_than_half_a_batch_is_one_batch_of_all_of_it(tmp_path, tiny_bert):
    path = tmp_path / "three.jsonl"  # 3 examples, batch 8: the default floor (4) would leave nothing to train on
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(3)))
    summary = _run(tmp_path / "run", tiny_bert, ["data=jsonl", f"data.path={path}", "data.dev_queries=0",
                                                 "eval.before=false", "train.max_steps=null", "train.epochs=2"])
    assert summary["steps"] == 2 and summary["unbatched_rows"] == 0  # one batch of all three rows per epoch
    with pytest.raises(ValueError, match=r"no batch of at least 4 examples"):  # an explicit floor stays strict
        _run(tmp_path / "run2", NOT_A_MODEL, ["data=jsonl", f"data.path={path}", "data.dev_queries=0",
                                                       "train.min_batch_size=4"])
