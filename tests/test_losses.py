"""InfoNCE against hand-computed values."""

import math

import pytest
import torch

from embtune.losses.info_nce import InfoNCE

SCORES = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
TARGET = torch.tensor([0, 1])


def test_info_nce_hand_computed():
    # τ = 0.1: logits [[9, 1], [2, 8]]; -log softmax of the positive:
    # row 0: log(1 + e^(1-9)) = log1p(e^-8); row 1: log1p(e^(2-8)) = log1p(e^-6)
    expected = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-6))) / 2  # = 0.00140554...
    loss = InfoNCE(temperature=0.1, symmetric=False)(SCORES, TARGET)
    # float32 softmax: absolute error ~1e-7 on a value of ~1e-3
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert loss.item() == pytest.approx(0.0014055455, abs=1e-7)


def test_info_nce_label_smoothing_hand_computed():
    # ε = 0.1, C = 2: loss = -(1-ε+ε/C)·log p_pos - ε/C·log p_neg
    # with log p_pos = -log1p(e^-Δ), log p_neg = -Δ - log1p(e^-Δ):  loss = log1p(e^-Δ) + ε/C·Δ
    # row 0: Δ = 8 -> 0.000335406 + 0.4 ; row 1: Δ = 6 -> 0.002475685 + 0.3
    expected = (math.log1p(math.exp(-8)) + 0.4 + math.log1p(math.exp(-6)) + 0.3) / 2  # = 0.35140554...
    loss = InfoNCE(temperature=0.1, label_smoothing=0.1, symmetric=False)(SCORES, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_info_nce_hand_computed():
    # reverse direction, τ = 0.1: logits [[9, 2], [1, 8]] (column j = anchor j against positive j's row)
    # row 0: log1p(e^(2-9)); row 1: log1p(e^(1-8)); loss = mean of the two directions
    forward = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-6))) / 2
    reverse = math.log1p(math.exp(-7))
    loss = InfoNCE(temperature=0.1, symmetric=True)(SCORES, TARGET)
    assert loss.item() == pytest.approx((forward + reverse) / 2, abs=1e-7)
    assert loss.item() == pytest.approx(0.0011585058, abs=1e-7)


def test_symmetric_reverse_reads_only_the_positives_columns_and_keeps_masks():
    # anchor i's positive at column 2 - i; column 1 is a hard negative of no anchor;
    # anchor 1 has anchor 0's positive masked (a false negative)
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.4, float("-inf")]])
    target = torch.tensor([2, 0])
    tau = 0.5
    # reverse rows: positive 0 (col 2) against anchors [0.9, -inf]; positive 1 (col 0) against [0.1, 0.3]
    forward = InfoNCE(temperature=tau, symmetric=False)(scores, target).item()
    reverse = (0.0 + math.log1p(math.exp((0.1 - 0.3) / tau))) / 2
    loss = InfoNCE(temperature=tau, symmetric=True)(scores, target)
    assert loss.item() == pytest.approx((forward + reverse) / 2, rel=1e-6)


def test_learnable_temperature_gets_a_gradient_and_is_clamped():
    loss_fn = InfoNCE(temperature=0.05, learnable=True, min_temperature=0.02, max_temperature=0.5)
    assert loss_fn.temperature == pytest.approx(0.05)
    loss_fn(SCORES, TARGET).backward()
    assert loss_fn.log_inv_temperature.grad is not None and loss_fn.log_inv_temperature.grad != 0
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(math.log(1 / 0.001))  # τ = 0.001, below the floor
    assert loss_fn.temperature == pytest.approx(0.02)


def test_fixed_temperature_is_not_a_parameter():
    assert list(InfoNCE(temperature=0.05).parameters()) == []


def test_low_temperature_stays_finite():
    scores = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.isfinite(InfoNCE(temperature=0.01)(scores, TARGET))


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature"),
                                          ({"label_smoothing": 1.0}, "label_smoothing"),
                                          ({"min_temperature": 0.5, "max_temperature": 0.1}, "min_temperature")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoNCE(**kwargs)


def test_padded_candidate_changes_nothing_even_with_label_smoothing():
    padded = torch.cat([SCORES, torch.full((2, 1), float("-inf"))], dim=1)
    for eps in (0.0, 0.1):
        loss_fn = InfoNCE(temperature=0.1, label_smoothing=eps)
        assert loss_fn(padded, TARGET).item() == pytest.approx(loss_fn(SCORES, TARGET).item(), abs=1e-7)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_gradcheck(symmetric):
    scores = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]], dtype=torch.float64, requires_grad=True)
    loss_fn = InfoNCE(temperature=0.5, label_smoothing=0.1, symmetric=symmetric)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, TARGET), (scores,))
