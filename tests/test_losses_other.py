"""Multi-positive, SimCSE, scored-pair, listwise and ArcFace losses against hand-computed values;
every conf/loss option instantiates and matches its constructor."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

from embtune.losses.arcface import ArcFace
from embtune.losses.cosent import CoSENT
from embtune.losses.info_nce import InfoNCE
from embtune.losses.listwise import Listwise
from embtune.losses.multi_label_softmax import MultiLabelSoftmax
from embtune.losses.pointwise_bce import PointwiseBCE
from embtune.losses.simcse import SimCSE
from embtune.objectives import OBJECTIVES

SCORES = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.6]])


# --- multi_label_softmax --------------------------------------------------------------------------

def test_multi_label_softmax_hand_computed():
    # τ = 0.1: logits [[9, 5, 1], [2, 8, 6]]; row 0 positives {0, 1}, row 1 positive {1}
    # row 0: log(e^9 + e^5 + e^1) − log(e^9 + e^5) = log1p(e^-8 / (1 + e^-4)) = 0.000329375
    # row 1: log(e^2 + e^8 + e^6) − 8 = log1p(e^-6 + e^-2) = 0.129108909; mean = 0.064719142
    target = torch.tensor([[True, True, False], [False, True, False]])
    loss = MultiLabelSoftmax(temperature=0.1)(SCORES, target)
    assert loss.item() == pytest.approx(0.064719142, abs=1e-7)
    assert MultiLabelSoftmax(temperature=0.1)(SCORES, target.float()).item() == pytest.approx(loss.item())


def test_multi_label_softmax_with_one_positive_is_info_nce():
    # τ = 0.1: logits [[9, 5, 1], [2, 8, 6]], positives 2 and 1 (one each): −log softmax of the positive,
    # row 0: log(e^9 + e^5 + e^1) − 1 = 8 + log1p(e^-4 + e^-8); row 1: log1p(e^-6 + e^-2) — one-way InfoNCE
    expected = (8 + math.log1p(math.exp(-4) + math.exp(-8)) + math.log1p(math.exp(-6) + math.exp(-2))) / 2
    target = torch.tensor([2, 1])
    assert MultiLabelSoftmax(temperature=0.1)(SCORES, target).item() == pytest.approx(expected, rel=1e-6)
    assert InfoNCE(temperature=0.1, symmetric=False)(SCORES, target).item() == pytest.approx(expected, rel=1e-6)


def test_multi_label_softmax_edge_cases():
    # all-equal scores, k of C positive: −log(k/C)
    target = torch.tensor([[True, True, False, False]])
    assert MultiLabelSoftmax()(torch.full((1, 4), 0.3), target).item() == pytest.approx(math.log(2), abs=1e-6)
    # one candidate: log(1) = 0
    assert MultiLabelSoftmax()(torch.tensor([[0.7], [0.2]]), torch.tensor([0, 0])).item() == 0.0
    # τ = 1e-4: a positive 0.8 below the best negative gives a loss ≈ 0.8/τ = 8000, finite
    scores = torch.tensor([[0.1, 0.9, 0.1]], requires_grad=True)
    loss = MultiLabelSoftmax(temperature=1e-4)(scores, torch.tensor([[True, False, True]]))
    loss.backward()
    assert loss.item() == pytest.approx(8000 - math.log(2), rel=1e-4) and torch.isfinite(scores.grad).all()


def test_multi_label_softmax_padded_candidate_changes_nothing():
    target = torch.tensor([[True, True, False], [False, True, False]])
    padded = torch.cat([SCORES, torch.full((2, 1), float("-inf"))], dim=1).requires_grad_()
    loss = MultiLabelSoftmax(temperature=0.1)(padded, torch.cat([target, torch.zeros(2, 1, dtype=torch.bool)], 1))
    loss.backward()
    assert loss.item() == pytest.approx(0.064719142, abs=1e-7)
    assert (padded.grad[:, 3] == 0).all() and torch.isfinite(padded.grad).all()


def test_multi_label_softmax_rejects_bad_targets():
    with pytest.raises(ValueError, match=r"rows \[1\] of target have no positive"):
        MultiLabelSoftmax()(SCORES, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        MultiLabelSoftmax()(SCORES, torch.tensor([[0.5, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="shape of scores"):
        MultiLabelSoftmax()(SCORES, torch.ones(2, 2, dtype=torch.bool))


# --- simcse ---------------------------------------------------------------------------------------

def test_simcse_is_info_nce_that_encodes_the_anchor_twice():
    # same numbers as tests/test_losses.py: log1p(e^-8)/2 + log1p(e^-6)/2 = 0.0014055455
    scores, target = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1])
    loss_fn = SimCSE(temperature=0.1)
    assert isinstance(loss_fn, InfoNCE) and loss_fn.same_text_positive and loss_fn.name == "simcse"
    assert loss_fn(scores, target).item() == pytest.approx(0.0014055455, abs=1e-7)


def test_simcse_edge_cases():
    assert SimCSE()(torch.full((3, 3), 0.4), torch.arange(3)).item() == pytest.approx(math.log(3), abs=1e-6)
    assert SimCSE()(torch.tensor([[0.7]]), torch.tensor([0])).item() == 0.0
    tiny = SimCSE(temperature=1e-4, min_temperature=1e-5)  # τ below InfoNCE's default floor of 0.01
    assert tiny.temperature == pytest.approx(1e-4)
    assert torch.isfinite(tiny(torch.tensor([[0.1, 0.9], [0.9, 0.1]]), torch.tensor([0, 0])))


# --- cosent ---------------------------------------------------------------------------------------

def test_cosent_hand_computed():
    # gold 2 > 1 > 0, similarities 0.3, 0.5, 0.1, τ = 0.1; pairs (i, j) with y_i > y_j add e^((s_j − s_i)/τ):
    # (0,1): e^2, (0,2): e^-2, (1,2): e^-4 -> log(1 + e^2 + e^-2 + e^-4) = log(8.5427066) = 2.1450779
    loss = CoSENT(temperature=0.1)(torch.tensor([0.3, 0.5, 0.1]), torch.tensor([2.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx(2.1450779, abs=1e-6)


def test_cosent_ignores_ties_and_scale_of_gold_scores():
    # a fourth pair tied with pair 0 adds only its pairs with pairs 1 and 2: (3,1): e^(0.5−0.7)/τ = e^-2,
    # (3,2): e^((0.1−0.7)/τ) = e^-6; gold ×5 changes nothing
    scores, labels = torch.tensor([0.3, 0.5, 0.1, 0.7]), torch.tensor([2.0, 1.0, 0.0, 2.0])
    expected = math.log(1 + math.exp(2) + math.exp(-2) + math.exp(-4) + math.exp(-2) + math.exp(-6))
    assert CoSENT(temperature=0.1)(scores, labels).item() == pytest.approx(expected, abs=1e-6)
    assert CoSENT(temperature=0.1)(scores, labels * 5).item() == pytest.approx(expected, abs=1e-6)


def test_cosent_edge_cases():
    assert CoSENT()(torch.tensor([0.1, 0.9, 0.4]), torch.full((3,), 3.0)).item() == 0.0  # no ordered pair
    assert CoSENT()(torch.tensor([0.4]), torch.tensor([1.0])).item() == 0.0  # one pair
    # all-equal similarities: log(1 + number of ordered pairs) = log(1 + 3)
    assert CoSENT()(torch.full((3,), 0.5), torch.tensor([0.0, 1.0, 2.0])).item() == pytest.approx(math.log(4))
    scores = torch.tensor([0.9, 0.1], requires_grad=True)  # τ = 1e-4: loss ≈ 0.8/τ = 8000, finite
    loss = CoSENT(temperature=1e-4)(scores, torch.tensor([0.0, 1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(8000, rel=1e-4) and torch.isfinite(scores.grad).all()


# --- pointwise_bce --------------------------------------------------------------------------------

def test_pointwise_bce_hand_computed():
    # center 0.5, τ = 0.1: logits (0.9 − 0.5)/0.1 = 4 (label 1), (0.3 − 0.5)/0.1 = −2 (label 0)
    # mean(softplus(−4), softplus(−2)) = (0.0181499 + 0.1269280)/2 = 0.0725390
    loss = PointwiseBCE(temperature=0.1)(torch.tensor([0.9, 0.3]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.0725390, abs=1e-6)


def test_pointwise_bce_edge_cases():
    # similarity at the center: logit 0, BCE = log 2 whatever the label
    assert PointwiseBCE()(torch.full((3,), 0.5), torch.tensor([0.0, 0.5, 1.0])).item() == pytest.approx(math.log(2))
    scores = torch.tensor([0.0, 1.0], requires_grad=True)  # τ = 1e-4: logits −5000, 5000 with labels 1, 0
    loss = PointwiseBCE(temperature=1e-4)(scores, torch.tensor([1.0, 0.0]))
    loss.backward()
    assert loss.item() == pytest.approx(5000, rel=1e-4) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_pointwise_bce_rejects_labels_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]"):
        PointwiseBCE()(torch.tensor([0.2, 0.4]), torch.tensor([1.0, bad]))


# --- listwise -------------------------------------------------------------------------------------

LIST_SCORES = torch.tensor([[0.9, 0.5, 0.3], [0.2, 0.8, 0.6]])
LIST_TEACHER = torch.tensor([[2.0, 1.0, 7.0], [0.0, 0.0, 0.0]])
LIST_MASK = torch.tensor([[True, True, False], [True, True, True]])


def test_listwise_hand_computed():
    # τ = 0.1, τ_t = 1. Row 0 (third entry padding): p = softmax(2, 1) = (σ(1), σ(−1)) = (0.7310586, 0.2689414),
    # q = softmax(9, 5) = (σ(4), σ(−4)) = (0.9820138, 0.0179862); KL = Σ p·log(p/q) = 0.5117125
    # row 1: p uniform, q = softmax(2, 8, 6); KL = −log 3 − (1/3)·Σ log q = −log 3 − 16/3 + LSE(2, 8, 6)
    #        with LSE = 8 + log1p(e^-2 + e^-6): 1.6971633.  mean = 1.1044379
    loss = Listwise(temperature=0.1)(LIST_SCORES, LIST_TEACHER, LIST_MASK)
    assert loss.item() == pytest.approx(1.1044379, abs=1e-6)


def test_listwise_padding_takes_no_part():
    scores = torch.tensor([[0.9, 0.5, float("nan")]], requires_grad=True)
    teacher = torch.tensor([[2.0, 1.0, float("inf")]])
    loss = Listwise(temperature=0.1)(scores, teacher, torch.tensor([[True, True, False]]))
    loss.backward()
    assert loss.item() == pytest.approx(0.5117125, abs=1e-6)  # row 0 above
    assert scores.grad[0, 2] == 0 and torch.isfinite(scores.grad).all()


def test_listwise_edge_cases():
    one = Listwise()(torch.tensor([[0.3]]), torch.tensor([[5.0]]), torch.tensor([[True]]))
    assert one.item() == 0.0  # L = 1: both distributions are (1)
    # all-equal student and teacher scores: both uniform -> 0
    assert Listwise()(torch.full((2, 3), 0.5), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)).item() \
        == pytest.approx(0.0, abs=1e-7)
    # student = teacher when scores/τ = teacher/τ_t -> 0
    assert Listwise(temperature=0.1)(LIST_SCORES, LIST_SCORES * 10, LIST_MASK).item() == pytest.approx(0, abs=1e-6)
    scores = torch.tensor([[0.1, 0.9]], requires_grad=True)  # τ = 1e-4: KL ≈ p_0·8000 = σ(1)·8000, finite
    loss = Listwise(temperature=1e-4)(scores, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, True]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert loss.item() == pytest.approx(8000 / (1 + math.exp(-1)), rel=1e-3)


def test_listwise_rejects_a_fully_masked_row():
    with pytest.raises(ValueError, match=r"rows \[1\] have every document masked"):
        Listwise()(LIST_SCORES, LIST_TEACHER, torch.tensor([[True, True, False], [False, False, False]]))


# --- arcface --------------------------------------------------------------------------------------

def _plane_arcface(**kwargs) -> ArcFace:
    """3 classes in 2-D: centres at 0°, 90°, 180°."""
    loss_fn = ArcFace(num_classes=3, embedding_dim=2, adaptive_margin=False, **kwargs)
    with torch.no_grad():
        loss_fn.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return loss_fn


def _at(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), math.sin(a)]])


def test_arcface_hand_computed():
    # e at 60°, class 0; s = 10, m = 0.5: cos θ to the centres = 0.5, 0.8660254, −0.5
    # θ = π/3, θ + m = 1.5471976 < π -> target logit 10·cos(θ + m) = 0.2359659; others 8.660254, −5
    # CE = log(e^0.2359659 + e^8.660254 + e^-5) − 0.2359659 = 8.4245088
    loss = _plane_arcface(scale=10.0, margin=0.5)(_at(60) * 3, torch.tensor([0]))  # length does not matter
    assert loss.item() == pytest.approx(8.4245088, abs=1e-5)


def test_arcface_past_the_threshold_uses_the_linear_fallback():
    # e at 170°, class 0: cos θ = −0.9848078 <= cos(π − 0.5) = −0.8775826, so the target logit is
    # cos θ − m·sin m = −0.9848078 − 0.2397128 = −1.2245206 (easy_margin: cos θ itself)
    cos = math.cos(math.radians(170))
    others = [math.cos(math.radians(80)), math.cos(math.radians(10))]  # to 90° and 180°
    for easy, target_cos in ((False, cos - 0.5 * math.sin(0.5)), (True, cos)):
        logits = [10 * target_cos] + [10 * c for c in others]
        expected = math.log(sum(math.exp(x) for x in logits)) - logits[0]
        loss = _plane_arcface(scale=10.0, margin=0.5, easy_margin=easy)(_at(170), torch.tensor([0]))
        assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_arcface_margin_zero_is_scaled_softmax_on_cosines():
    torch.manual_seed(0)
    loss_fn = ArcFace(num_classes=5, embedding_dim=8, scale=20.0, margin=0.0, adaptive_margin=False)
    e, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    cos = F.normalize(e, dim=1) @ F.normalize(loss_fn.weight, dim=1).T
    torch.testing.assert_close(loss_fn(e, labels), F.cross_entropy(20.0 * cos, labels), rtol=0, atol=1e-6)


def test_arcface_adaptive_margins_from_class_counts():
    # n^-1/4 for counts 1, 16, 81 = 1, 0.5, 1/3 -> scaled to [0, 1]: 1, 0.25, 0
    # margins 0.1 + 0.4·(1, 0.25, 0) = 0.5, 0.2, 0.1: the rarest class gets the largest margin
    loss_fn = ArcFace(num_classes=3, embedding_dim=2, margin=0.5, margin_min=0.1)
    loss_fn.set_class_counts(torch.tensor([1, 16, 81]))
    torch.testing.assert_close(loss_fn.class_margins, torch.tensor([0.5, 0.2, 0.1]))
    loss_fn.set_class_counts(torch.tensor([7, 7, 7]))  # all alike: every class gets ``margin``
    torch.testing.assert_close(loss_fn.class_margins, torch.full((3,), 0.5))
    # with margins set, class 0's margin 0.5 makes the hand-computed value above
    with torch.no_grad():
        loss_fn.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    loss_fn.scale = 10.0
    loss_fn.set_class_counts(torch.tensor([1, 16, 81]))
    assert loss_fn(_at(60), torch.tensor([0])).item() == pytest.approx(8.4245088, abs=1e-5)


def test_arcface_computes_in_float64():
    torch.manual_seed(0)
    loss_fn = ArcFace(num_classes=4, embedding_dim=5, scale=8.0, margin=0.3, margin_min=0.1).double()
    loss_fn.set_class_counts(torch.tensor([3, 1, 10, 4]))
    e = torch.randn(6, 5, dtype=torch.float64)
    assert loss_fn(e, torch.tensor([0, 1, 2, 3, 2, 0])).dtype == torch.float64


def test_arcface_lazy_build_and_init_weights():
    loss_fn = instantiate(OmegaConf.load(CONF / "loss" / "arcface.yaml"))
    assert loss_fn.weight is None and loss_fn.temperature == pytest.approx(1 / 30)
    assert loss_fn.weight_lr_multiplier == 10.0
    with pytest.raises(RuntimeError, match="build"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]))
    means = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
    loss_fn.init_weights(means)
    torch.testing.assert_close(loss_fn.weight[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(loss_fn.weight[2], torch.tensor([0.0, 0.6, 0.8, 0.0]))
    assert loss_fn.weight[1].norm() > 0  # a class without texts keeps its random centre
    loss_fn.build(3, 4)  # same shape: no-op
    with pytest.raises(ValueError, match="already built"):
        loss_fn.build(5, 4)
    with pytest.raises(RuntimeError, match="set_class_counts"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1]))
    loss_fn.set_class_counts(torch.tensor([5, 0, 2]))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))
    assert torch.isfinite(loss_fn(torch.randn(2, 4), torch.tensor([0, 2])))


def test_arcface_edge_cases():
    # all-equal cosines (every centre the same), m = 0: CE of equal logits = log(number of classes)
    loss_fn = ArcFace(num_classes=3, embedding_dim=2, margin=0.0, adaptive_margin=False)
    with torch.no_grad():
        loss_fn.weight.copy_(torch.tensor([[1.0, 0.0]] * 3))
    assert loss_fn(_at(40), torch.tensor([1])).item() == pytest.approx(math.log(3), abs=1e-6)
    # one class: nothing to separate
    assert ArcFace(1, 2, adaptive_margin=False)(_at(40), torch.tensor([0])).item() == 0.0
    # τ = 1/s -> 0 (s = 1e4) stays finite, also with e exactly on its centre (θ = 0)
    big = _plane_arcface(scale=1e4, margin=0.5)
    e = torch.cat([_at(0), _at(120)]).requires_grad_()
    loss = big(e, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()


@pytest.mark.parametrize("kwargs,match", [({"scale": 0}, "scale"), ({"margin": -0.1}, "margin"),
                                          ({"margin": 0.2, "margin_min": 0.3}, "margin_min"),
                                          ({"num_classes": 3}, "both"), ({"margin_exponent": 0}, "exponent")])
def test_arcface_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArcFace(**kwargs)


# --- every option of conf/loss --------------------------------------------------------------------

LOSS_YAMLS = sorted((CONF / "loss").glob("*.yaml"))


@pytest.mark.parametrize("path", LOSS_YAMLS, ids=[p.stem for p in LOSS_YAMLS])
def test_yaml_keys_are_the_constructor_parameters(path):
    node = OmegaConf.load(path)
    cls = instantiate(node).__class__
    params = inspect.signature(cls).parameters
    keys = set(node) - {"_target_"}
    assert keys <= set(params), f"{path.name}: keys {keys - set(params)} are not parameters of {cls.__name__}"
    with_default = {k for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert with_default <= keys, f"{path.name}: defaults {with_default - keys} not written in the YAML"
    for k in keys:  # the YAML states the constructor's own defaults
        assert node[k] == params[k].default, f"{path.name}: {k} = {node[k]}, constructor default {params[k].default}"


@pytest.mark.parametrize("path", LOSS_YAMLS, ids=[p.stem for p in LOSS_YAMLS])
def test_every_loss_declares_its_interface(path):
    loss_fn = instantiate(OmegaConf.load(path))
    assert isinstance(loss_fn, torch.nn.Module)
    assert loss_fn.name == path.stem
    assert loss_fn.input_kind in OBJECTIVES  # a kind some objective trains (embtune.objectives)
    assert isinstance(loss_fn.needs_negatives, bool)
    for knob in (loss_fn.temperature, loss_fn.margin):
        assert knob is None or isinstance(knob, float)
