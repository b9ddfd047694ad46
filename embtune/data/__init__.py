"""Data sets: what every loader returns, and the loaders' config targets.

A loader (``data=stdlib|beir|jsonl|hf``) returns a :class:`TrainingData`: raw training rows (dicts whose
columns the ``data_format`` maps into examples; ``jsonl`` and ``hf`` keep them in an Arrow file, see
:mod:`embtune.data.rows`) and an optional held-out :class:`RetrievalSet` that the evaluation ranks. IDs are
always strings. ``data=mixture`` loads several of them (:mod:`embtune.data.mixture`).
"""

from embtune.data.beir import load_beir
from embtune.data.dataset import RetrievalSet, TrainingData, fingerprint
from embtune.data.files import load_hf, load_jsonl
from embtune.data.formats import Listwise, MultiNegative, Pairwise, Pointwise, RawTexts, ScoredPairs, Triplet
from embtune.data.mixture import load_mixture
from embtune.data.stdlib import load_stdlib

__all__ = ["Listwise", "MultiNegative", "Pairwise", "Pointwise", "RawTexts", "RetrievalSet", "ScoredPairs",
           "TrainingData", "Triplet", "fingerprint", "load_beir", "load_hf", "load_jsonl", "load_mixture",
           "load_stdlib"]
