"""Argument checks the losses share, so every loss words the same mistake the same way."""

from __future__ import annotations

from torch import Tensor


def positive(name: str, value: float) -> float:
    """``value`` as a float; raises ``ValueError`` naming ``loss.<name>`` unless it is > 0."""
    if not value > 0:  # also refuses NaN
        raise ValueError(f"loss.{name} must be > 0, got {value}")
    return float(value)


def same_shape(loss: str, layout: str, *tensors: Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is 2-D with the first one's shape (``layout`` names it,
    e.g. ``"[B,L]"``, in the message)."""
    first = tensors[0]
    if first.dim() != 2 or any(t.shape != first.shape for t in tensors[1:]):
        raise ValueError(f"{loss} needs tensors of one shape {layout}, got "
                         + ", ".join(str(tuple(t.shape)) for t in tensors))
