"""Pooling on hand-made hidden states, for right and left padding."""

import pytest
import torch

from embtune.model.pooling import CLS, LastToken, Max, Mean, WeightedMean

# one text of 2 tokens ([1,2], [3,4]) and one of 3 tokens ([5,6], [7,8], [9,10]); pads hold 100s
RIGHT = torch.tensor([[[1., 2.], [3., 4.], [100., 100.]], [[5., 6.], [7., 8.], [9., 10.]]])
RIGHT_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
LEFT = torch.tensor([[[100., 100.], [1., 2.], [3., 4.]], [[5., 6.], [7., 8.], [9., 10.]]])
LEFT_MASK = torch.tensor([[0, 1, 1], [1, 1, 1]])

EXPECTED = {
    Mean: [[2., 3.], [7., 8.]],       # (1+3)/2, (2+4)/2 ; (5+7+9)/3, (6+8+10)/3
    CLS: [[1., 2.], [5., 6.]],        # first real token
    LastToken: [[3., 4.], [9., 10.]],  # last real token
    # weights 1,2 over 3: (1·1+2·3)/3, (1·2+2·4)/3 ; weights 1,2,3 over 6: (5+14+27)/6, (6+16+30)/6
    WeightedMean: [[7 / 3, 10 / 3], [46 / 6, 52 / 6]],
    Max: [[3., 4.], [9., 10.]],       # the pads' 100s never win
}
ALL = list(EXPECTED)


@pytest.mark.parametrize("pool", ALL)
@pytest.mark.parametrize("hidden,mask", [(RIGHT, RIGHT_MASK), (LEFT, LEFT_MASK)], ids=["right", "left"])
def test_pooling_hand_computed(pool, hidden, mask):
    torch.testing.assert_close(pool()(hidden, mask), torch.tensor(EXPECTED[pool]))


@pytest.mark.parametrize("pool", [Mean, WeightedMean, Max])
def test_empty_mask_gives_zeros_not_nan(pool):
    out = pool()(torch.ones(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
    assert torch.equal(out, torch.zeros(1, 3))


def test_max_ignores_padding_even_when_every_real_value_is_negative():
    hidden = torch.tensor([[[-5., -1.], [-3., -2.], [0., 0.]]])  # the pad holds 0 > every real value
    torch.testing.assert_close(Max()(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[-3., -1.]]))


def test_a_nan_in_padding_does_not_leak_into_the_mean():
    hidden = torch.tensor([[[1., 2.], [float("nan"), float("nan")]]])
    for pool in (Mean(), WeightedMean(), Max()):
        assert torch.isfinite(pool(hidden, torch.tensor([[1, 0]]))).all()


# each text starts with a 1-token prompt: [1,2] in the padded text, [5,6] in the full one
PROMPT_RIGHT = torch.tensor([[1, 0, 0], [1, 0, 0]])
PROMPT_LEFT = torch.tensor([[0, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("hidden,mask,prompt", [(RIGHT, RIGHT_MASK, PROMPT_RIGHT), (LEFT, LEFT_MASK, PROMPT_LEFT)],
                         ids=["right", "left"])
def test_prompt_exclusion_hand_computed(hidden, mask, prompt):
    # mean: [3,4] alone; [7,8],[9,10] -> [8,9]. weighted: the kept tokens keep their positions (2; 2 and 3):
    # [3,4]; (2·7+3·9)/5, (2·8+3·10)/5
    torch.testing.assert_close(Mean(exclude_prompt=True)(hidden, mask, prompt), torch.tensor([[3., 4.], [8., 9.]]))
    torch.testing.assert_close(WeightedMean(exclude_prompt=True)(hidden, mask, prompt),
                               torch.tensor([[3., 4.], [41 / 5, 46 / 5]]))
    # without exclude_prompt the prompt mask changes nothing
    torch.testing.assert_close(Mean()(hidden, mask, prompt), torch.tensor(EXPECTED[Mean]))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention_mask \[B,T\]"):
        Mean()(torch.ones(2, 3, 4), torch.ones(2, 4))


@pytest.mark.parametrize("pool", ALL, ids=lambda p: p.__name__)
def test_single_text_equals_same_text_in_padded_batch(tiny_bert, pool):
    from embtune.model import from_pretrained

    model = from_pretrained(tiny_bert, pooling=pool())
    text = "a short text"
    alone = model.encode([text])
    batch = model.encode(["a much longer text that forces padding of the short one " * 3, text])
    assert abs(alone[0] - batch[1]).max() < 1e-5


@pytest.mark.parametrize("pool", ALL, ids=lambda p: p.__name__)
def test_left_padding_equals_right_padding_on_an_encoder(tiny_bert, pool):
    from embtune.model import from_pretrained

    model = from_pretrained(tiny_bert, pooling=pool())
    texts = ["a short text", "a much longer text that forces padding of the short one"]
    right = model.encode(texts)
    model.tokenizer.padding_side = "left"  # positions come from the mask, so BERT's absolute positions match
    assert abs(model.encode(texts) - right).max() < 1e-5
