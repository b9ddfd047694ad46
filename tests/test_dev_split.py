"""The dev split held out of training rows when the data brings no test set (embtune.data.dev_split):
hand-checked splits, determinism, no query or positive text on both sides, the sizes, the options'
errors, and a run that reports base and final metrics on it."""

import hashlib
import json
import random

import pytest
from conftest import CONF, DATA, logged

from embtune.data import fingerprint
from embtune.data.dataset import DevSplit
from embtune.data.dev_split import hold_out_dev, split_dev
from embtune.data.files import load_jsonl
from embtune.data.formats import MultiNegative, Pairwise, Triplet

COLUMNS = {"query": "query", "positive": "pos", "negatives": "neg"}
TOY = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"


def _first_by_hash(queries, n, seed=0):
    """The spec, written out: the n queries with the smallest sha256 hex digest of "seed:query"."""
    digests = {q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest() for q in queries}
    return set(sorted(queries, key=digests.get)[:n])


def _rows():
    return [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}", "shared negative"]} for i in range(6)]


def test_a_hand_checked_split_by_query():
    rows = _rows()
    held = _first_by_hash([f"q{i}" for i in range(6)], 2)
    keep, dev, dropped = split_dev(rows, COLUMNS, 2)
    assert keep == [i for i in range(6) if f"q{i}" not in held] and dropped == 0
    assert set(dev.queries.values()) == held
    # corpus: 6 positives + 6 own negatives + 1 shared negative, each once, every one a candidate
    assert sorted(dev.corpus.values()) == sorted([f"p{i}" for i in range(6)] + [f"n{i}" for i in range(6)]
                                                 + ["shared negative"])
    for qid, q in dev.queries.items():  # each dev query's only relevant document is its own positive
        (doc, grade), = dev.qrels[qid].items()
        assert dev.corpus[doc] == "p" + q[1:] and grade == 1


def test_every_row_of_a_held_query_goes_to_dev_and_the_split_ignores_row_order():
    rows = _rows() + [{"query": "q0", "pos": "p0 again", "neg": []}, {"query": "q3", "pos": ["p3 bis"], "neg": "x"}]
    held = _first_by_hash([f"q{i}" for i in range(6)], 3, seed=7)
    keep, dev, _ = split_dev(rows, COLUMNS, 3, seed=7)
    assert {rows[i]["query"] for i in keep}.isdisjoint(held)
    assert all(rows[i]["query"] in held for i in set(range(len(rows))) - set(keep))
    if "q0" in held:  # both of q0's positives are relevant
        qid = next(k for k, v in dev.queries.items() if v == "q0")
        assert sorted(dev.corpus[d] for d in dev.qrels[qid]) == ["p0", "p0 again"]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    _, dev2, _ = split_dev(shuffled, COLUMNS, 3, seed=7)
    assert set(dev2.queries.values()) == held
    _, dev3, _ = split_dev(rows, COLUMNS, 3, seed=8)  # another seed, (here) another split
    assert set(dev3.queries.values()) == _first_by_hash([f"q{i}" for i in range(6)], 3, seed=8)


def test_no_query_and_no_positive_text_on_both_sides():
    rows = _rows()
    (h,) = _first_by_hash([f"q{i}" for i in range(6)], 1)
    k = h[1:]
    leaks = [{"query": "other 1", "pos": [f"p{k}"], "neg": []},        # a dev positive as a training positive
             {"query": "other 2", "pos": [h], "neg": []},               # a dev query as a training positive
             {"query": f"p{k}", "pos": ["fresh"], "neg": []},           # a dev positive as a training query
             {"query": "other 3", "pos": ["fresh 3"], "neg": [f"p{k}"]}]  # as a negative: allowed, kept
    keep, dev, dropped = split_dev(rows + leaks, COLUMNS, 1)
    assert set(dev.queries.values()) == {h} and dropped == 3
    assert keep == [i for i in range(6) if f"q{i}" != h] + [9]
    train_texts = {t for i in keep for t in [(rows + leaks)[i]["query"], *(rows + leaks)[i]["pos"]]}
    assert train_texts.isdisjoint({h, f"p{k}"})


