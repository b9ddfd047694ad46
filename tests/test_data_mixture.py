"""data=mixture: SciFact (BEIR) and the FlagEmbedding toy file in one run, every batch from one source, each
source evaluated, the source choice rules, resume, per-source in_batch, and bad configs refused before any
model loads."""

import json

import pytest
import torch
from conftest import CONF, DATA, NOT_A_MODEL, interrupt_at, logged
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import embtune.recipes.finetune as train_module
from embtune.data.mixture import MixtureBatchSampler, apportion
from embtune.data.sampler import NoDuplicatesBatchSampler, ShuffledBatchSampler
from embtune.objectives import Contrastive
from embtune.recipes.mixture import own_candidates_only
from embtune.training import checkpoint

SCIFACT = DATA / "scifact"
TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
pytestmark = pytest.mark.skipif(not SCIFACT.is_dir(), reason="../shared/data absent")


def _sources():
    return [{"name": "scifact", "_target_": "embtune.data.load_beir", "path": str(SCIFACT), "max_train_pairs": 16,
             "max_test_queries": 5},
            {"name": "toy", "_target_": "embtune.data.load_jsonl", "path": str(TOY), "dev_queries": 3,
             "data_format": {"_target_": "embtune.data.MultiNegative", "positive": "pos", "negatives": "neg"}}]


def _cfg(tiny_bert, sources, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model.name_or_path={tiny_bert}", "data=mixture", "data.sources=[]", "train.batch_size=4",
            "train.max_steps=6", "train.log_every=1", "train.lr=1e-3", "model.document_max_length=32",
            "eval.before=false", "eval.after=false", *overrides])
    cfg.data.sources = sources
    return cfg


def _train(cfg, run_dir):
    return logged(train_module.train, cfg, run_dir)


def _events(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _queries_of_each_source() -> dict[str, set]:
    """Each source's query texts, read from the files themselves."""
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (SCIFACT / "queries.jsonl").open()}
    train_ids = {line.split("\t")[0] for line in (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]}
    toy = {json.loads(x)["query"] for x in TOY.open()}
    return {"scifact": {queries[q] for q in train_ids}, "toy": toy}


@pytest.fixture
def batches(monkeypatch):
    """The query texts of every batch collated, in order."""
    seen, real = [], Contrastive.collate

    def collate(self, model, examples, rng):
        seen.append([e.query for e in examples])
        return real(self, model, examples, rng)

    monkeypatch.setattr(Contrastive, "collate", collate)
    return seen


def _source_of(batch, queries) -> str:
    owners = {name for name, texts in queries.items() for q in batch if q in texts}
    assert len(owners) == 1 and all(any(q in queries[n] for n in owners) for q in batch), batch
    return owners.pop()


def test_every_batch_is_from_one_source_and_each_source_is_evaluated(tiny_bert, tmp_path, batches):
    summary = _train(_cfg(tiny_bert, _sources(), ["eval.after=true"]), tmp_path / "run")
    queries = _queries_of_each_source()
    assert not queries["scifact"] & queries["toy"]
    sources = [_source_of(b, queries) for b in batches]
    assert len(sources) == 6 and set(sources) == {"scifact", "toy"}  # both sources were drawn from
    # each source's test set / dev split evaluated, its metrics prefixed; the plain name is their mean
    final = summary["final"]
    for key in ("ndcg@10", "mrr@10", "recall@10"):
        assert final[key] == pytest.approx((final[f"scifact/{key}"] + final[f"toy/{key}"]) / 2)
    assert summary["data"]["sources"]["toy"]["dev_split"]["dev_queries"] == 3
    assert summary["data"]["sources"]["scifact"]["test_queries"] == 5
    # train/loss/<source> at each step: the step's loss, under the key of the batch's source
    steps = {e["step"]: e for e in _events(tmp_path / "run") if "train/loss" in e}
    for step, source in enumerate(sources, start=1):
        assert steps[step][f"train/loss/{source}"] == steps[step]["train/loss"]
        assert not any(k.startswith("train/loss/") and k != f"train/loss/{source}" for k in steps[step])


