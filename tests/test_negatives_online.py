"""Online hard mining: the k hardest (or the semi-hard) in-batch negatives per anchor."""

import json

import pytest
import torch

from embtune.losses.hinge import Hinge
from embtune.losses.info_nce import InfoNCE
from embtune.negatives.online_hard import OnlineHard

INF = float("-inf")


def test_hardest_keeps_the_k_most_similar_negatives_and_the_positive():
    scores = torch.tensor([[0.9, 0.2, 0.7, 0.5],
                           [0.1, 0.8, 0.3, 0.6]])
    target = torch.tensor([0, 1])
    kept = OnlineHard(k=2).select(scores, target)
    # row 0: positive col 0, hardest negatives 0.7 (col 2) and 0.5 (col 3); row 1: positive col 1, 0.6, 0.3
    torch.testing.assert_close(kept, torch.tensor([[0.9, INF, 0.7, 0.5], [INF, 0.8, 0.3, 0.6]]))


def test_a_negative_harder_than_the_positive_is_kept_by_hardest():
    kept = OnlineHard(k=1).select(torch.tensor([[0.4, 0.9, 0.1]]), torch.tensor([0]))
    torch.testing.assert_close(kept, torch.tensor([[0.4, 0.9, INF]]))


def test_semi_hard_keeps_negatives_between_the_positive_and_the_margin():
    # s_p = 0.5, m = 0.2: window (0.3, 0.5). 0.6 is harder than the positive, 0.2 beyond the margin
    scores = torch.tensor([[0.5, 0.6, 0.45, 0.35, 0.2]])
    kept = OnlineHard(k=8, selection="semi_hard", margin=0.2).select(scores, torch.tensor([0]))
    torch.testing.assert_close(kept, torch.tensor([[0.5, INF, 0.45, 0.35, INF]]))
    kept1 = OnlineHard(k=1, selection="semi_hard", margin=0.2).select(scores, torch.tensor([0]))
    torch.testing.assert_close(kept1, torch.tensor([[0.5, INF, 0.45, INF, INF]]))  # the harder of the two


def test_an_anchor_without_semi_hard_negatives_keeps_only_its_positive():
    kept = OnlineHard(k=2, selection="semi_hard", margin=0.1).select(torch.tensor([[0.5, 0.9, 0.1]]),
                                                                    torch.tensor([0]))
    torch.testing.assert_close(kept, torch.tensor([[0.5, INF, INF]]))
    assert Hinge(margin=0.1)(kept, torch.tensor([0])).item() == 0.0  # no pair: adds nothing


def test_masked_candidates_are_never_selected():
    # col 1 is a false negative or padding (-inf): the one real negative is all that is kept at k = 2
    kept = OnlineHard(k=2).select(torch.tensor([[0.5, INF, 0.1]]), torch.tensor([0]))
    torch.testing.assert_close(kept, torch.tensor([[0.5, INF, 0.1]]))


def test_k_at_least_the_number_of_negatives_changes_nothing():
    scores = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 3])
    assert torch.equal(OnlineHard(k=5).select(scores, target), scores)


def test_hinge_on_the_hardest_negative_and_its_gradient():
    scores = torch.tensor([[0.5, 0.45, 0.1, 0.0]], requires_grad=True)
    kept = OnlineHard(k=1).select(scores, torch.tensor([0]))
    loss = Hinge(margin=0.2)(kept, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.2 - (0.5 - 0.45))  # only the 0.45 pair counts
    torch.testing.assert_close(scores.grad, torch.tensor([[-1.0, 1.0, 0.0, 0.0]]))  # none to dropped negatives


def test_info_nce_over_the_kept_candidates():
    scores = torch.tensor([[0.5, 0.3, 0.2, -0.1]])
    kept = OnlineHard(k=1).select(scores, torch.tensor([0]))
    tau = 0.1
    expected = -torch.log(torch.exp(torch.tensor(5.0)) / (torch.exp(torch.tensor(5.0)) + torch.exp(torch.tensor(3.0))))
    assert InfoNCE(temperature=tau, symmetric=False)(kept, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_candidates_as_in_batch_or_with_data_negatives():
    a, p = torch.eye(2), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scores, target = OnlineHard(k=1)(a, p)
    torch.testing.assert_close(scores, a @ p.T)
    hard = OnlineHard(k=1, group_size=2)
    assert hard.needs_negatives and not OnlineHard().needs_negatives
    scores, _ = hard(a, p, torch.zeros(2, 1, 2))
    assert scores.shape == (2, 4) and target.tolist() == [0, 1]


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k must be"), ({"selection": "easy"}, "selection"),
                                          ({"margin": -1}, "margin"), ({"group_size": 0}, "group_size")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineHard(**kwargs)


def test_training_with_online_hard_mining_logs_at_most_k_plus_one_candidates(tmp_path, tiny_bert):
    from test_train import _run

    summary = _run(tmp_path, tiny_bert, ["negatives=online_hard", "negatives.k=2", "negatives.selection=hardest",
                                         "eval.before=false", "eval.after=false"])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert summary["steps"] == 2 and [e["train/candidates"] for e in events] == [3.0, 3.0]


def test_semi_hard_with_a_margin_loss_trains(tmp_path, tiny_bert):
    from test_train import _run

    summary = _run(tmp_path, tiny_bert, ["negatives=online_hard", "negatives.selection=semi_hard", "loss=triplet",
                                         "eval.before=false", "eval.after=false"])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert summary["steps"] == 2 and all(1 <= e["train/candidates"] <= 9 for e in events)
