"""Objectives: one per example kind, picked in one place; several positives per query (multi_label_softmax)."""

import ast
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

from embtune.losses.multi_label_softmax import MultiLabelSoftmax
from embtune.negatives import Hard, InBatch
from embtune.objectives import OBJECTIVES, MultiPositive, objective_for

KINDS = set(OBJECTIVES)


def _modules():
    for path in sorted((REPO / "embtune").rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text())


def _strings(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for e in node.elts for s in _strings(e)}
    return set()


def test_only_the_objectives_map_looks_up_the_example_kind():
    """No module compares a value with a kind string (``kind == "scores"``, ``kind in ("scores", ...)``)
    anywhere: the kind is only looked up in ``embtune.objectives.OBJECTIVES``; declaring one is fine."""
    where = set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and set().union(*map(_strings, [node.left, *node.comparators])) & KINDS:
                where.add(name)
    assert where == set()  # embtune.objectives.OBJECTIVES is the one place: a dict keyed by kind


def test_the_query_tower_rule_is_written_once():
    where = {name for name, tree in _modules() for node in ast.walk(tree)
             if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and {"query", "text1"} <= _strings(node)}
    assert where == {"embtune/data/formats.py"}


# --- several positives per query -------------------------------------------------------------------------


class TableModel(nn.Module):
    """A stand-in encoder: token id -> a fixed unit vector (first token only)."""

    normalize = True

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, input_ids, attention_mask, kind="document"):
        return F.normalize(self.table[input_ids[:, 0]], dim=-1)


# ids: 0 q0, 1 q1 | 2 p0, 3 p1, 4 p2 | 5 n0, 6 n1 (n2 is p0's text again). Rows: (q0, p0), (q0, p1), (q1, p2).
MODEL = TableModel([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]])


def _ids(*ids):
    return {"input_ids": torch.tensor([[i] for i in ids]), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


# text keys: the token ids (distinct texts, distinct keys); q0 and p0 share a vector, not a text
BATCH = {"query": _ids(0, 1), "positive": _ids(2, 3, 4), "positive_key": torch.tensor([2, 3, 4]),
         "query_key": torch.tensor([0, 0, 1]), "anchor_key": torch.tensor([0, 1])}
HARD = {**BATCH, "negative": _ids(5, 6, 2), "negative_mask": torch.ones(3, 1, dtype=torch.bool),
        "negative_key": torch.tensor([[5], [6], [2]])}


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_rows_of_one_query_are_one_anchor_with_all_its_positives_in_batch():
    # τ = 1. q0·(p0, p1, p2) = (1, 0.6, 0), positives p0 and p1; q1·(p0, p1, p2) = (0, 0.8, 1), positive p2
    expected = ((_lse(1, 0.6, 0) - _lse(1, 0.6)) + (_lse(0, 0.8, 1) - 1)) / 2  # 0.490702
    loss, metrics = objective_for(MultiLabelSoftmax(temperature=1.0), InBatch()).loss(MODEL, BATCH, [(2, 1.0)])
    assert loss.item() == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.490702, abs=1e-6)
    assert metrics == {"train/candidates": 3.0}
    # one-way InfoNCE over the same three rows counts q0's second positive as its negative
    info_nce = (3 * _lse(1, 0.6, 0) - 1 - 0.6 + _lse(0, 0.8, 1) - 1) / 3
    assert abs(loss.item() - info_nce) > 0.1


def test_hard_negatives_join_and_a_copy_of_an_anchors_positive_is_masked_for_that_anchor_only():
    # negatives n0·q = (-1, 0), n1·q = (0.8, 0.6); n2 is p0's text: a false negative for q0 (masked), a
    # plain negative for q1 (q1·p0 = 0)
    expected = ((_lse(1, 0.6, 0, -1, 0.8) - _lse(1, 0.6)) + (_lse(0, 0.8, 1, 0, 0.6, 0) - 1)) / 2
    loss, metrics = objective_for(MultiLabelSoftmax(temperature=1.0), Hard(group_size=2)).loss(MODEL, HARD, [(2, 1.0)])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics == {"train/candidates": (5 + 6) / 2}


def test_multi_label_softmax_is_trained_by_the_multi_positive_objective_and_refuses_online_hard():
    from embtune.negatives import OnlineHard

    assert isinstance(objective_for(MultiLabelSoftmax(), InBatch()), MultiPositive)
    with pytest.raises(ValueError, match="negatives=online_hard selects the hardest"):
        objective_for(MultiLabelSoftmax(), OnlineHard()).check(None, None)


def test_collate_encodes_each_query_once(tiny_bert):
    import random

    from embtune.data.batching import text_key
    from embtune.data.formats import Example
    from embtune.model import Mean, from_pretrained

    model = from_pretrained(tiny_bert, pooling=Mean())
    rows = [Example("q a", "doc 1"), Example("q b", "doc 2"), Example("q a", "doc 3")]
    batch = objective_for(MultiLabelSoftmax(), InBatch()).collate(model, rows, random.Random(0))
    assert batch["query"]["input_ids"].size(0) == 2 and batch["positive"]["input_ids"].size(0) == 3
    assert batch["anchor_key"].tolist() == [text_key("q a"), text_key("q b")]
    assert batch["query_key"].tolist() == [text_key("q a"), text_key("q b"), text_key("q a")]


def test_the_loop_batches_the_positives_of_a_query_together(tmp_path, tiny_bert):
    """4 queries with 2 positives each, batches of 8: one batch holds all 8 rows, 4 anchors, 8 candidates
    each (before, no two rows of one query could share a batch: 2 batches of 4 candidates)."""
    from test_train import _run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"question {i}", "positive": [f"answer {i} a", f"answer {i} b"]})
                            + "\n" for i in range(4)))
    summary = _run(tmp_path / "run", tiny_bert, ["data=jsonl", f"data.path={data}", "data.dev_queries=0", "loss=multi_label_softmax",
                                                 "eval.before=false", "eval.after=false"])
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert summary["steps"] == 2 and [e["train/epoch"] for e in events] == [1.0, 2.0]
    assert [e["train/candidates"] for e in events] == [8.0, 8.0]
