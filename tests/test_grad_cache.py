"""GradCache gives the loss and every parameter gradient of the plain computation (to 1e-5), with dropout
on, hard negatives, Matryoshka and a learnable temperature; and it is wired into the loop."""

import random
from collections.abc import Mapping

import pytest
import torch
from conftest import NOT_A_MODEL

import embtune.training.grad_cache as gc
from embtune.data.batching import candidate_batch
from embtune.data.formats import Example
from embtune.losses.info_nce import InfoNCE
from embtune.model import from_pretrained
from embtune.model.pooling import Mean
from embtune.negatives import Hard, InBatch
from embtune.objectives import objective_for

TEXTS = ["a short one", "a somewhat longer text about proteins and cells", "x",
         "gene expression in mice under stress, measured over weeks", "dna", "the cat sat on the mat today",
         "vaccines and the immune response", "one two three four five six seven eight nine ten eleven"]


@pytest.fixture
def model(tiny_bert):
    torch.manual_seed(0)
    m = from_pretrained(tiny_bert, pooling=Mean(), query_max_length=16, document_max_length=24)
    return m.train()  # dropout on (BERT's 0.1 on hidden states and attention probabilities)


def _examples(k: int = 0) -> list[Example]:
    n = len(TEXTS)
    # row 5 has one negative fewer than the others: a padded, masked candidate
    return [Example(TEXTS[i], TEXTS[(i + 1) % n] + " doc",
                    tuple(TEXTS[(i + j) % n] + " neg" for j in range(2, 2 + k - (i == 5)))) for i in range(n)]


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    params = [*model.named_parameters(), *loss_fn.named_parameters()]
    out = {n: p.grad.clone() for n, p in params if p.grad is not None}
    model.zero_grad(set_to_none=True), loss_fn.zero_grad(set_to_none=True)
    return out


def _plain_chunked(model, batch, loss_of, size):
    """The plain computation over the same mini-batches in the same order (so the same dropout masks):
    encode each with a graph, put them together, one loss, one backward."""
    emb = {}
    for c in [k for k, v in batch.items() if isinstance(v, Mapping)]:
        parts = [(rows, model(**tokens)) for rows, tokens in gc._chunks(batch[c], size)]
        rows = torch.cat([r for r, _ in parts])
        emb[c] = torch.cat([e for _, e in parts])[torch.argsort(rows)]  # back in batch order
    loss = loss_of(emb)[0]
    loss.backward()
    return loss.detach()


