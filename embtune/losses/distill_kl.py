"""Distillation by KL divergence over each anchor's candidate list (positive + its hard negatives)."""

from __future__ import annotations

from embtune.losses.listwise import Listwise


class DistillKL(Listwise):
    """KL(teacher ‖ student) over each query's candidates, the positive and its K hard negatives
    (knowledge distillation, Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2;
    listwise distillation from a cross-encoder, RocketQAv2, Ren et al. 2021, §3.2):

        p = softmax(t / τ_t),   q = softmax(s / τ)     over the positive and the real negatives
        loss = mean over queries of  KL(p ‖ q) = Σ_j p_j·(log p_j − log q_j)

    The same formula as ``loss=listwise``; this loss takes its lists from the negatives of
    ``multi_negative``/``triplet`` data with teacher scores, read from the data
    (``data_format.positive_scores=pos_scores data_format.negative_scores=neg_scores``) or computed by a
    cross-encoder (``teacher=cross_encoder``). Needs ``negatives=hard`` (the list is the positive and
    its ``group_size − 1`` negatives). Padded negatives take no part.

    Args:
        temperature: τ > 0 (0.05), for the student's similarities.
        teacher_temperature: τ_t > 0 (1.0), for the teacher's scores (e.g. cross-encoder logits).
    Inputs:
        scores [B,1+K]: student similarity of each query to its positive (column 0) and its negatives.
        teacher [B,1+K]: the teacher's scores of the same pairs.
        mask [B,1+K] bool: True for real candidates.
    Raises:
        ValueError: τ or τ_t <= 0, shapes that differ, or a row with no unmasked entry.

    Example: s = [0.9, 0.5], τ = 1, t = [2, 0], τ_t = 1 -> p = (0.881, 0.119), q = (0.599, 0.401),
    loss = 0.881·ln(0.881/0.599) + 0.119·ln(0.119/0.401) = 0.1954.
    """

    name = "distill_kl"
    input_kind = "teacher_scores"
    needs_negatives = True
