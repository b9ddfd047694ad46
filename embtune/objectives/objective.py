"""The interface every objective follows: what one training step computes for one kind of example.

An objective joins a data format (the examples it gives), the loss (``loss.input_kind``) and the
negatives: it says which formats can feed it, batches its examples, and turns a batch into a loss.
:func:`embtune.objectives.objective_for` picks it; the loop only calls it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from torch import Tensor

from embtune.data.formats import tower


class Objective:
    """One kind of example, trained with the configured loss and negatives.

    Attributes (what the pre-flight checks in ``embtune.config`` read):
        candidates: each anchor is scored against candidates, so ``negatives=`` applies.
        in_batch: the batch's other examples are candidates, so a batch of one learns nothing.
        distils: matches a teacher's scores (``teacher=`` applies).
        matryoshka: the loss can be taken at each Matryoshka dimension.

    Args:
        loss_fn: the loss module (``loss=``).
        negatives: the negatives module (``negatives=``).
        formats: the ``data_format.kind`` values whose examples feed this objective.
    """

    candidates = in_batch = distils = False
    matryoshka = True
    batch_fields: tuple[str, ...] | None = None  # the fields whose texts may not repeat in a batch (batch_texts)
    group_field: str | None = None  # examples equal in this field are planned into one batch (batch_group)
    per_example = True  # examples() treats each example on its own, so it may run on a part of the data

    def __init__(self, loss_fn, negatives, formats: frozenset[str]):
        self.loss_fn, self.negatives, self.formats = loss_fn, negatives, formats

    def accepts(self, data_format) -> bool:
        """Whether ``data_format``'s examples feed this objective."""
        return data_format.kind in self.formats

    def check(self, data_format, teacher) -> None:
        """Refuse, before any model loads, what this objective cannot do with these options.

        Raises:
            ValueError: a teacher for a loss that does not distil.
        """
        if teacher is not None:
            raise ValueError(f"teacher is set but loss={self.loss_fn.name} does not distil: use loss=distill_kl or "
                             "loss=margin_mse")

    def examples(self, examples: list, origins: list[int] | None, data, data_format) -> tuple[list, list[int] | None]:
        """The format's examples as this objective trains on them, and each one's row (None: no longer
        one row each). Identity unless the objective reshapes or checks them."""
        return examples, origins

    def start(self, model, examples: list, batch_size: int) -> None:
        """Once the model is loaded, before the optimiser is made (ArcFace's class centres)."""

    def batch_texts(self, example) -> tuple[str, ...] | None:
        """Texts of ``example`` that must not appear twice in one batch (``train.no_duplicates``): those of
        ``batch_fields``; None: batches are plain shuffled slices."""
        return None if self.batch_fields is None else tuple(getattr(example, f) for f in self.batch_fields)

    def batch_group(self, example) -> str | None:
        """Examples with the same group (their ``group_field``) are planned into one batch (None: no grouping)."""
        return None if self.group_field is None else getattr(example, self.group_field)

    def collate(self, model, examples: list, rng: random.Random) -> dict:
        """One batch of ``examples``, tokenised: ``{column: tokens, ...}`` plus the tensors the loss needs."""
        raise NotImplementedError

    def loss(self, model, batch: dict, dims: list[tuple[int, float]],
             embeddings: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        """The batch's loss (scalar) and extra per-step metrics (``{"train/candidates": ...}``).

        Args:
            model: the Embedder, maybe wrapped in DDP.
            batch: from :meth:`collate`, on the model's device.
            dims: ``(dimension, weight)`` pairs (``embtune.objectives.matryoshka.matryoshka_dims``).
            embeddings: ``{column: [N,D]}`` to use instead of encoding (GradCache,
                ``embtune.training.grad_cache``).
        """
        raise NotImplementedError


def encoder(model, batch: dict, embeddings: dict[str, Tensor] | None) -> Callable[[str], Tensor]:
    """``column -> embeddings [N,D]``: the given embeddings, or the column encoded by its tower."""
    def encode(column: str) -> Tensor:
        return embeddings[column] if embeddings is not None else model(**batch[column], kind=tower(column))
    return encode
