"""Matryoshka: truncate then re-normalise (by hand), per-dim weights, order of dims, evaluation at every
dim, dims saved with the model and truncation on load, a teacher's scores per dim."""

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, logged
from hydra import compose, initialize_config_dir
from torch import nn

from embtune.data import RetrievalSet
from embtune.eval.metrics import evaluate_retrieval
from embtune.losses.info_nce import InfoNCE
from embtune.negatives import InBatch
from embtune.objectives import objective_for
from embtune.objectives.matryoshka import matryoshka_dims, scores_per_dim, truncate
from embtune.recipes.finetune import train


def test_truncate_then_renormalise_by_hand():
    x = torch.tensor([[3.0, 4.0, 12.0]]) / 13  # unit length
    torch.testing.assert_close(truncate(x, 2), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(truncate(x, 2, normalize=False), torch.tensor([[3.0, 4.0]]) / 13)
    assert truncate(x, 3) is x and truncate(x, 5) is x and truncate(None, 2) is None


def test_dims_are_sorted_with_their_weights_and_checked():
    assert matryoshka_dims([64, 256, 128], [0.25, 1, 0.5], 384) == [(256, 1.0), (128, 0.5), (64, 0.25)]
    assert matryoshka_dims([], [], 384) == [(384, 1.0)]
    for dims, weights, match in (([64, 64], [1, 1], "repeats"), ([512], [1], r"\[512\] outside 1..384"),
                                 ([64], [-1], "must be >= 0"), ([64, 32], [1], "same length")):
        with pytest.raises(ValueError, match=match):
            matryoshka_dims(dims, weights, 384)


class TableModel(nn.Module):
    """A stand-in encoder: token id -> a fixed embedding (first token only), L2-normalised."""

    normalize = True

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, input_ids, attention_mask, kind="document"):  # kind: Embedder's tower
        return F.normalize(self.table[input_ids[:, 0]], dim=-1)


# q0, q1, p0, p1; at 3 dims q_i·p_j = 0.6 on the diagonal, 0 off it; cut to 2 dims and re-normalised,
# p0 -> (1, 0) and p1 -> (0, 1), so the diagonal is 1 (without re-normalising it would stay 0.6)
MODEL = TableModel([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]])
ONES = torch.ones(2, 1, dtype=torch.long)
BATCH = {"query": {"input_ids": torch.tensor([[0], [1]]), "attention_mask": ONES},
         "positive": {"input_ids": torch.tensor([[2], [3]]), "attention_mask": ONES},
         "false_negative": torch.zeros(2, 2, dtype=torch.bool),
         "positive_key": torch.tensor([0, 1]), "query_key": torch.tensor([2, 3])}  # distinct texts


def _loss(dims, weights):
    return objective_for(InfoNCE(temperature=1.0), InBatch()).loss(MODEL, BATCH, matryoshka_dims(dims, weights, 3))[0]


def test_weighted_loss_over_dims_by_hand():
    # InfoNCE at τ=1 with diagonal s and off-diagonal 0: -log(e^s / (e^s + 1)) = log(1 + e^-s)
    at3, at2 = math.log(1 + math.exp(-0.6)), math.log(1 + math.exp(-1.0))  # 0.437488, 0.313262
    assert _loss([3, 2], [1.0, 0.5]).item() == pytest.approx(at3 + 0.5 * at2, abs=1e-6)  # 0.594119
    assert _loss([3, 2], [0.0, 2.0]).item() == pytest.approx(2 * at2, abs=1e-6)


def test_the_order_of_dims_does_not_change_the_loss():
    assert torch.equal(_loss([3, 2], [1.0, 0.5]), _loss([2, 3], [0.5, 1.0]))
    assert not torch.equal(_loss([3, 2], [1.0, 0.5]), _loss([2, 3], [1.0, 0.5]))  # weights follow their dims


