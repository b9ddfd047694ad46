"""Evaluation: trec_eval metrics and Spearman against hand-computed values (the search: tests/test_index.py)."""

import math
import random

import pytest
import torch

from embtune.data import RetrievalSet
from embtune.eval.index import CorpusSearch
from embtune.eval.metrics import evaluate_retrieval, retrieval_metrics, sts_spearman

KEYS = {"ndcg@10", "mrr@10", "recall@10", "recall@100"}


def approx(expected: dict[str, float]):
    return pytest.approx(expected, abs=1e-6)


# --- retrieval_metrics --------------------------------------------------------------------------------

def test_retrieval_metrics_hand_computed():
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0},  # graded; c is judged non-relevant
        "q2": {"e": 1, "f": 1},          # f is never retrieved
        "q3": {"z": 1},                  # z at rank 11
        "q4": {"a": 0},                  # no relevant doc: kept, scores 0 (pytrec_eval does so)
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
    # Recall@10: q1 2/2, q2 1/2, q3 0/1; Recall@100: 2/2, 1/2, 1/1. q4: 0 everywhere. Means over 4 queries:
    assert retrieval_metrics(run, qrels) == approx({
        "ndcg@10": (ndcg1 + ndcg2 + 0 + 0) / 4,   # (0.643322 + 0.306574) / 4 = 0.237474
        "mrr@10": (1 / 2 + 1 / 3 + 0 + 0) / 4,    # 5/24 = 0.208333
        "recall@10": (1 + 0.5 + 0 + 0) / 4,       # 0.375
        "recall@100": (1 + 0.5 + 1 + 0) / 4,      # 0.625
    })
    assert abs(ndcg1 - 0.643322) < 1e-6 and abs(ndcg2 - 0.306574) < 1e-6


def test_retrieval_metrics_query_missing_from_run_counts_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0, "c": 0.5}}  # q2 never ranked: 0, not dropped -> mean (1 + 0) / 2
    assert retrieval_metrics(run, qrels) == approx(dict.fromkeys(KEYS, 0.5))
    assert retrieval_metrics({}, qrels) == approx(dict.fromkeys(KEYS, 0.0))
    # judged only 0: the query is kept and scores 0, as pytrec_eval scores it
    assert retrieval_metrics({"q1": {"a": 1.0}}, {"q1": {"a": 0}}) == approx(dict.fromkeys(KEYS, 0.0))
    # no judged query at all: the metrics are undefined, reported missing (not 0, not NaN)
    assert retrieval_metrics({"q1": {"a": 1.0}}, {}) == dict.fromkeys(KEYS, None)


def test_retrieval_metrics_ties_ranked_by_doc_id_descending_in_float32():
    # a and b tie; trec_eval ranks the larger id first: a (relevant) at rank 2 for every metric:
    # nDCG@10 = (1/log2(3)) / 1 = 0.630930, MRR@10 = 1/2
    got = retrieval_metrics({"q": {"b": 1.0, "a": 1.0}}, {"q": {"a": 1}})
    assert got == approx({"ndcg@10": 1 / math.log2(3), "mrr@10": 0.5, "recall@10": 1.0, "recall@100": 1.0})
    # 0.1 and the next double above it differ, but are one float32: a tie again, so b still ranks first
    above = math.nextafter(0.1, 1.0)
    assert retrieval_metrics({"q": {"a": above, "b": 0.1}}, {"q": {"a": 1}})["mrr@10"] == 0.5
    assert retrieval_metrics({"q": {"a": 0.1 + 1e-6, "b": 0.1}}, {"q": {"a": 1}})["mrr@10"] == 1.0
    # byte order, not numeric: "9" > "10", so "9" ranks first
    assert retrieval_metrics({"q": {"10": 1.0, "9": 1.0}}, {"q": {"10": 1}})["mrr@10"] == 0.5


def test_retrieval_metrics_ignore_a_document_with_the_query_id_by_default():
    # q retrieves itself first, then its relevant document r
    run, qrels = {"q": {"q": 0.9, "r": 0.8, "x": 0.7}}, {"q": {"r": 1}}
    assert retrieval_metrics(run, qrels) == approx(dict.fromkeys(KEYS, 1.0))  # r at rank 1 once q is out
    kept = retrieval_metrics(run, qrels, ignore_identical_ids=False)  # r at rank 2
    assert kept == approx({"ndcg@10": 1 / math.log2(3), "mrr@10": 0.5, "recall@10": 1.0, "recall@100": 1.0})
    assert run == {"q": {"q": 0.9, "r": 0.8, "x": 0.7}}  # the caller's run is not modified


