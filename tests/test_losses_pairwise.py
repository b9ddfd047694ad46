"""Pairwise losses on scores (binary, logistic, hinge, triplet) against hand-computed values."""

import math

import pytest
import torch

from embtune.losses.binary import Binary
from embtune.losses.hinge import Hinge
from embtune.losses.logistic import Logistic
from embtune.losses.triplet import Triplet

# Two anchors, three candidates; the positive is column 0 for row 0 and column 1 for row 1.
SCORES = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.6]])
TARGET = torch.tensor([0, 1])
# gaps s_p − s_n over the four (positive, negative) pairs: row 0: 0.4, 0.8; row 1: 0.6, 0.2
LOGISTIC_AT_01 = (math.log1p(math.exp(-4)) + math.log1p(math.exp(-8))  # τ = 0.1: gaps/τ = 4, 8, 6, 2
                  + math.log1p(math.exp(-6)) + math.log1p(math.exp(-2))) / 4  # = 0.03697222...


def test_logistic_hand_computed():
    loss = Logistic(temperature=0.1)(SCORES, TARGET)
    assert loss.item() == pytest.approx(LOGISTIC_AT_01, abs=1e-7)
    assert loss.item() == pytest.approx(0.0369722, abs=1e-7)


def test_binary_without_smoothing_equals_logistic():
    # −log σ(x) = log(1 + e^−x): RankNet's cost with target probability 1 is the logistic loss
    assert Binary(temperature=0.1)(SCORES, TARGET).item() == pytest.approx(LOGISTIC_AT_01, abs=1e-7)


def test_binary_label_smoothing_hand_computed():
    # ε = 0.2, P̄ = 0.9: −0.9·log σ(x) − 0.1·log σ(−x) = 0.9·softplus(−x) + 0.1·softplus(x)
    #   = softplus(−x) + 0.1·x, since softplus(x) = x + softplus(−x)
    # mean over pairs: LOGISTIC_AT_01 + 0.1·(4 + 8 + 6 + 2)/4 = 0.03697222 + 0.5
    loss = Binary(temperature=0.1, label_smoothing=0.2)(SCORES, TARGET)
    assert loss.item() == pytest.approx(LOGISTIC_AT_01 + 0.5, abs=1e-6)


def test_hinge_hand_computed():
    # m = 0.5: max(0, 0.5 − gap) over gaps 0.4, 0.8, 0.6, 0.2 -> 0.1, 0, 0, 0.3; mean = 0.1
    assert Hinge(margin=0.5)(SCORES, TARGET).item() == pytest.approx(0.1, abs=1e-6)


def test_hinge_margin_zero_is_the_plain_form():
    # m = 0: max(0, s_n − s_p); every pair above is ordered -> 0; a mis-ordered pair costs s_n − s_p
    assert Hinge(margin=0.0)(SCORES, TARGET).item() == 0.0
    assert Hinge(margin=0.0)(torch.tensor([[0.3, 0.5]]), torch.tensor([0])).item() == pytest.approx(0.2)


def test_triplet_cosine_hardest_hand_computed():
    # d = 1 − s. Row 0: d_p = 0.1, hardest negative s = 0.5 -> d_n = 0.5; m = 0.5: 0.1 − 0.5 + 0.5 = 0.1
    # row 1: d_p = 0.2, hardest s = 0.6 -> d_n = 0.4: 0.2 − 0.4 + 0.5 = 0.3; mean = 0.2
    assert Triplet(margin=0.5)(SCORES, TARGET).item() == pytest.approx(0.2, abs=1e-6)


def test_triplet_cosine_mean_over_negatives_equals_hinge():
    # d(a,p) − d(a,n) = s_n − s_p, so the cosine form averaged over negatives is the hinge: 0.1 (above)
    loss = Triplet(margin=0.5, reduction_over_negatives="mean")(SCORES, TARGET)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)


def test_triplet_euclidean_hand_computed():
    # d = sqrt(2 − 2s) for unit vectors; m = 1.
    # row 0: d_p = sqrt(0.2) = 0.4472136, hardest d_n = sqrt(2 − 1.0) = 1 -> 0.4472136
    # row 1: d_p = sqrt(0.4) = 0.6324555, hardest d_n = sqrt(0.8) = 0.8944272 -> 0.7380283; mean = 0.5926210
    expected = (math.sqrt(0.2) + math.sqrt(0.4) - math.sqrt(0.8) + 1) / 2
    loss = Triplet(margin=1.0, distance="euclidean")(SCORES, TARGET)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_triplet_euclidean_matches_the_distance_of_unit_vectors():
    torch.manual_seed(0)
    a, c = torch.nn.functional.normalize(torch.randn(2, 4, 8, dtype=torch.float64), dim=-1)
    scores, target = a @ c.T, torch.arange(4)
    dist = torch.cdist(a, c)
    expected = (dist.diagonal() - dist.masked_fill(torch.eye(4, dtype=torch.bool), math.inf).amin(1) + 0.3)
    loss = Triplet(margin=0.3, distance="euclidean")(scores, target)
    assert loss.item() == pytest.approx(expected.clamp(min=0).mean().item(), abs=1e-7)


