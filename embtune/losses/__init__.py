"""Losses: ``(scores [B,C], target [B]) -> scalar``, one per file. Each exposes ``temperature`` and
``margin`` (None where the loss has none) so every run logs the values in use."""
