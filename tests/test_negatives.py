"""Candidate construction for in-batch and hard negatives."""

import pytest
import torch

from embtune.negatives import Hard, InBatch

A = torch.tensor([[1., 0.], [0., 1.]])        # anchors
P = torch.tensor([[0.6, 0.8], [0.8, 0.6]])    # positives
N = torch.tensor([[[-1., 0.]], [[0., -1.]]])  # one hard negative each: [B=2, K=1, D=2]


def test_in_batch_scores_every_positive():
    scores, target = InBatch()(A, P, N)  # data negatives are ignored
    torch.testing.assert_close(scores, torch.tensor([[0.6, 0.8], [0.8, 0.6]]))
    assert target.tolist() == [0, 1]


def test_hard_appends_all_negatives_of_the_batch():
    scores, target = Hard()(A, P, N)
    # columns: p0, p1, n0, n1
    torch.testing.assert_close(scores, torch.tensor([[0.6, 0.8, -1., 0.], [0.8, 0.6, 0., -1.]]))
    assert target.tolist() == [0, 1]


def test_hard_without_negatives_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B,K,D\]"):
        Hard()(A, P, None)


def test_padded_negatives_score_minus_inf():
    neg = torch.tensor([[[-1., 0.], [0.5, 0.5]], [[0., -1.], [9., 9.]]])  # row 1's second slot is padding
    mask = torch.tensor([[True, True], [True, False]])
    scores, _ = Hard(group_size=3)(A, P, neg, mask)
    # columns: p0, p1, n00, n01, n10, n11(pad)
    assert torch.isinf(scores[:, 5]).all() and (scores[:, 5] < 0).all()
    assert torch.isfinite(scores[:, :5]).all()


def test_group_size_below_two_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        Hard(group_size=1)


def test_copies_of_the_positive_are_masked_as_false_negatives():
    from embtune.data.batching import _false_negatives
    from embtune.data.formats import Example

    examples = [Example("q0", "same"), Example("q1", "same"), Example("q2", "other")]
    # candidates: the 3 positives, then one negative per row; row 2's negative copies row 0's positive
    mask = _false_negatives(examples, ["same", "same", "other", "n0", "n1", "same"])
    assert mask.tolist() == [[False, True, False, False, False, True],
                             [True, False, False, False, False, True],
                             [False, False, False, False, False, False]]


def test_symmetric_step_masks_anchors_that_share_the_query_or_the_positive(tiny_bert):
    from embtune.data.batching import candidate_batch
    from embtune.data.formats import Example
    from embtune.losses.info_nce import InfoNCE
    from embtune.model import from_pretrained
    from embtune.model.pooling import Mean
    from embtune.objectives.candidates import candidate_loss

    model = from_pretrained(tiny_bert, pooling=Mean()).eval()
    examples = [Example("q a", "doc x"), Example("q a", "doc y"),  # one query, two positives
                Example("q b", "doc x"), Example("q c", "doc z")]  # doc x is the positive of q a and q b
    batch = candidate_batch(model, examples)
    loss, _ = candidate_loss(lambda c: model(**batch[c]), batch, InBatch(), InfoNCE(), [(32, 1.0)], lambda x, d: x)
    with torch.no_grad():
        a, p = model(**batch["query"]), model(**batch["positive"])
    inf = float("-inf")
    forward = (a @ p.T / 0.05).index_put_((torch.tensor([0, 2]), torch.tensor([2, 0])), torch.tensor(inf))
    # doc x (row 0) is no negative for q a again (column 1) nor for q b (column 2); doc y for q a (column 0);
    # doc x of row 2 for q a (column 0)
    reverse = (p @ a.T / 0.05).index_put_((torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 0, 0])),
                                          torch.tensor(inf))
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(forward, target)
                + torch.nn.functional.cross_entropy(reverse, target)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    one_way = candidate_loss(lambda c: model(**batch[c]), batch, InBatch(), InfoNCE(symmetric=False),
                             [(32, 1.0)], lambda x, d: x)[0]
    assert one_way.item() == pytest.approx(torch.nn.functional.cross_entropy(forward, target).item(), rel=1e-5)
    assert abs(loss.item() - one_way.item()) > 1e-3  # the reverse direction counts
