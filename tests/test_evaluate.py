"""Evaluation: exact blocked search, trec_eval metrics and Spearman against hand-computed values."""

import math

import pytest
import torch

from embtune.data import RetrievalSet
from embtune.eval.metrics import evaluate_retrieval, retrieval_metrics, search, sts_spearman

KEYS = {"ndcg@10", "mrr@10", "recall@10", "recall@100"}


def approx(expected: dict[str, float]):
    return pytest.approx(expected, abs=1e-6)


# --- search -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [5, 20])  # 20 > block_size: the merge must keep more than one block's worth
def test_search_blocked_equals_full_topk(k):
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(37, 16, generator=g), torch.randn(53, 16, generator=g)
    scores, indices = search(q, d, k=k, block_size=8)  # 8 < Q and < N, neither divides evenly
    ref_scores, ref_indices = (q @ d.T).topk(k, dim=1)
    assert scores.shape == indices.shape == (37, k) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)


def test_search_k_larger_than_corpus_returns_every_doc_sorted():
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g)
    scores, indices = search(q, d, k=100, block_size=3)
    assert scores.shape == (5, 7) and not scores.requires_grad  # k' = min(100, 7)
    assert torch.equal(indices.sort(dim=1).values, torch.arange(7).expand(5, 7))
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_search_rejects_bad_inputs():
    with pytest.raises(ValueError, match="embeddings"):
        search(torch.zeros(2, 3), torch.zeros(4, 5), k=1)
    with pytest.raises(ValueError, match="k and block_size"):
        search(torch.zeros(2, 3), torch.zeros(4, 3), k=0)


# --- retrieval_metrics --------------------------------------------------------------------------------

def test_retrieval_metrics_hand_computed():
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0},  # graded; c is judged non-relevant
        "q2": {"e": 1, "f": 1},          # f is never retrieved
        "q3": {"z": 1},                  # z at rank 11
        "q4": {"a": 0},                  # no relevant doc: excluded from every mean
    }
    run = {
        "q1": {"x": 0.9, "a": 0.8, "c": 0.7, "b": 0.6},  # ranks: x 1, a 2, c 3, b 4
        "q2": {"g": 0.9, "h": 0.8, "e": 0.7},            # e at rank 3
        "q3": {**{f"n{i}": 0.99 - i / 100 for i in range(10)}, "z": 0.5, "n10": 0.4},
        "q4": {"a": 1.0},
        "q9": {"a": 1.0},  # not in qrels: ignored
    }
    # nDCG@10, gain = grade, discount 1/log2(rank + 1):
    #   q1: DCG = 2/log2(3) + 1/log2(5) = 1.261860 + 0.430677 = 1.692536
    #       IDCG = 2/log2(2) + 1/log2(3) = 2 + 0.630930 = 2.630930  -> 0.643322
    #   q2: DCG = 1/log2(4) = 0.5; IDCG = 1 + 1/log2(3) = 1.630930  -> 0.306574
    #   q3: z is below rank 10                                      -> 0
    ndcg1 = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    ndcg2 = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    # MRR@10: q1 first relevant at rank 2 -> 1/2; q2 rank 3 -> 1/3; q3 rank 11 -> 0
    # Recall@10: q1 2/2, q2 1/2, q3 0/1; Recall@100: 2/2, 1/2, 1/1. Means over 3 queries (q4 excluded):
    assert retrieval_metrics(run, qrels) == approx({
        "ndcg@10": (ndcg1 + ndcg2 + 0) / 3,       # (0.643322 + 0.306574) / 3 = 0.316632
        "mrr@10": (1 / 2 + 1 / 3 + 0) / 3,        # 5/18 = 0.277778
        "recall@10": (1 + 0.5 + 0) / 3,           # 0.5
        "recall@100": (1 + 0.5 + 1) / 3,          # 0.833333
    })
    assert abs(ndcg1 - 0.643322) < 1e-6 and abs(ndcg2 - 0.306574) < 1e-6


def test_retrieval_metrics_query_missing_from_run_counts_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0, "c": 0.5}}  # q2 never ranked: 0, not dropped -> mean (1 + 0) / 2
    assert retrieval_metrics(run, qrels) == approx(dict.fromkeys(KEYS, 0.5))
    assert retrieval_metrics({}, qrels) == approx(dict.fromkeys(KEYS, 0.0))
    # no query has a relevant doc: the metrics are undefined, reported missing (not 0, not NaN)
    assert retrieval_metrics({"q1": {"a": 1.0}}, {"q1": {"a": 0}}) == dict.fromkeys(KEYS, None)


def test_retrieval_metrics_ties_ranked_by_doc_id_for_every_metric():
    # a and b tie; both rank a (smaller id) first, so b is at rank 2 for nDCG and MRR alike:
    # nDCG@10 = (1/log2(3)) / 1 = 0.630930, MRR@10 = 1/2. (Raw trec_eval would put b first for nDCG.)
    got = retrieval_metrics({"q": {"b": 1.0, "a": 1.0}}, {"q": {"b": 1}})
    assert got == approx({"ndcg@10": 1 / math.log2(3), "mrr@10": 0.5, "recall@10": 1.0, "recall@100": 1.0})


