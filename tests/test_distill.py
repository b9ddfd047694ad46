"""Distillation: KL over the candidate list, Margin-MSE, teacher scores from the data or a cross-encoder."""

import json
import math
import random

import pytest
import torch
from conftest import DATA, NOT_A_MODEL
from hydra.utils import instantiate

from embtune.data.batching import candidate_batch
from embtune.data.formats import Example, MultiNegative, Triplet
from embtune.losses.distill_kl import DistillKL
from embtune.losses.margin_mse import MarginMSE
from embtune.model.cross_encoder import CrossEncoderTeacher, score_examples
from embtune.negatives import Hard, InBatch

NLI = DATA / "triplets" / "flagembedding_nli_example.jsonl"


def test_kl_equals_the_hand_computed_value():
    # p = softmax([2, 0]) = (0.8808, 0.1192); q = softmax([0.9, 0.5]) = (0.5987, 0.4013)
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    q = [math.exp(0.9) / (math.exp(0.9) + math.exp(0.5)), math.exp(0.5) / (math.exp(0.9) + math.exp(0.5))]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert expected == pytest.approx(0.195363, abs=1e-6)
    loss = DistillKL(temperature=1.0, teacher_temperature=1.0)
    got = loss(torch.tensor([[0.9, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[True, True]]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_kl_uses_both_temperatures_and_ignores_padding():
    # τ = 0.1 and τ_t = 2 turn scores [0.09, 0.05] and teacher [4, 0] into the case above; column 2 is padding
    loss = DistillKL(temperature=0.1, teacher_temperature=2.0)
    got = loss(torch.tensor([[0.09, 0.05, 0.9]]), torch.tensor([[4.0, 0.0, 9.0]]), torch.tensor([[True, True, False]]))
    assert got.item() == pytest.approx(0.195363, abs=1e-5)


def test_kl_is_zero_when_the_student_matches_the_teacher_and_its_gradient_is_q_minus_p():
    s = torch.tensor([[0.3, 0.1, -0.2]], requires_grad=True)
    t = torch.tensor([[0.3, 0.1, -0.2]])
    loss = DistillKL(temperature=1.0)(s, t, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(s.grad, torch.zeros(1, 3), atol=1e-7, rtol=0)
    s2 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    DistillKL(temperature=1.0)(s2, torch.tensor([[math.log(3), 0.0]]), torch.ones(1, 2, dtype=torch.bool)).backward()
    torch.testing.assert_close(s2.grad, torch.tensor([[0.5 - 0.75, 0.5 - 0.25]]))  # ∂KL/∂s = (q − p)/τ


def test_margin_mse_equals_the_hand_computed_value():
    # student margins (0.9−0.5)/0.1 = 4, (0.9−0.7)/0.1 = 2; teacher margins 3−1 = 2, 3−2 = 1; errors 2², 1²
    loss = MarginMSE(temperature=0.1, teacher_temperature=1.0)
    s, t = torch.tensor([[0.9, 0.5, 0.7]]), torch.tensor([[3.0, 1.0, 2.0]])
    assert loss(s, t, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx((4 + 1) / 2)
    assert loss(s, t, torch.tensor([[True, True, False]])).item() == pytest.approx(4.0)  # padding ignored


def test_margin_mse_gradient():
    s = torch.tensor([[0.9, 0.5]], requires_grad=True)
    MarginMSE(temperature=1.0)(s, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool)).backward()
    # d/ds_p (s_p − s_n − 1)² = 2·(0.4 − 1) = −1.2
    torch.testing.assert_close(s.grad, torch.tensor([[-1.2, 1.2]]))


def test_bad_temperatures_and_shapes_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        MarginMSE(temperature=0)
    with pytest.raises(ValueError, match="shape"):
        MarginMSE()(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))


def test_teacher_scores_are_read_from_flagembedding_rows():
    rows = [json.loads(x) for x in NLI.read_text().splitlines()]
    fmt = MultiNegative(positive_scores="pos_scores", negative_scores="neg_scores")
    examples = fmt(rows)
    assert examples[0].positive_score == rows[0]["pos_scores"][0] == 98.1875
    assert examples[0].negative_scores == tuple(rows[0]["neg_scores"]) == (82.25,)
    assert Triplet("query", "pos", "neg", "pos_scores", "neg_scores")(rows)[0].negative_scores == (82.25,)


def test_scores_of_the_wrong_length_name_file_row_and_field():
    rows = [{"query": "q", "pos": ["p"], "neg": ["a", "b"], "pos_scores": [1.0], "neg_scores": [0.5]}]
    fmt = MultiNegative(positive_scores="pos_scores", negative_scores="neg_scores")
    with pytest.raises(ValueError, match=r"train.jsonl:7: field 'neg_scores' must be a list of 2 numbers"):
        fmt(rows, [("train.jsonl", 7)])
    rows[0]["neg_scores"] = [0.5, "high"]
    with pytest.raises(ValueError, match=r"train.jsonl:7: field 'neg_scores' must be a finite number"):
        fmt(rows, [("train.jsonl", 7)])


def test_sampled_negatives_carry_their_own_teacher_scores(tiny_bert):
    from embtune.model import from_pretrained
    from embtune.model.pooling import Mean

    model = from_pretrained(tiny_bert, pooling=Mean())
    examples = [Example("q", "p", ("n1", "n2", "n3"), 9.0, (1.0, 2.0, 3.0)),
                Example("r", "s", ("m1",), 8.0, (5.0,))]  # one negative: the second slot is padding
    batch = candidate_batch(model, examples, group_size=3, rng=random.Random(1), teacher=True)
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["negative"]["input_ids"]]
    assert batch["teacher"][:, 0].tolist() == [9.0, 8.0]
    for j in range(2):  # each sampled text's score is the one written next to it
        assert batch["teacher"][0, 1 + j].item() == float(texts[j][-1])
    assert batch["negative_mask"][1].tolist() == [True, False] and batch["teacher"][1].tolist() == [8.0, 5.0, 0.0]


def test_cross_encoder_teacher_scores_pairs_as_the_model_does(tiny_cross_encoder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = CrossEncoderTeacher(tiny_cross_encoder, batch_size=2)
    examples = [Example("how to sort", "sorted(xs)", ("open(f)", "len(xs)")), Example("how to sort", "sorted(xs)")]
    scored = score_examples(teacher, examples)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    tok = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    with torch.no_grad():
        direct = model(**tok(["how to sort"] * 3, ["sorted(xs)", "open(f)", "len(xs)"], padding=True,
                             return_tensors="pt")).logits[:, 0].tolist()
    assert scored[0].positive_score == pytest.approx(direct[0], abs=1e-5)
    assert scored[0].negative_scores == pytest.approx(direct[1:], abs=1e-5)
    assert scored[1].positive_score == scored[0].positive_score and scored[1].negative_scores == ()


class _Loss:
    def __init__(self, name, kind):
        self.name, self.input_kind = name, kind


def check_distillation(data_format, negatives, loss, teacher):
    """The pre-flight checks of the loss's objective (``embtune.objectives``) about a teacher."""
    from embtune.objectives import objective_for

    objective_for(loss, negatives).check(data_format, teacher)


def test_distillation_settings_that_cannot_work_are_refused_naming_the_options():
    kl = _Loss("distill_kl", "teacher_scores")
    scored = MultiNegative(positive_scores="pos_scores", negative_scores="neg_scores")
    with pytest.raises(ValueError, match="negatives=hard .* not negatives=in_batch"):
        check_distillation(scored, InBatch(), kl, None)
    with pytest.raises(ValueError, match="needs teacher scores: set teacher=cross_encoder"):
        check_distillation(MultiNegative(), Hard(3), kl, None)
    with pytest.raises(ValueError, match="loss=info_nce does not distil"):
        check_distillation(MultiNegative(), Hard(3), _Loss("info_nce", "scores"), CrossEncoderTeacher("x"))
    with pytest.raises(ValueError, match="pick one"):
        check_distillation(scored, Hard(3), kl, CrossEncoderTeacher("x"))
    check_distillation(scored, Hard(3), kl, None)  # fine: scores from the data


def _train(tmp_path, tiny_bert, overrides):
    from test_train import _run

    summary = _run(tmp_path, tiny_bert, ["data=jsonl", "negatives=hard", "negatives.group_size=3",
                                         "data_format=multi_negative", "train.max_steps=3", *overrides])
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    return summary, events


@pytest.mark.parametrize("loss", ["distill_kl", "margin_mse"])
def test_distillation_from_a_tiny_cross_encoder_runs_end_to_end(tmp_path, tiny_bert, tiny_cross_encoder, loss):
    toy = DATA / "triplets" / "flagembedding_toy_finetune_data.jsonl"
    summary, events = _train(tmp_path, tiny_bert, [f"data.path={toy}", f"loss={loss}", "teacher=cross_encoder",
                                                   f"teacher.name_or_path={tiny_cross_encoder}"])
    assert summary["steps"] == 3 and len(events) == 3
    assert all(math.isfinite(e["train/loss"]) and e["train/loss"] > 0 for e in events)
    assert (tmp_path / "model" / "embtune.json").is_file()


def test_distillation_from_scores_in_the_data_runs_end_to_end(tmp_path, tiny_bert):
    summary, events = _train(tmp_path, tiny_bert, [f"data.path={DATA / 'triplets' / 'flagembedding_nq_example.jsonl'}",
                                                   "loss=distill_kl", "data_format.positive_scores=pos_scores",
                                                   "data_format.negative_scores=neg_scores"])
    assert summary["steps"] == 3 and all(math.isfinite(e["train/loss"]) for e in events)


def test_a_distillation_loss_without_scores_fails_before_the_model_loads(tmp_path):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from embtune.recipes.finetune import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=jsonl", f"data.path={NLI}", "data_format=multi_negative", "negatives=hard", "loss=margin_mse",
            f"model.name_or_path={NOT_A_MODEL}"])
    with pytest.raises(ValueError, match="loss=margin_mse needs teacher scores"):
        train(cfg, tmp_path, logger=None)
    assert instantiate(cfg.loss).input_kind == "teacher_scores"
