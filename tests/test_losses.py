"""InfoNCE against hand-computed values and gradients; the learnable temperature and its bounds."""

import math

import pytest
import torch
import torch.nn.functional as F

from embtune.losses.info_nce import InfoNCE
from embtune.training.optim import clamp_after_step

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
    # forward, logits / τ: row 0 [0.2, 1.0, 1.8] at column 2; row 1 [0.6, 0.8, -inf] at column 0
    forward = (math.log1p(math.exp(0.2 - 1.8) + math.exp(1.0 - 1.8)) + math.log1p(math.exp(0.8 - 0.6))) / 2
    # reverse rows: positive 0 (col 2) against anchors [0.9, -inf]; positive 1 (col 0) against [0.1, 0.3]
    reverse = (0.0 + math.log1p(math.exp((0.1 - 0.3) / tau))) / 2
    loss = InfoNCE(temperature=tau, symmetric=True)(scores, target)
    assert loss.item() == pytest.approx((forward + reverse) / 2, rel=1e-6)
    assert InfoNCE(temperature=tau, symmetric=False)(scores, target).item() == pytest.approx(forward, rel=1e-6)


def _theta_gradient(rows: list[tuple[float, float]], inv_tau: float) -> float:
    """d/dθ of the mean over rows of −log softmax(e^θ·[positive, negative])[0], θ = log(1/τ), two candidates:
    each row adds −(1/τ)·σ(−Δ/τ)·Δ with Δ = positive − negative (the derivative of log1p(e^(−Δ·e^θ)))."""
    return sum(-inv_tau * Δ / (1 + math.exp(Δ * inv_tau)) for Δ in (pos - neg for pos, neg in rows)) / len(rows)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tau", [0.05, 0.009])  # 0.009: below min_temperature (0.01), as after an overshoot
def test_learnable_temperature_gradient_is_the_formula_also_outside_the_bounds(tau, symmetric):
    scores = torch.tensor([[0.30, 0.29], [0.20, 0.21]])  # close scores: σ(−Δ/τ) is far from 0 even at τ = 0.009
    loss_fn = InfoNCE(temperature=0.05, learnable=True, symmetric=symmetric)
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(math.log(1 / tau))
    loss_fn(scores, TARGET).backward()
    inv_tau = loss_fn.log_inv_temperature.exp().item()  # 1/τ as the float32 parameter holds it
    forward = _theta_gradient([(0.30, 0.29), (0.21, 0.20)], inv_tau)
    # reverse: positive 0 against anchors [0.30, 0.20], positive 1 against [0.21, 0.29]
    expected = (forward + _theta_gradient([(0.30, 0.20), (0.21, 0.29)], inv_tau)) / 2 if symmetric else forward
    assert loss_fn.log_inv_temperature.grad.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.temperature == pytest.approx(tau, rel=1e-6)  # the value the loss used, not a clamped one


def test_clamp_temperature_puts_the_parameter_back_into_the_bounds():
    loss_fn = InfoNCE(temperature=0.05, learnable=True, min_temperature=0.02, max_temperature=0.5)
    for tau, clamped in ((0.001, 0.02), (3.0, 0.5), (0.1, 0.1)):
        with torch.no_grad():
            loss_fn.log_inv_temperature.fill_(math.log(1 / tau))
        loss_fn.clamp_temperature()
        assert loss_fn.log_inv_temperature.item() == pytest.approx(math.log(1 / clamped), abs=1e-6)
    fixed = InfoNCE(temperature=0.005)  # a fixed τ is not bounded (SimCSE's small temperatures)
    fixed.clamp_temperature()
    assert fixed.temperature == pytest.approx(0.005)