def test_weighted_and_round_robin_follow_their_rules():
    def planner(n):  # plain shuffled batches of 4 over n rows
        return ShuffledBatchSampler(n, 4, seed=0)

    offsets = [0, 12]  # source 0: 12 rows (3 batches), source 1: 40 rows (10 batches)

    def plan(choice, weights=None, epoch=0):
        s = MixtureBatchSampler([planner(12), planner(40)], offsets, choice, weights, seed=0)
        s.set_epoch(epoch)
        return [[0 if i < 12 else 1 for i in b] for b in s]

    for choice, weights in (("proportional", None), ("round_robin", None), ("weighted", [3.0, 1.0])):
        for b in plan(choice, weights):
            assert len(set(b)) == 1  # one source per batch
    sources = [b[0] for b in plan("proportional")]
    assert sources.count(0) == 3 and sources.count(1) == 10  # every batch once
    assert [b[0] for b in plan("round_robin")] == [0, 1] * 3  # in turn, until the smallest runs out
    # weighted 3:1 over N = 13 batches: 9.75 and 3.25 -> 9 and 3, the larger remainder (0.75) gets the 13th
    sources = [b[0] for b in plan("weighted", [3.0, 1.0])]
    assert sources.count(0) == 10 and sources.count(1) == 3
    assert apportion(13, [3.0, 1.0]) == [10, 3] and apportion(10, [1, 1, 1]) == [4, 3, 3]
    # source 0 (3 batches) oversampled to 10: its rows through fresh plans, each pass a permutation of them
    s = MixtureBatchSampler([planner(12), planner(40)], offsets, "weighted", [3.0, 1.0], seed=0)
    rows0 = [b for b in s if b[0] < 12]
    for p in range(3):
        assert sorted(i for b in rows0[3 * p:3 * p + 3] for i in b) == list(range(12))
    # the plan is a function of (seed, epoch) alone: planning other epochs first changes nothing
    fresh = MixtureBatchSampler([planner(12), planner(40)], offsets, "weighted", [3.0, 1.0], seed=0)
    fresh.set_epoch(2)
    fresh.set_epoch(1)
    again = MixtureBatchSampler([planner(12), planner(40)], offsets, "weighted", [3.0, 1.0], seed=0)
    again.set_epoch(1)
    assert list(fresh) == list(again) and list(fresh) != list(s)


def test_no_duplicates_holds_within_each_source():
    texts = {i: (f"q{i % 6}", f"d{i}") for i in range(24)}  # source 0: queries repeat every 6 rows
    inner = [NoDuplicatesBatchSampler(lambda i: texts[i], 24, 4, seed=0), ShuffledBatchSampler(8, 4, seed=0)]
    for b in MixtureBatchSampler(inner, [0, 24], "proportional"):
        if b[0] < 24:
            qs = [texts[i][0] for i in b]
            assert len(set(qs)) == len(qs)


def test_interrupted_mixture_resumes_to_the_straight_result(tiny_bert, tmp_path, monkeypatch, batches):
    settings = ["data.choice=round_robin", "train.checkpoint_every=2"]
    _train(_cfg(tiny_bert, _sources(), settings), tmp_path / "straight")
    queries = _queries_of_each_source()
    assert [_source_of(b, queries) for b in batches] == ["scifact", "toy"] * 3  # round robin, from the start
    stop = interrupt_at(monkeypatch, 3)  # Ctrl-C during step 3
    with pytest.raises(SystemExit):
        _train(_cfg(tiny_bert, _sources(), settings), tmp_path / "first")
    assert checkpoint.load(tmp_path / "first")[0]["step"] == 3
    stop()
    resumed = _cfg(tiny_bert, _sources(), [f"resume_from={tmp_path / 'first'}"])
    _train(resumed, tmp_path / "second")
    straight = {e["step"]: e for e in _events(tmp_path / "straight") if "train/loss" in e}
    second = {e["step"]: e for e in _events(tmp_path / "second") if "train/loss" in e}
    assert sorted(second) == [4, 5, 6]
    for step, e in second.items():
        losses = {k: v for k, v in e.items() if k.startswith("train/loss")}
        assert losses.keys() == {k for k in straight[step] if k.startswith("train/loss")}
        assert all(abs(v - straight[step][k]) < 1e-6 for k, v in losses.items())
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "second", tmp_path / "straight"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_in_batch_off_leaves_each_anchor_its_own_candidates():
    # B = 2 anchors, K = 2 hard negatives: columns p0 p1 | n0a n0b n1a n1b
    batch = {"false_negative": torch.tensor([[False, True, False, False, False, False],
                                             [False, False, False, False, False, False]])}
    own_candidates_only(batch)
    expected = torch.tensor([[False, True, False, False, True, True],
                             [True, False, True, True, False, False]])
    assert torch.equal(batch["false_negative"], expected)
    batch = {"false_negative": torch.zeros(3, 3, dtype=torch.bool)}  # in-batch only: the diagonal is own
    own_candidates_only(batch)
    assert torch.equal(batch["false_negative"], ~torch.eye(3, dtype=torch.bool))


