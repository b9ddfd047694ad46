"""Multi-vector (ColBERT-style) MaxSim: hand-computed scores with padding on both sides, the negatives
layout, blocked exact search, a few training steps, save/load."""

import json

import numpy as np
import pytest
import torch
from conftest import CONF, DATA, NOT_A_MODEL, logged
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from embtune.negatives import Hard, InBatch
from embtune.objectives.maxsim import TokenVectors, maxsim, maxsim_scores, search_maxsim
from embtune.recipes.finetune import train

PAD = [1.0, 0.0]  # a padding vector that would win a max (or count in a mean) if the mask were ignored
# query A left-padded (2 real tokens), query B right-padded (1 real token)
Q = torch.tensor([[PAD, [1.0, 0.0], [0.6, 0.8]],
                  [[0.6, 0.8], PAD, PAD]])
Q_MASK = torch.tensor([[0, 1, 1], [1, 0, 0]])
# document X right-padded, document Y left-padded
D = torch.tensor([[[-0.6, -0.8], [-0.8, 0.6], PAD],
                  [PAD, [0.8, 0.6], [0.0, 1.0]]])
D_MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])


def test_maxsim_by_hand_with_padding_on_both_sides():
    # A·X: a1=(1,0) vs x1, x2: -0.6, -0.8 -> max -0.6 (a 0-masked pad would give 0, an unmasked one 1)
    #      a2=(.6,.8) vs x1, x2: -1.0, 0.0 -> max 0.0;                 mean over A's 2 real tokens: -0.3
    # A·Y: a1: 0.8, 0.0 -> 0.8; a2: 0.96, 0.8 -> 0.96;                 mean 0.88
    # B·X: b1=(.6,.8): -1.0, 0.0 -> 0.0;                               mean over 1 token: 0.0
    # B·Y: b1: 0.96, 0.8 -> 0.96
    torch.testing.assert_close(maxsim(Q, Q_MASK, D, D_MASK), torch.tensor([[-0.3, 0.88], [0.0, 0.96]]))


def test_wrong_masking_would_give_other_numbers():
    """The hand values above tell the right masking from the tempting wrong ones."""
    zero_masked = (torch.einsum("aid,bjd->abij", Q, D) * D_MASK[None, :, None, :]).amax(-1)
    wrong = (zero_masked * Q_MASK[:, None, :]).sum(-1) / Q_MASK.sum(-1, keepdim=True)
    assert wrong[0, 0].item() == pytest.approx(0.0)  # not -0.3
    every_query_token = torch.einsum("aid,bjd->abij", Q, D).masked_fill(~D_MASK.bool()[None, :, None, :], -1e9)
    assert every_query_token.amax(-1).mean(-1)[0, 0].item() == pytest.approx(-0.4)  # pad counted: not -0.3


def test_empty_document_and_empty_query_give_no_nan():
    scores = maxsim(Q, torch.tensor([[0, 1, 1], [0, 0, 0]]), D, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert scores[0, 1] == float("-inf") and scores[1, 0] == 0.0 and not torch.isnan(scores).any()


def test_padding_gets_no_gradient():
    q, d = Q.clone().requires_grad_(), D.clone().requires_grad_()
    maxsim(q, Q_MASK, d, D_MASK).sum().backward()
    assert (q.grad[0, 0] == 0).all() and (q.grad[1, 1:] == 0).all()   # padded query tokens
    assert (d.grad[0, 2] == 0).all() and (d.grad[1, 0] == 0).all()    # padded document tokens
    # d/d(x2) of A·X: a2's max is x2 with weight 1/2 (A's mean) -> a2 / 2; B·X's max is x2 too -> + b1
    torch.testing.assert_close(d.grad[0, 1], torch.tensor([0.6, 0.8]) / 2 + torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize("negatives", [InBatch(), Hard(group_size=3)], ids=["in_batch", "hard"])
def test_one_token_texts_score_as_the_single_vector_negatives_do(negatives):
    """With one real token per text, MaxSim is the dot product: same candidates, order and masking."""
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1) for s in ((3, 4), (3, 4), (3, 2, 4)))
    neg_mask = torch.tensor([[True, True], [True, False], [False, False]])
    ref, ref_target = negatives(a, p, n, neg_mask)

    def tokens(x):  # one real token, then a padding slot holding garbage
        return torch.stack([x, torch.ones_like(x)], 1), torch.tensor([[1, 0]] * len(x))

    scores, target = maxsim_scores(negatives, tokens(a), tokens(p), tokens(n.reshape(-1, 4)), neg_mask)
    torch.testing.assert_close(scores, ref)
    assert torch.equal(target, ref_target)


def _random_token_set(n, t, dim, g):
    vectors = torch.nn.functional.normalize(torch.randn(n, t, dim, generator=g), dim=-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[::2] = mask[::2].flip(1)  # every other text left-padded
    return vectors, mask


@pytest.mark.parametrize("k", [7, 100])
def test_blocked_search_equals_unblocked(k):
    g = torch.Generator().manual_seed(1)
    qv, qm = _random_token_set(11, 6, 8, g)
    dv, dm = _random_token_set(37, 9, 8, g)
    ref_scores, ref_indices = maxsim(qv, qm, dv, dm).topk(min(k, 37), dim=1)
    queries, docs = TokenVectors.from_padded(qv, qm, 4), TokenVectors.from_padded(dv, dm, 5)  # uneven chunks
    assert len(docs) == 37 and max(v.size(1) for _, v, _ in docs.chunks[1:]) < 9  # trimmed, length-sorted
    scores, indices = search_maxsim(queries, docs, k, query_block=3)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)