def _pytrec_eval_means(run: dict, qrels: dict, ignore_identical_ids: bool) -> dict[str, float]:
    """What BEIR's and MTEB's EvaluateRetrieval report: pytrec_eval per query (self-hits popped from the
    run first when ignoring identical ids), averaged over the queries pytrec_eval returns."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    if ignore_identical_ids:
        run = {qid: {doc: s for doc, s in docs.items() if doc != qid} for qid, docs in run.items()}
    measures = {"ndcg_cut.10", "recip_rank", "success.10", "recall.10", "recall.100"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert set(per_query) == set(qrels)  # every judged query is in the run, as in BEIR
    rows = [{"ndcg@10": m["ndcg_cut_10"], "mrr@10": m["recip_rank"] * m["success_10"],  # MRR in the top 10
             "recall@10": m["recall_10"], "recall@100": m["recall_100"]} for m in per_query.values()]
    return {key: sum(r[key] for r in rows) / len(rows) for key in KEYS}


@pytest.mark.parametrize("ignore_identical_ids", [True, False])
def test_retrieval_metrics_equal_pytrec_eval_with_ties_grades_and_self_hits(ignore_identical_ids):
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(150)] + [f"q{i}" for i in range(0, 40, 2)]  # even queries are documents too
    qrels, run = {}, {}
    for i in range(40):
        qid = f"q{i}"
        judged = rng.sample(docs, rng.randint(1, 12))
        if i % 7 == 0:
            qrels[qid] = dict.fromkeys(judged, 0)  # judged, none relevant
        else:
            qrels[qid] = {doc: rng.choice([-1, 0, 1, 1, 2, 3]) for doc in judged}  # graded, some negative
        if i % 5 == 0:
            qrels[qid][f"missing{i}"] = 1  # relevant but never retrieved (not in the corpus)
        ranked = rng.sample(docs, 120)  # depth beyond 100: Recall@100 cuts the list
        # coarse scores: many exact ties; some differ from another only beyond float32's precision
        run[qid] = {doc: rng.randint(0, 30) / 30 + (1e-12 if rng.random() < 0.2 else 0.0) for doc in ranked}
        if i % 4 == 0:
            run[qid][qid] = 2.0  # the query's own document ranks first (even i: it is a document)
    run["q-unjudged"] = {"d1": 1.0}  # no qrels: ignored by both
    assert retrieval_metrics(run, qrels, ignore_identical_ids) == pytest.approx(
        _pytrec_eval_means(run, qrels, ignore_identical_ids), abs=1e-12)


@pytest.mark.parametrize("corpus_search", [None, CorpusSearch(faiss_min_docs=0, option="eval")],
                         ids=["default", "faiss"])
def test_evaluate_retrieval_equals_pytrec_eval_on_the_full_ranking(corpus_search):
    # 60 queries over 200 documents, the first 30 query ids also document ids; duplicate document vectors
    # tie exactly. The top-101 search with the self-hit removed must score as pytrec_eval on all 200.
    g = torch.Generator().manual_seed(3)
    doc_emb = torch.randn(200, 8, generator=g)
    doc_emb[100:140] = doc_emb[:40]  # exact ties
    query_emb = torch.randn(60, 8, generator=g)
    query_emb[:30] = doc_emb[:30] + 0.05 * torch.randn(30, 8, generator=g)  # each close to its own document
    doc_ids = [f"q{i}" for i in range(30)] + [f"d{i}" for i in range(30, 200)]
    query_ids = [f"q{i}" for i in range(60)]
    rng = random.Random(1)
    qrels = {qid: {doc: rng.randint(0, 2) for doc in rng.sample(doc_ids, 5)} for qid in query_ids}
    test = RetrievalSet(queries=dict.fromkeys(query_ids, ""), corpus=dict.fromkeys(doc_ids, ""), qrels=qrels)
    scores = (query_emb @ doc_emb.T).tolist()  # float32 products, as the search computes them
    full = {qid: dict(zip(doc_ids, row)) for qid, row in zip(query_ids, scores)}
    assert test.identical_ids() == 30
    for ignore in (True, False):
        got = evaluate_retrieval(query_emb, doc_emb, test, query_ids, doc_ids, ignore_identical_ids=ignore,
                                 corpus_search=corpus_search)
        assert got == pytest.approx(_pytrec_eval_means(full, qrels, ignore), abs=1e-6)


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


def test_sts_spearman_ties_cosines_that_differ_by_rounding_only():
    # three pairs with the same text on both sides: the true cosine is 1 for each (a tie), which float32
    # gives as 1.0000001, 0.99999994 and 1 for these vectors; two more pairs at cosine 0.5 and 0.2.
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))
    assert len(set(torch.nn.functional.cosine_similarity(x, x, dim=-1).tolist())) == 3  # the noise is there
    e1, e2 = _pairs_with_cosines([0.5, 0.2])
    emb1 = torch.cat([x, torch.nn.functional.pad(e1, (0, 382))])
    emb2 = torch.cat([x, torch.nn.functional.pad(e2, (0, 382))])
    # cosine ranks (ties averaged) 4, 4, 4, 2, 1; gold 3, 4, 5, 2, 1 -> ranks 3, 4, 5, 2, 1; both means 3:
    # deviations (1, 1, 1, −1, −2) and (0, 1, 2, −1, −2): rho = 8 / sqrt(8 · 10)
    assert sts_spearman(emb1, emb2, [3.0, 4.0, 5.0, 2.0, 1.0]) == pytest.approx(8 / math.sqrt(80), abs=1e-12)


def test_sts_spearman_of_pairs_that_all_have_the_same_cosine_is_missing():
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(0))  # every cosine 1, up to rounding
    assert sts_spearman(x, x, [1.0, 2.0, 3.0]) is None
    emb1, emb2 = _pairs_with_cosines([0.1, 0.4, 0.3])
    assert sts_spearman(emb1, emb2, [2.0, 2.0, 2.0]) is None  # constant gold