# --- evaluate_retrieval -------------------------------------------------------------------------------

def _one_query_set() -> RetrievalSet:
    return RetrievalSet(queries={"q": "?"}, corpus={"n": "", "r": ""}, qrels={"q": {"r": 1}})


def test_evaluate_retrieval_matryoshka_truncation_changes_ranking():
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    docs = torch.tensor([[0.28, 0.0, 0.96, 0.0],   # n: full score 0.28
                         [0.60, 0.80, 0.0, 0.0]])  # r: full score 0.60 -> r rank 1, all metrics 1
    # dim2: q -> [1, 0]; n -> [0.28, 0] / 0.28 = [1, 0] -> 1.0; r -> [0.6, 0.8] -> 0.6.
    # r falls to rank 2: nDCG@10 = (1/log2(3)) / 1 = 0.630930, MRR@10 = 1/2, recalls still 1.
    got = evaluate_retrieval(q, docs, _one_query_set(), ["q"], ["n", "r"], dims=[2])
    assert got == approx({**dict.fromkeys(KEYS, 1.0), "dim2/ndcg@10": 1 / math.log2(3),
                          "dim2/mrr@10": 0.5, "dim2/recall@10": 1.0, "dim2/recall@100": 1.0})


def test_evaluate_retrieval_full_size_is_dot_product_not_renormalised():
    q = torch.tensor([[1.0, 0.0, 0.0]])
    docs = torch.tensor([[0.9, 0.0, 9.0],    # n: dot 0.9 (cosine only 0.0995)
                         [0.6, 0.8, 0.0]])   # r: dot 0.6 -> r rank 2
    test = _one_query_set()
    test.qrels["q_unencoded"] = {"r": 1}  # in qrels but not in query_ids: counts 0
    got = evaluate_retrieval(q, docs, test, ["q"], ["n", "r"])
    # q: nDCG@10 = 1/log2(3), MRR@10 = 1/2, recall 1; q_unencoded: 0. Means over 2 queries.
    assert got == approx({"ndcg@10": (1 / math.log2(3)) / 2, "mrr@10": 0.25, "recall@10": 0.5,
                          "recall@100": 0.5})


def test_evaluate_retrieval_rejects_bad_inputs():
    q, d, test = torch.zeros(1, 4), torch.zeros(2, 4), _one_query_set()
    with pytest.raises(ValueError, match="Matryoshka dims"):
        evaluate_retrieval(q, d, test, ["q"], ["n", "r"], dims=[2, 8])
    with pytest.raises(ValueError, match="query_ids has 2"):
        evaluate_retrieval(q, d, test, ["q", "x"], ["n", "r"])
    with pytest.raises(ValueError, match="doc_ids has 1"):
        evaluate_retrieval(q, d, test, ["q"], ["n"])
    with pytest.raises(ValueError, match="duplicates"):
        evaluate_retrieval(q, d, test, ["q"], ["n", "n"])
    with pytest.raises(ValueError, match="recall@100"):
        evaluate_retrieval(q, d, test, ["q"], ["n", "r"], k=10)
    with pytest.raises(ValueError, match="embeddings"):
        evaluate_retrieval(q, torch.zeros(2, 3), test, ["q"], ["n", "r"])


# --- sts_spearman -------------------------------------------------------------------------------------

def _pairs_with_cosines(cosines: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """emb1 = e1, emb2 = 3 * (c, sqrt(1 - c^2)): cosine c, whatever the length."""
    c = torch.tensor(cosines)
    return torch.tensor([[1.0, 0.0]]).expand(len(cosines), 2), 3 * torch.stack([c, (1 - c**2).sqrt()], 1)


def test_sts_spearman_monotone_and_reversed():
    emb1, emb2 = _pairs_with_cosines([0.1, 0.2, 0.5, 0.7, 0.9])
    assert sts_spearman(emb1, emb2, [0.0, 0.5, 3.0, 4.0, 5.0]) == pytest.approx(1.0)  # any monotone gold
    assert sts_spearman(emb1, emb2, [5.0, 4.0, 3.0, 0.5, 0.0]) == pytest.approx(-1.0)


def test_sts_spearman_hand_computed():
    # cosine 0.1, 0.4, 0.3, 0.9 -> ranks 1, 3, 2, 4; gold 2, 1, 3, 5 -> ranks 2, 1, 3, 4
    # d = -1, 2, -1, 0; sum d^2 = 6; rho = 1 - 6 * 6 / (4 * (16 - 1)) = 1 - 36/60 = 0.4
    emb1, emb2 = _pairs_with_cosines([0.1, 0.4, 0.3, 0.9])
    assert sts_spearman(emb1, emb2, [2.0, 1.0, 3.0, 5.0]) == pytest.approx(0.4)


def test_sts_spearman_rejects_mismatched_lengths():
    emb1, emb2 = _pairs_with_cosines([0.1, 0.4, 0.3])
    with pytest.raises(ValueError, match="gold"):
        sts_spearman(emb1, emb2, [1.0, 2.0])