LOSSES = {
    "binary": lambda: Binary(temperature=0.1, label_smoothing=0.1),
    "logistic": lambda: Logistic(temperature=0.1),
    "hinge": lambda: Hinge(margin=0.5),  # pairs at 0.1, −0.3, −0.1, 0.3: away from the kink
    "triplet_hardest": lambda: Triplet(margin=0.5),
    "triplet_mean": lambda: Triplet(margin=0.5, reduction_over_negatives="mean"),
    "triplet_euclidean": lambda: Triplet(margin=1.0, distance="euclidean"),
}


@pytest.mark.parametrize("make", LOSSES.values(), ids=LOSSES.keys())
def test_computes_in_float64(make):
    assert make()(SCORES.double(), TARGET).dtype == torch.float64


@pytest.mark.parametrize("make,expected", [
    (lambda: Binary(), math.log(2)),  # every gap 0: −log σ(0) = log 2
    (lambda: Binary(label_smoothing=0.3), math.log(2)),  # at x = 0 the smoothing term ε/2·x vanishes
    (lambda: Logistic(), math.log(2)),
    (lambda: Hinge(margin=0.2), 0.2),  # max(0, 0.2 − 0)
    (lambda: Triplet(margin=0.2), 0.2),  # d_p = d_n
    (lambda: Triplet(margin=0.2, distance="euclidean"), 0.2),
], ids=["binary", "binary_smoothed", "logistic", "hinge", "triplet", "triplet_euclidean"])
def test_all_equal_scores(make, expected):
    assert make()(torch.full((3, 4), 0.5), torch.tensor([0, 2, 3])).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("make", LOSSES.values(), ids=LOSSES.keys())
def test_one_candidate_has_no_pairs_and_costs_zero(make):
    scores = torch.tensor([[0.7], [0.1]], requires_grad=True)
    loss = make()(scores, torch.tensor([0, 0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("make", LOSSES.values(), ids=LOSSES.keys())
def test_padded_candidates_take_no_part(make):
    # negatives=hard scores padded negatives -inf: the loss and the real gradients must not change
    padded = torch.cat([SCORES, torch.full((2, 2), float("-inf"))], dim=1).requires_grad_()
    loss = make()(padded, TARGET)
    loss.backward()
    assert loss.item() == pytest.approx(make()(SCORES, TARGET).item(), abs=1e-7)
    assert (padded.grad[:, 3:] == 0).all() and torch.isfinite(padded.grad).all()
    # a row whose every negative is padding has no pair; the other row's pairs make the loss
    only_row_1 = SCORES.clone()
    only_row_1[0, 1:] = float("-inf")
    assert make()(only_row_1, TARGET).item() == pytest.approx(make()(SCORES[1:], TARGET[1:]).item(), abs=1e-7)


@pytest.mark.parametrize("make", [lambda: Binary(temperature=1e-4, label_smoothing=0.1),
                                  lambda: Logistic(temperature=1e-4)], ids=["binary", "logistic"])
def test_tiny_temperature_stays_finite_in_float32(make):
    # gaps of ±0.8 become ±8000 logits: exp would overflow, softplus / BCE-with-logits do not
    scores = torch.tensor([[0.1, 0.9], [0.9, 0.1]], requires_grad=True)
    loss = make()(scores, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    # row 0 is mis-ordered by 0.8: softplus(8000) = 8000; row 1: softplus(−8000) ≈ 0 -> mean ≈ 4000
    # (binary adds ε/2·x = ∓400 to the two pairs, which cancels in the mean)
    assert loss.item() == pytest.approx(4000, rel=1e-3)


@pytest.mark.parametrize("make,match", [
    (lambda: Binary(temperature=0), "temperature"), (lambda: Binary(label_smoothing=1.0), "label_smoothing"),
    (lambda: Logistic(temperature=-1), "temperature"), (lambda: Hinge(margin=-0.1), "margin"),
    (lambda: Triplet(margin=-0.1), "margin"), (lambda: Triplet(distance="manhattan"), "distance"),
    (lambda: Triplet(reduction_over_negatives="sum"), "reduction_over_negatives"),
])
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
