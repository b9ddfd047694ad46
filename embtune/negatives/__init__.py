"""Negatives: which candidates each anchor is scored against.

Interface: ``(anchor [B,D], positive [B',D], negative [B',K,D] | None, negative_mask [B',K] | None,
offset) -> (scores [B,C], target [B])`` where ``target[i] = offset + i`` is the column of anchor i's
positive. B' = B on one process; with cross-device negatives the candidates are gathered from every
process (B' = W·B) and ``offset`` = rank·B. Padded negatives (mask False) score ``-inf``, so every loss
ignores them. ``needs_negatives`` tells the loop
whether the data must carry negatives (checked before the model loads) and whether to encode them.
"""

from embtune.negatives.cross_batch import CrossBatch
from embtune.negatives.hard import Hard
from embtune.negatives.in_batch import InBatch
from embtune.negatives.online_hard import OnlineHard

__all__ = ["CrossBatch", "Hard", "InBatch", "OnlineHard"]
