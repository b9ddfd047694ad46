"""Objectives: what one training step computes, one per kind of example.

A loss declares the kind of input it takes (``loss.input_kind``), a data format the kind of example it
gives (``data_format.kind``). :data:`OBJECTIVES` maps each kind to its objective and to the formats that
feed it; this is the only place the kind is looked up. An objective batches its examples and turns a
batch into a loss (:class:`~embtune.objectives.objective.Objective`); MaxSim (multi-vector models) and
Matryoshka are forms of it (``maxsim``, ``matryoshka``).

``input_kind`` -> objective: formats that feed it; losses

- ``scores`` -> :class:`Contrastive` (:class:`LateInteraction` for multi-vector models): pairwise,
  triplet, multi_negative, raw_texts; info_nce, simcse, hinge, triplet, binary, logistic.
- ``multi_positive_scores`` -> :class:`MultiPositive`: pairwise, triplet, multi_negative (the rows of
  one query are one anchor); multi_label_softmax.
- ``teacher_scores`` -> :class:`Distillation`: triplet, multi_negative; distill_kl, margin_mse.
- ``pair_scores`` -> :class:`Pairs`: scored_pairs, pairwise with a label; cosent, pointwise_bce.
- ``list_scores`` -> :class:`Lists`: listwise; listwise.
- ``embeddings`` -> :class:`Classification`: pointwise, and the pair formats (a query and its positives
  one class); arcface.
"""

from __future__ import annotations

from embtune.objectives.classification import Classification
from embtune.objectives.contrastive import Contrastive
from embtune.objectives.distillation import Distillation
from embtune.objectives.lists import Lists
from embtune.objectives.maxsim import LateInteraction
from embtune.objectives.multi_positive import MultiPositive
from embtune.objectives.objective import Objective
from embtune.objectives.pairs import Pairs

__all__ = ["OBJECTIVES", "Classification", "Contrastive", "Distillation", "LateInteraction", "Lists",
           "MultiPositive", "Objective", "Pairs", "objective_for"]

# loss.input_kind -> (objective, the data_format.kind values whose examples feed it)
OBJECTIVES: dict[str, tuple[type[Objective], frozenset[str]]] = {
    "scores": (Contrastive, frozenset({"scores"})),
    "multi_positive_scores": (MultiPositive, frozenset({"scores"})),  # the rows of one query: one anchor
    "teacher_scores": (Distillation, frozenset({"scores"})),  # a teacher scores the (query, document) pairs
    "pair_scores": (Pairs, frozenset({"pair_scores"})),
    "list_scores": (Lists, frozenset({"list_scores"})),
    "embeddings": (Classification, frozenset({"embeddings", "scores"})),  # pairs as classes
}


def objective_for(loss_fn, negatives, multi_vector: bool = False) -> Objective:
    """The objective that trains ``loss_fn`` (by its ``input_kind``, ``scores`` when it declares none)
    with ``negatives``; ``multi_vector``: the model scores token vectors (MaxSim).

    Raises:
        ValueError: an unknown input kind, or a multi-vector model with a loss not over candidates.
    """
    kind = getattr(loss_fn, "input_kind", "scores")
    if kind not in OBJECTIVES:
        raise ValueError(f"loss={loss_fn.name} takes {kind!r} examples, which no objective trains on "
                         f"(known: {', '.join(OBJECTIVES)})")
    objective, formats = OBJECTIVES[kind]
    if multi_vector:
        if objective is not Contrastive:
            raise ValueError(f"model=multi_vector trains with losses over candidates (info_nce, hinge, ...); "
                             f"this loss takes {kind} examples")
        objective = LateInteraction
    return objective(loss_fn, negatives, formats)
