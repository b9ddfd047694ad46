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
    from embtune.batching import _false_negatives
    from embtune.formats import Example

    examples = [Example("q0", "same"), Example("q1", "same"), Example("q2", "other")]
    # candidates: the 3 positives, then one negative per row; row 2's negative copies row 0's positive
    mask = _false_negatives(examples, ["same", "same", "other", "n0", "n1", "same"])
    assert mask.tolist() == [[False, True, False, False, False, True],
                             [True, False, False, False, False, True],
                             [False, False, False, False, False, False]]