# --- the model, training, saving ---------------------------------------------------------------------

def _model(tiny_bert, dim=16):
    from embtune.model import Mean, from_pretrained_multi_vector

    torch.manual_seed(0)
    return from_pretrained_multi_vector(tiny_bert, Mean(), multi_vector_dim=dim)


def test_token_vectors_are_unit_length_zero_at_padding_and_independent_of_the_batch(tiny_bert):
    model = _model(tiny_bert).eval()
    texts = ["a short one", "a much longer text with many more tokens in it than the first"]
    batch = model.tokenize(texts, 64)
    vectors, mask = model(batch["input_ids"], batch["attention_mask"])
    assert vectors.shape[-1] == 16 and mask.dtype == torch.bool and not mask[0].all()
    torch.testing.assert_close(vectors[mask].norm(dim=-1), torch.ones(int(mask.sum())))
    assert (vectors[~mask] == 0).all()
    alone = model.tokenize(texts[:1], 64)
    v1, m1 = model(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(v1[0][m1[0]], vectors[0][mask[0]], atol=1e-5, rtol=0)


def test_save_and_load_restore_the_projection(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    import embtune
    from embtune.model import save

    model = _model(tiny_bert)
    save(model, tmp_path / "model")
    loaded = embtune.load(str(tmp_path / "model"))
    assert loaded.multi_vector and loaded.dim == 16
    assert torch.equal(loaded.projection.weight, model.projection.weight)
    assert json.loads((tmp_path / "model" / "embtune.json").read_text())["multi_vector_dim"] == 16
    texts = ["def add(a, b): return a + b", "Return the sum of two numbers, or raise.", "x"]
    ours, theirs = model.encode(texts, batch_size=2), loaded.encode(texts, batch_size=2)
    for (r1, v1, m1), (r2, v2, m2) in zip(ours.chunks, theirs.chunks):
        assert torch.equal(r1, r2) and torch.equal(m1, m2)
        torch.testing.assert_close(v1, v2)
    # sentence-transformers applies the same projection to its token embeddings (not normalised there)
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    st_tokens = st.encode(texts[:1], output_value="token_embeddings")[0]
    rows, v, m = next((r, v, m) for r, v, m in ours.chunks if 0 in r.tolist())
    i = rows.tolist().index(0)
    torch.testing.assert_close(torch.nn.functional.normalize(st_tokens.float(), dim=-1), v[i][m[i]], atol=1e-5, rtol=0)


def test_a_projection_of_another_size_is_refused(tmp_path, tiny_bert):
    from embtune.model import from_pretrained_multi_vector, save

    save(_model(tiny_bert), tmp_path / "model")
    with pytest.raises(ValueError, match="stored projection is \\(16, 32\\), expected \\(8, 32\\)"):
        from_pretrained_multi_vector(str(tmp_path / "model"), multi_vector_dim=8)


SMALL = ["train.batch_size=8", "train.max_steps=2", "train.log_every=1", "eval.batch_size=16",
         "model=multi_vector", "model.multi_vector_dim=16"]
STDLIB_SMALL = ["data.max_train_pairs=24", "data.max_test_queries=12"]


def _run(tmp_path, tiny_bert, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        data = [] if any(o.startswith("data=") for o in overrides) else STDLIB_SMALL
        cfg = compose(config_name="config", overrides=[f"model.name_or_path={tiny_bert}", *SMALL, *data, *overrides])
    return cfg, logged(train, cfg, tmp_path)


def test_a_few_multi_vector_steps_train_evaluate_and_save(tmp_path, tiny_bert):
    import embtune
    from embtune.eval.evaluators import Retrieval

    cfg, summary = _run(tmp_path, tiny_bert, ["train.max_steps=6", "train.lr=1e-3"])
    assert summary["steps"] == 6
    assert set(summary["base"]) == set(summary["final"]) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}
    losses = [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < np.mean(losses[:2])
    # the saved model, loaded again, evaluates to the run's final metrics
    loaded = embtune.load(str(tmp_path / "model"))
    assert loaded.multi_vector
    assert Retrieval(batch_size=5)(loaded, instantiate(cfg.data), []) == pytest.approx(summary["final"], abs=1e-6)


def test_multi_vector_with_hard_negatives(tmp_path, tiny_bert):
    toy = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
    _, summary = _run(tmp_path, tiny_bert, ["data=jsonl", f"data.path={toy}", "data_format=multi_negative",
                                            "negatives=hard", "negatives.group_size=3", "loss=hinge"])
    assert summary["steps"] == 2


@pytest.mark.parametrize("overrides,match", [
    (["matryoshka=on"], "matryoshka"),
    (["data=jsonl", f"data.path={DATA / 'stsb' / 'train.tsv'}", "data_format=scored_pairs", "loss=cosent"],
     "takes pair_scores examples"),
    (["negatives.cross_device=true"], "model=multi_vector with negatives.cross_device=true"),
])
def test_unsupported_combinations_fail_before_the_model_loads(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, NOT_A_MODEL, overrides)
