"""Non-finite numbers: a training step whose loss or gradient is not finite, and metrics that could not
be computed. Neither may pass silently: the step is skipped and counted, or the run stops naming the
step and the batch's rows; the metric is reported as missing (None), never as NaN."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def finite_or_missing(metrics: dict) -> dict:
    """A metric that could not be computed (NaN, e.g. Spearman of a constant) is missing (None), so it
    never wins or loses a comparison by accident."""
    return {k: (v if v is None or math.isfinite(v) else None) for k, v in metrics.items()}


def skip_or_stop(policy: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, rows: list[str]) -> None:
    """A step whose loss or gradient is not finite: log it (``skip``) or raise (``stop``).

    Raises:
        FloatingPointError: with ``train.on_nonfinite=stop``, naming the step and the batch's rows.
    """
    what = f"step {step}: non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} (loss {loss.item()}, " \
           f"gradient norm {grad_norm.item()}); batch rows: {', '.join(rows[:16])}{' ...' if len(rows) > 16 else ''}"
    if policy == "stop":
        raise FloatingPointError(f"{what} (train.on_nonfinite=skip skips such steps)")
    log.warning("%s; step skipped (no weight update)", what)
