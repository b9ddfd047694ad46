"""Pooling on hand-made hidden states, for right and left padding."""

import pytest
import torch

from embtune.pooling import CLS, LastToken, Mean

# one text of 2 tokens ([1,2], [3,4]) and one of 3 tokens ([5,6], [7,8], [9,10]); pads hold 100s
RIGHT = torch.tensor([[[1., 2.], [3., 4.], [100., 100.]], [[5., 6.], [7., 8.], [9., 10.]]])
RIGHT_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
LEFT = torch.tensor([[[100., 100.], [1., 2.], [3., 4.]], [[5., 6.], [7., 8.], [9., 10.]]])
LEFT_MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])

EXPECTED = {
    Mean: [[2., 3.], [7., 8.]],       # (1+3)/2, (2+4)/2 ; (5+7+9)/3, (6+8+10)/3
    CLS: [[1., 2.], [5., 6.]],        # first real token
    LastToken: [[3., 4.], [9., 10.]],  # last real token
}


@pytest.mark.parametrize("pool", [Mean, CLS, LastToken])
@pytest.mark.parametrize("hidden,mask", [(RIGHT, RIGHT_MASK), (LEFT, LEFT_MASK)], ids=["right", "left"])
def test_pooling_hand_computed(pool, hidden, mask):
    torch.testing.assert_close(pool()(hidden, mask), torch.tensor(EXPECTED[pool]))


def test_mean_of_empty_mask_is_zero_not_nan():
    out = Mean()(torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
    assert torch.equal(out, torch.zeros(1, 3))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention_mask \[B,T\]"):
        Mean()(torch.ones(2, 3, 4), torch.ones(2, 4))


@pytest.mark.parametrize("pool", ["mean", "cls", "last_token"])
def test_single_text_equals_same_text_in_padded_batch(tiny_bert, pool):
    from embtune import pooling
    from embtune.model import Embedder

    cls = {"mean": pooling.Mean, "cls": pooling.CLS, "last_token": pooling.LastToken}[pool]
    model = Embedder.from_pretrained(tiny_bert, pooling=cls())
    text = "a short text"
    alone = model.encode([text])
    batch = model.encode(["a much longer text that forces padding of the short one " * 3, text])
    assert abs(alone[0] - batch[1]).max() < 1e-5