def test_in_batch_off_trains_on_hard_negatives(tiny_bert, tmp_path):
    scifact, toy = _sources()
    scifact.update(random_negatives=2, data_format={"_target_": "embtune.data.Triplet"})
    toy["in_batch"] = False
    _train(_cfg(tiny_bert, [scifact, toy], ["negatives=hard", "train.max_steps=4"]), tmp_path / "run")
    steps = [e for e in _events(tmp_path / "run") if "train/loss" in e]
    assert {"train/loss/toy", "train/loss/scifact"} <= {k for e in steps for k in e}
    for e in steps:  # group_size 2: one hard negative per anchor; every toy row has one
        if "train/loss/toy" in e:  # its own positive and negative only
            assert e["train/candidates"] == 2
        else:  # the batch's 4 positives and 4 negatives, less any copy of an anchor's positive
            assert e["train/candidates"] > 2


@pytest.mark.parametrize("sources,overrides,message", [
    ([], [], "data.sources is empty"),
    (None, ["data.choice=random"], "data.choice='random'"),
    ("weight=0", ["data.choice=weighted"], r"data.sources\[0\] \(scifact\): weight=0"),
    ("weight=-1", ["data.choice=weighted"], r"data.sources\[0\] \(scifact\): weight=-1"),
    ("weight=2", [], r"data.sources\[0\] \(scifact\): weight=2.* only read with data.choice=weighted"),
    ("missing", [], r"data.sources\[1\] \(toy\) failed to load: .*no_such.jsonl"),
    ("same name", [], r"data.sources\[1\]: name='scifact' must be unique"),
    ("in_batch", [], r"data.sources\[1\] \(toy\): in_batch=false .* needs negatives=hard"),
    ("no path", [], r"data.sources\[1\] \(toy\): path is missing: embtune.data.load_jsonl needs it"),
    ("bogus", [], r"data.sources\[0\] \(scifact\): bogus: not an option of embtune.data.load_beir \(it takes path, "),
    ("max_train_pairs", [], r"data.sources\[0\] \(scifact\) failed to load: data.max_train_pairs=-3: must be an "),
    (None, ["negatives=hard"], r"^data.sources\[0\] \(scifact\): negatives=hard needs negatives in each example, "
                               "but data_format=pairwise has none"),
])
def test_bad_mixtures_are_refused_before_any_model_loads(sources, overrides, message, tmp_path):
    if sources is None or isinstance(sources, str):
        what, sources = sources, _sources()
        if what and what.startswith("weight="):
            sources[0]["weight"] = float(what.split("=")[1])
        elif what == "missing":
            sources[1]["path"] = str(tmp_path / "no_such.jsonl")
        elif what == "same name":
            sources[1]["name"] = "scifact"
        elif what == "in_batch":
            sources[1]["in_batch"] = False
        elif what == "no path":
            del sources[1]["path"]
        elif what in ("bogus", "max_train_pairs"):
            sources[0][what] = -3
    cfg = _cfg(NOT_A_MODEL, sources, overrides)  # loading the model would fail otherwise
    OmegaConf.resolve(cfg)
    with pytest.raises(ValueError, match=message):
        _train(cfg, tmp_path / "run")