def test_learnable_temperature_comes_back_from_an_overshoot_under_adamw():
    """CLIP's rule end to end: τ pushed to 0.009 (below min 0.01), 200 AdamW steps (lr 0.05, no weight decay,
    as the loop's group for loss parameters), clamping after each step, reach the τ that minimises this
    batch's loss, found by a grid search over τ with torch's cross-entropy."""
    g = torch.Generator().manual_seed(0)
    anchor = F.normalize(torch.randn(32, 64, generator=g), dim=-1)
    positive = F.normalize(anchor + 0.375 * torch.randn(32, 64, generator=g), dim=-1)  # cos ≈ 0.35
    scores, target = anchor @ positive.T, torch.arange(32)
    grid = torch.logspace(-2, -1, 2001, dtype=torch.float64)
    s = scores.double()
    best = grid[torch.stack([F.cross_entropy(s / t, target) + F.cross_entropy(s.T / t, target) for t in grid]).argmin()]
    assert 0.02 < best < 0.08  # well inside [0.01, 1.0]

    loss_fn = InfoNCE(temperature=0.05, learnable=True)
    with torch.no_grad():
        loss_fn.log_inv_temperature.fill_(math.log(1 / 0.009))
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(200):
        loss_fn(scores, target).backward()
        optimizer.step()
        optimizer.zero_grad()
        clamp_after_step(loss_fn)
    assert loss_fn.temperature == pytest.approx(best.item(), rel=2e-3)


def test_fixed_temperature_is_not_a_parameter():
    assert list(InfoNCE(temperature=0.05).parameters()) == []


def test_low_temperature_stays_finite():
    scores = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.isfinite(InfoNCE(temperature=0.01)(scores, TARGET))


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0}, "temperature"),
                                          ({"label_smoothing": 1.0}, "label_smoothing"),
                                          ({"min_temperature": 0.5, "max_temperature": 0.1}, "min_temperature"),
                                          ({"temperature": 0.005, "learnable": True},
                                           r"loss.temperature=0.005 with loss.learnable=true must lie in "
                                           r"\[loss.min_temperature, loss.max_temperature\] = \[0.01, 1.0\]")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InfoNCE(**kwargs)


def test_padded_candidate_changes_nothing_even_with_label_smoothing():
    # symmetric (the default), τ = 0.1, padded with a -inf column: the hand-computed values of the two tests
    # above, forward (ε = 0) log1p(e^-8), log1p(e^-6); (ε = 0.1, smoothing over the 2 real candidates) + 0.4,
    # + 0.3; reverse logits [[9, 2], [1, 8]] (the padded column is no anchor's positive): log1p(e^-7) + 0.35·ε/0.1
    padded = torch.cat([SCORES, torch.full((2, 1), float("-inf"))], dim=1).requires_grad_()
    for eps in (0.0, 0.1):
        forward = (math.log1p(math.exp(-8)) + math.log1p(math.exp(-6)) + (0.7 if eps else 0.0)) / 2
        reverse = math.log1p(math.exp(-7)) + (0.35 if eps else 0.0)
        loss = InfoNCE(temperature=0.1, label_smoothing=eps)(padded, TARGET)
        loss.backward()
        assert loss.item() == pytest.approx((forward + reverse) / 2, abs=1e-6)
        assert (padded.grad[:, 2] == 0).all() and torch.isfinite(padded.grad).all()
        padded.grad = None


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_gradient_is_softmax_minus_target_over_tau(symmetric):
    """The analytic gradient of smoothed cross-entropy (e.g. Szegedy et al. 2016): d loss / d logits =
    (softmax(logits) − q) / B per row, q = (1−ε)·onehot + ε/C; the scores' gradient is that over τ, and
    the reverse direction adds its rows' gradient (transposed) to the positives' columns."""
    scores = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]], dtype=torch.float64, requires_grad=True)
    tau, eps, target = 0.5, 0.1, torch.tensor([0, 1])
    InfoNCE(temperature=tau, label_smoothing=eps, symmetric=symmetric)(scores, target).backward()

    def row_grads(logits):  # per-row (softmax − q) / B, with numbers in Python floats
        out = []
        for i, row in enumerate(logits):
            z = [math.exp(v) for v in row]
            q = [(1 - eps) * (j == i) + eps / len(row) for j in range(len(row))]
            out.append([(zj / sum(z) - qj) / len(logits) for zj, qj in zip(z, q)])
        return out

    s = scores.detach().tolist()
    forward = row_grads([[v / tau for v in row] for row in s])  # targets 0, 1 are the diagonal here
    expected = [[g / tau * (0.5 if symmetric else 1.0) for g in row] for row in forward]
    if symmetric:  # reverse[j][i] = s[i][target[j]] = s[i][j] for j, i in {0, 1}: its gradient lands on s[i][j]
        reverse = row_grads([[s[i][j] / tau for i in range(2)] for j in range(2)])
        for j in range(2):
            for i in range(2):
                expected[i][j] += reverse[j][i] / tau * 0.5
    torch.testing.assert_close(scores.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