CASES = {
    "in_batch": dict(k=0, negatives=InBatch(), dims=[(32, 1.0)]),
    "hard": dict(k=2, negatives=Hard(group_size=3), dims=[(32, 1.0)]),
    "matryoshka": dict(k=0, negatives=InBatch(), dims=[(32, 1.0), (16, 0.5), (8, 0.25)]),
    "hard+matryoshka+learnable": dict(k=2, negatives=Hard(group_size=3), dims=[(32, 1.0), (8, 1.0)],
                                      learnable=True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("size", [1, 3, 8])
def test_loss_and_every_gradient_equal_the_plain_computation_with_dropout(model, case, size):
    c = CASES[case]
    loss_fn = InfoNCE(temperature=0.05, learnable=c.get("learnable", False))
    batch = candidate_batch(model, _examples(c["k"]), c["k"] + 1, random.Random(0))
    loss_of = lambda e: objective_for(loss_fn, c["negatives"]).loss(model, batch, c["dims"], e)  # noqa: E731

    torch.manual_seed(123)
    ref_loss = _plain_chunked(model, batch, loss_of, size)
    ref = _grads(model, loss_fn)
    torch.manual_seed(123)
    loss, _ = gc.grad_cache_backward(model, batch, loss_of, size)
    got = _grads(model, loss_fn)

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    used = [n for n, _ in model.named_parameters() if ".pooler." not in n]  # BERT's pooler is not used
    assert got.keys() == ref.keys() and len(ref) == len(used) + c.get("learnable", False)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-5
    # the RNG ends where the plain computation leaves it: the next step draws the same masks
    torch.manual_seed(123)
    _plain_chunked(model, batch, loss_of, size)
    plain_next = torch.rand(3)
    torch.manual_seed(123)
    gc.grad_cache_backward(model, batch, loss_of, size)
    assert torch.equal(torch.rand(3), plain_next)
    model.zero_grad(set_to_none=True)


def test_without_dropout_it_equals_one_unchunked_forward(model):
    """Length sorting, trimming each mini-batch to its own longest text and putting rows back in order
    change nothing: in eval mode GradCache equals the objective's loss on the whole batch at once."""
    model.eval()
    loss_fn, negatives = InfoNCE(temperature=0.05), Hard(group_size=3)
    batch = candidate_batch(model, _examples(2), 3, random.Random(0))
    objective = objective_for(loss_fn, negatives)
    loss = objective.loss(model, batch, [(32, 1.0)])[0]
    loss.backward()
    ref = _grads(model, loss_fn)
    got_loss, _ = gc.grad_cache_backward(model, batch, lambda e: objective.loss(model, batch, [(32, 1.0)], e), 3)
    got = _grads(model, loss_fn)
    assert got_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-5


def test_without_replaying_the_rng_the_gradients_differ(model, monkeypatch):
    """The check above is sharp: re-forwarding with fresh dropout masks gives other gradients."""
    loss_fn = InfoNCE(temperature=0.05)
    batch = candidate_batch(model, _examples())
    loss_of = lambda e: objective_for(loss_fn, InBatch()).loss(model, batch, [(32, 1.0)], e)  # noqa: E731
    torch.manual_seed(1)
    _plain_chunked(model, batch, loss_of, 4)
    ref = _grads(model, loss_fn)
    monkeypatch.setattr(gc, "_replay", lambda state, device: torch.random.fork_rng())
    torch.manual_seed(1)
    gc.grad_cache_backward(model, batch, loss_of, 4)
    got = _grads(model, loss_fn)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) > 1e-4


def test_mini_batches_are_length_sorted_and_trimmed(model):
    tokens = model.tokenize(["a", "a b c d e f g", "a b c"], 16)
    chunks = gc._chunks(tokens, 2)
    assert [r.tolist() for r, _ in chunks] == [[1, 2], [0]]
    # each mini-batch is only as wide as its own longest text ([CLS] + words + [SEP])
    assert [t["input_ids"].shape for _, t in chunks] == [(2, 9), (1, 3)]
    assert torch.equal(chunks[1][1]["input_ids"][0], tokens["input_ids"][0, :3])


def test_a_mini_batch_size_below_one_is_refused(model):
    with pytest.raises(ValueError, match="train.mini_batch_size must be >= 1"):
        gc.grad_cache_backward(model, candidate_batch(model, _examples()), lambda e: 0, 0)


def test_the_loop_with_grad_cache_trains_as_the_plain_loop(tmp_path, tiny_bert):
    """Two steps of the loop with GradCache (mini-batches of 3, Matryoshka) against the same two steps
    without it, on a tiny BERT with dropout off (so the plain run's masks are not a second source of
    difference): the same loss at every step and the same trained weights."""
    import json

    from safetensors.torch import load_file
    from test_train import _run
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    no_dropout = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
              ).save_pretrained(no_dropout)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(no_dropout)
    # fp32: bf16 products round differently with the batch's shape (mini-batches of 3 against the whole)
    common = ["train.bf16=false", "train.lr=1e-3", "train.max_steps=2", "matryoshka=on", "matryoshka.dims=[32,16]",
              "matryoshka.weights=[1,1]", "eval.before=false", "eval.after=false"]
    runs = {}
    for name, extra in (("plain", []), ("grad_cache", ["train.grad_cache=true", "train.mini_batch_size=3"])):
        (tmp_path / name).mkdir()
        assert _run(tmp_path / name, str(no_dropout), common + extra)["steps"] == 2
        losses = [json.loads(x)["train/loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in x]
        runs[name] = losses, load_file(tmp_path / name / "model" / "model.safetensors")
    (plain_losses, plain_weights), (cached_losses, cached_weights) = runs["plain"], runs["grad_cache"]
    assert cached_losses == pytest.approx(plain_losses, abs=1e-5) and len(plain_losses) == 2
    moved = max((plain_weights[k] - load_file(no_dropout / "model.safetensors")[k]).abs().max().item()
                for k in plain_weights)
    assert moved > 1e-4  # the weights did train: the comparison below is not between two untouched copies
    assert max((plain_weights[k] - cached_weights[k]).abs().max().item() for k in plain_weights) < 1e-5
    with pytest.raises(ValueError, match="train.mini_batch_size must be >= 1"):
        _run(tmp_path, NOT_A_MODEL, ["train.grad_cache=true", "train.mini_batch_size=0"])


def test_simcse_with_grad_cache_is_refused_before_the_model_loads(tmp_path):
    from test_train import _run

    with pytest.raises(ValueError, match="train.grad_cache=true with loss=simcse"):
        _run(tmp_path, NOT_A_MODEL, ["train.grad_cache=true", "loss=simcse"])


def test_the_loop_logs_the_candidates_under_grad_cache(tmp_path, tiny_bert):
    """GradCache's step reports what the plain step reports: 8 in-batch candidates per anchor (its own
    positive and the 7 others of a batch of 8 pairs without repeated texts)."""
    import json

    from test_train import _run

    _run(tmp_path, tiny_bert, ["train.grad_cache=true", "train.mini_batch_size=3", "eval.before=false",
                               "eval.after=false"])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert [e["step"] for e in events] == [1, 2]
    assert [e["train/candidates"] for e in events] == [8.0, 8.0]
