"""Losses, one per file. Each declares the kind of input it takes (``input_kind``):

- ``scores``: ``(scores [B,C], target [B]) -> scalar``, similarities of each anchor to C candidates
  (built by :mod:`embtune.negatives`); padded candidates score -inf and are ignored.
- ``pair_scores``: ``(scores [B], labels [B]) -> scalar``, one cosine per text pair with its gold score.
- ``list_scores``: ``(scores [B,L], teacher [B,L], mask [B,L]) -> scalar``, a query against a list.
- ``embeddings``: ``(embeddings [B,D], labels [B]) -> scalar``, texts with class labels (ArcFace).

Each exposes ``temperature`` and ``margin`` (None where the loss has none) so every run logs the values
in use, and ``needs_negatives`` (True if in-batch candidates alone are not enough).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from embtune.losses.arcface import ArcFace
from embtune.losses.binary import Binary
from embtune.losses.cosent import CoSENT
from embtune.losses.distill_kl import DistillKL
from embtune.losses.hinge import Hinge
from embtune.losses.info_nce import InfoNCE
from embtune.losses.listwise import Listwise
from embtune.losses.logistic import Logistic
from embtune.losses.margin_mse import MarginMSE
from embtune.losses.multi_label_softmax import MultiLabelSoftmax
from embtune.losses.pointwise_bce import PointwiseBCE
from embtune.losses.simcse import SimCSE
from embtune.losses.triplet import Triplet


class Loss(Protocol):
    """What the loop reads from every loss (an ``nn.Module``; its parameters go to the optimiser too).

    Attributes:
        name: the option's name (``loss=<name>``), used in error messages.
        input_kind: the example kind it takes (see above); ``scores`` when absent.
        temperature: τ in use (logits = similarity / τ), or None; logged every step.
        margin: the margin in use, or None; logged every step.
        needs_negatives: True when in-batch candidates alone are not enough.
    """

    name: str
    input_kind: str
    needs_negatives: bool

    @property
    def temperature(self) -> float | None: ...

    @property
    def margin(self) -> float | None: ...

    def __call__(self, *inputs: Tensor) -> Tensor: ...


__all__ = ["Loss", "ArcFace", "Binary", "CoSENT", "DistillKL", "Hinge", "InfoNCE", "Listwise", "Logistic", "MarginMSE", "MultiLabelSoftmax", "PointwiseBCE", "SimCSE", "Triplet"]