def test_a_bad_row_stays_in_training_to_be_reported_with_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(12))
                    + json.dumps({"query": "q0"}) + "\n")
    data = load_jsonl(str(path))
    split = hold_out_dev(data, Pairwise())
    assert split.source[-1] == (str(path), 13) and split.rows[-1] == {"query": "q0"}
    with pytest.raises(ValueError, match=r"train.jsonl:13: missing field 'positive'"):
        Pairwise()(split.rows, split.source)


@pytest.mark.parametrize("queries,ratio,n_queries,expected", [
    (None, 0.1, 10, 5),         # at least 5 ...
    (None, 0.1, 8, 4),          # ... but at most half
    (None, 0.1, 1, 0),          # too few to split
    (None, 0.1, 200, 20),       # 10 %
    (None, 0.1, 20000, 1000),   # at most 1000
    (None, 0.25, 100, 25),
    (7, 0.1, 8, 7), (0, 0.1, 100, 0), (None, 0.0, 100, 0),
])
def test_dev_sizes(queries, ratio, n_queries, expected):
    assert DevSplit(queries, ratio).size(n_queries) == expected


@pytest.mark.parametrize("kwargs,match", [
    ({"dev_queries": 3, "test_path": "somewhere"}, r"data.dev_queries=3 with data.test_path=somewhere"),
    ({"dev_queries": -1}, r"data.dev_queries=-1"), ({"dev_ratio": 1.5}, r"data.dev_ratio=1.5"),
])
def test_bad_dev_options_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_jsonl(str(TOY), **kwargs)


def test_explicit_dev_queries_must_leave_training_queries():
    with pytest.raises(ValueError, match=r"data.dev_queries=10: the data has only 10 distinct queries"):
        hold_out_dev(load_jsonl(str(TOY), dev_queries=10), MultiNegative())


def test_hold_out_keeps_file_lines_and_fingerprints_the_split():
    data = load_jsonl(str(TOY), dev_queries=3)
    split = hold_out_dev(data, Triplet(positive="pos", negative="neg"))
    lines = json.loads("[" + ",".join(TOY.read_text().splitlines()) + "]")
    held = _first_by_hash([r["query"] for r in lines], 3)
    assert [s[1] for s in split.source] == [i for i, r in enumerate(lines, 1) if r["query"] not in held]
    assert split.rows == [r for r in lines if r["query"] not in held]
    assert split.fingerprint == fingerprint(split.rows, split.test) != data.fingerprint
    assert split.summary()["dev_split"]["dev_queries"] == 3 and len(split.test.corpus) == 80
    assert hold_out_dev(load_jsonl(str(TOY), dev_queries=0), MultiNegative()).test is None


def test_a_run_without_a_test_set_reports_base_and_final_on_its_dev_split(tmp_path, tiny_bert, caplog, monkeypatch):
    from hydra import compose, initialize_config_dir

    from embtune.recipes.finetune import train

    def run(folder, *extra):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"model.name_or_path={tiny_bert}", "data=jsonl", f"data.path={TOY}", "data_format=multi_negative",
                "train.max_steps=1", "train.batch_size=4", "eval.cache_base=false", *extra])
        return logged(train, cfg, folder)

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))  # cold: nothing split or tokenised before
    with caplog.at_level("INFO", logger="embtune"):
        summary = run(tmp_path / "dev")
    assert caplog.text.count("data_format=multi_negative columns: query <- query") == 1  # split, then examples: once
    assert set(summary["base"]) == set(summary["final"]) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    assert summary["data"]["dev_split"]["dev_queries"] == 5 and summary["examples"] == 5
    assert "evaluating on: a dev split of" in caplog.text
    assert "(data.dev_queries=0 holds none out and trains on every row)" in caplog.text  # how, not a status
    caplog.clear()
    with caplog.at_level("INFO", logger="embtune"):
        off = run(tmp_path / "off", "data.dev_queries=0")
    assert "no test set and no dev split (data.dev_queries=0; set it > 0 to hold queries out)" in caplog.text
    assert off["base"] == {} and off["final"] == {} and off["examples"] == 10