def test_evaluation_truncates_as_training_does():
    # q = (1,0,0); a = (0.5, 0, 0.866), b = (0.9, 0.9, 0). At 2 dims re-normalised: a -> (1,0) scores 1,
    # b -> (0.707, 0.707) scores 0.707: a ranks first, NDCG@10 = 1. Without normalisation (a model that
    # does not normalise): a scores 0.5 and b 0.9, a ranks second: NDCG@10 = 1/log2(3) = 0.6309.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    d = torch.tensor([[0.5, 0.0, 0.8660254], [0.9, 0.9, 0.0]])
    test = RetrievalSet(queries={"q": "q"}, corpus={"a": "a", "b": "b"}, qrels={"q": {"a": 1}})
    on = evaluate_retrieval(q, d, test, ["q"], ["a", "b"], dims=[2])
    off = evaluate_retrieval(q, d, test, ["q"], ["a", "b"], dims=[2], normalize=False)
    assert on["dim2/ndcg@10"] == pytest.approx(1.0)
    assert off["dim2/ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_a_teachers_scores_per_dim_by_hand():
    teacher_q = torch.tensor([[1.0, 0.0, 0.0]])
    teacher_docs = torch.tensor([[[0.6, 0.0, 0.8], [0.0, 0.6, 0.8]]])  # [B=1, L=2, D=3]
    scores = scores_per_dim(teacher_q, teacher_docs, [3, 2, 1])
    torch.testing.assert_close(scores[3], torch.tensor([[0.6, 0.0]]))
    torch.testing.assert_close(scores[2], torch.tensor([[1.0, 0.0]]))  # (0.6, 0) re-normalised to (1, 0)
    # at 1 dim the second document's prefix is 0: normalising a zero vector gives 0, not NaN
    torch.testing.assert_close(scores[1], torch.tensor([[1.0, 0.0]]))
    shared = scores_per_dim(teacher_q, teacher_docs[0], [2])  # candidates [C,D] shared by the batch
    torch.testing.assert_close(shared[2], scores[2])
    with pytest.raises(ValueError, match="scores_per_dim"):
        scores_per_dim(teacher_q, torch.zeros(2, 2, 3), [2])


def test_saved_dims_and_truncation_on_load(tmp_path, tiny_bert, caplog):
    import embtune
    from embtune.model import from_pretrained, save

    save(from_pretrained(tiny_bert), tmp_path / "model", matryoshka_dims=[32, 16, 8])
    assert json.loads((tmp_path / "model" / "embtune.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    texts = ["def add(a, b): return a + b", "Return the sum of two numbers."]
    full = embtune.load(str(tmp_path / "model")).encode(texts)
    small = embtune.load(str(tmp_path / "model"), truncate_dim=16)
    assert small.dim == 16
    emb = small.encode(texts)
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(emb, truncate(torch.from_numpy(full), 16).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="truncate_dim=64 outside 1..32"):
        embtune.load(str(tmp_path / "model"), truncate_dim=64)
    with caplog.at_level(logging.WARNING):
        embtune.load(str(tmp_path / "model"), truncate_dim=12)
    assert "not 12" in caplog.text


def test_a_truncated_model_saved_again_stays_truncated(tmp_path, tiny_bert):
    import embtune
    from embtune.model import from_pretrained, save

    save(from_pretrained(tiny_bert), tmp_path / "model", matryoshka_dims=[32, 16])
    small = embtune.load(str(tmp_path / "model"), truncate_dim=16)
    save(small, tmp_path / "again", matryoshka_dims=[32, 16])
    # sentence-transformers' Pooling counts per-token dims: the hidden size, not the truncation
    assert json.loads((tmp_path / "again" / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32
    texts = ["Return the sum of two numbers."]
    np.testing.assert_allclose(embtune.load(str(tmp_path / "again")).encode(texts), small.encode(texts), atol=1e-6)
    assert embtune.load(str(tmp_path / "again"), truncate_dim=32).encode(texts).shape == (1, 32)


def _run(tmp_path, tiny_bert, dims, weights):
    overrides = [f"model.name_or_path={tiny_bert}", "train.batch_size=8", "train.max_steps=3", "train.log_every=1",
                 "eval.batch_size=16", "data.max_train_pairs=24", "data.max_test_queries=12", "matryoshka=on",
                 f"matryoshka.dims={dims}", f"matryoshka.weights={weights}", "eval.cache_base=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    summary = logged(train, cfg, tmp_path)
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    return summary, losses


def test_the_order_of_dims_does_not_change_a_run(tmp_path, tiny_bert):
    first, losses1 = _run(tmp_path / "a", tiny_bert, "[32,16,8]", "[1.0,0.5,0.25]")
    second, losses2 = _run(tmp_path / "b", tiny_bert, "[8,32,16]", "[0.25,1.0,0.5]")
    assert losses1 == losses2 and first["final"] == second["final"] and first["base"] == second["base"]
    assert {"ndcg@10", "dim16/ndcg@10", "dim8/ndcg@10", "dim8/recall@100"} <= set(first["final"])
    for run in ("a", "b"):  # the saved model lists its dims largest first, however they were given
        assert json.loads((tmp_path / run / "model" / "embtune.json").read_text())["matryoshka_dims"] == [32, 16, 8]
