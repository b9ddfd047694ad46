"""Cross-batch memory (XBM): a FIFO of recent document embeddings as extra candidates."""

import json

import pytest
import torch

from embtune.data.batching import candidate_batch, text_key
from embtune.data.formats import Example
from embtune.losses.info_nce import InfoNCE
from embtune.negatives.cross_batch import CrossBatch
from embtune.objectives.candidates import candidate_loss


def _emb(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_memory_is_a_fifo_of_the_last_queue_size_embeddings_after_warm_up():
    xbm = CrossBatch(queue_size=3, warmup_steps=1)
    xbm.remember(_emb([1, 0]), torch.tensor([1]))  # step 0: warm-up, not stored
    assert xbm.memory() is None
    xbm.remember(_emb([0, 1], [1, 1]), torch.tensor([2, 3]))  # step 1: stored
    emb, keys = xbm.memory()
    torch.testing.assert_close(emb, _emb([0, 1], [1, 1]))
    assert keys.tolist() == [2, 3]
    xbm.remember(_emb([2, 2], [3, 3]), torch.tensor([4, 5]))  # the oldest (key 2) drops out
    emb, keys = xbm.memory()
    assert keys.tolist() == [3, 4, 5]
    torch.testing.assert_close(emb, _emb([1, 1], [2, 2], [3, 3]))


def test_memory_is_detached():
    xbm = CrossBatch(queue_size=4, warmup_steps=0)
    x = torch.ones(2, 3, requires_grad=True)
    xbm.remember(x * 2, torch.tensor([0, 1]))
    assert not xbm.memory()[0].requires_grad


def test_queue_size_zero_never_stores():
    xbm = CrossBatch(queue_size=0, warmup_steps=0)
    xbm.remember(_emb([1, 0]), torch.tensor([1]))
    assert xbm.memory() is None


@pytest.mark.parametrize("kwargs", [{"queue_size": -1}, {"warmup_steps": -1}, {"group_size": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="negatives"):
        CrossBatch(**kwargs)


def test_memory_scores_join_the_candidates_and_copies_of_the_positive_are_masked(tiny_bert):
    from embtune.model import from_pretrained
    from embtune.model.pooling import Mean

    model = from_pretrained(tiny_bert, pooling=Mean()).eval()
    xbm, loss_fn = CrossBatch(queue_size=10, warmup_steps=0), InfoNCE(symmetric=False)
    first = [Example("q0", "doc zero"), Example("q1", "doc one")]
    second = [Example("q2", "doc zero"), Example("q3", "doc three")]  # q2's positive is in the memory
    cut = lambda x, d: x  # noqa: E731  no Matryoshka
    b1 = candidate_batch(model, first)
    _, info = candidate_loss(lambda c: model(**b1[c]), b1, xbm, loss_fn, [(32, 1.0)], cut)
    assert info["train/candidates"] == 2.0
    assert xbm.memory()[1].tolist() == [text_key("doc zero"), text_key("doc one")]
    batch = candidate_batch(model, second)
    loss, info = candidate_loss(lambda c: model(**batch[c]), batch, xbm, loss_fn, [(32, 1.0)], cut)
    # q2: 2 in-batch + 2 stored, less the stored copy of its positive; q3: 4
    assert info["train/candidates"] == (3 + 4) / 2
    # by hand: InfoNCE over [in-batch | memory] with the copy masked
    with torch.no_grad():
        a, p = model(**batch["query"]), model(**batch["positive"])
        mem = model(**candidate_batch(model, first)["positive"])
        scores = torch.cat([a @ p.T, a @ mem.T], 1) / 0.05
        scores[0, 2] = float("-inf")
        expected = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _jsonl(tmp_path, n=16):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": f"question number {i}", "positive": f"answer text {i}"}) + "\n"
                            for i in range(n)))
    return path


def _train(tmp_path, tiny_bert, overrides):
    from test_train import _run

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _jsonl(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    _run(out, tiny_bert, ["data=jsonl", f"data.path={data}", "data.dev_queries=0", "train.batch_size=4", "train.max_steps=4",
                          "eval.before=false", "eval.after=false", *overrides])
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    return events, out


def test_candidate_count_per_step_grows_with_the_memory(tmp_path, tiny_bert):
    events, _ = _train(tmp_path, tiny_bert, ["negatives=cross_batch", "negatives.queue_size=8",
                                             "negatives.warmup_steps=1"])
    # step 1 warm-up: 4; step 2 memory empty: 4, stores 4; step 3: 4 + 4; step 4: 4 + 8 (queue full)
    assert [e["train/candidates"] for e in events] == [4.0, 4.0, 8.0, 12.0]


def test_queue_size_zero_equals_plain_in_batch_training_exactly(tmp_path, tiny_bert):
    from safetensors.torch import load_file

    plain, out1 = _train(tmp_path / "a", tiny_bert, ["negatives=in_batch"])
    xbm, out2 = _train(tmp_path / "b", tiny_bert, ["negatives=cross_batch", "negatives.queue_size=0",
                                                   "negatives.warmup_steps=0"])
    assert [e["train/loss"] for e in plain] == [e["train/loss"] for e in xbm]
    w1, w2 = (load_file(next((o / "model").rglob("model.safetensors"))) for o in (out1, out2))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_cross_batch_with_hard_negatives_and_matryoshka_trains(tmp_path, tiny_bert):
    from conftest import DATA
    from test_train import _run

    toy = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
    summary = _run(tmp_path, tiny_bert, ["data=jsonl", f"data.path={toy}", "data.dev_queries=0",
                                         "data_format=multi_negative",
                                         "negatives=cross_batch", "negatives.group_size=3", "negatives.warmup_steps=0",
                                         "matryoshka=on", "matryoshka.dims=[32,16]", "matryoshka.weights=[1,1]",
                                         "train.max_steps=3"])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    # batch of 8 with 2 negatives each: 24 candidates; later steps add the stored ones
    assert summary["steps"] == 3 and events[0]["train/candidates"] <= 24 < events[1]["train/candidates"]


