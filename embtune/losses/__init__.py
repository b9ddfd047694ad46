"""Losses, one per file. Each declares the kind of input it takes (``input_kind``):

- ``scores``: ``(scores [B,C], target [B]) -> scalar``, similarities of each anchor to C candidates
  (built by ``embtune.negatives.in_batch``); padded candidates score -inf and are ignored.
- ``pair_scores``: ``(scores [B], labels [B]) -> scalar``, one cosine per text pair with its gold score.
- ``list_scores``: ``(scores [B,L], teacher [B,L], mask [B,L]) -> scalar``, a query against a list.
- ``embeddings``: ``(embeddings [B,D], labels [B]) -> scalar``, texts with class labels (ArcFace).

Each exposes ``temperature`` and ``margin`` (None where the loss has none) so every run logs the values
in use, and ``needs_negatives`` (True if in-batch candidates alone are not enough).
"""
