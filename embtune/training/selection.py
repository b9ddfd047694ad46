"""Model selection during training: the best evaluation so far, its weights, and early stopping.

The loop evaluates every ``eval.every_steps`` steps (and at the last step) and hands the metrics to
:meth:`Best.update`; the model saved at the end is the best one (``eval.keep=best``) or the last
(``eval.keep=last``). ``train.early_stopping_patience=N`` stops after N evaluations in a row without
a strictly better ``eval.metric``. Every metric embtune reports (NDCG@10, MRR@10, Recall@k, Spearman) is
better when higher. A missing (None) or NaN metric is never best and counts as no improvement.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from embtune.training import distributed
from embtune.training.numerics import finite_or_missing

log = logging.getLogger(__name__)

KEEP = ("best", "last")


def check_selection(every_steps, keep: str, patience, metric: str | None = None, reported: tuple = (),
                    evaluates: bool = True) -> None:
    """Refuse, before any model loads, selection settings that cannot work.

    ``metric``: ``eval.metric``, which must be one of ``reported`` (the evaluator's metric names) or
    ``dim<d>/<name>`` of one; ``evaluates``: whether there is anything to evaluate (a test set, a dev
    split, or an evaluator with its own file).

    Raises:
        ValueError: ``eval.metric`` not a metric the evaluator reports (a typo would select nothing and
            make every sweep value NaN), ``eval.every_steps`` not a positive integer or null, or set with
            nothing to evaluate, ``eval.keep`` not best/last, ``train.early_stopping_patience`` not a
            positive integer or null, or set without ``eval.every_steps`` (nothing to be patient about).
    """
    if metric is not None and reported and re.sub(r"^dim\d+/", "", str(metric)) not in reported:
        raise ValueError(f"eval.metric={metric!r}: this evaluator reports {', '.join(reported)} "
                         "(and dim<d>/<name> at each Matryoshka dimension)")
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    if every_steps is not None and not positive_int(every_steps):
        raise ValueError(f"eval.every_steps={every_steps!r}: must be an integer >= 1, or null (no evaluation "
                         "during training)")
    if every_steps is not None and not evaluates:
        raise ValueError(f"eval.every_steps={every_steps}: there is nothing to evaluate (the data has no test set and "
                         "no dev split: data.dev_queries=0 or too few queries); drop eval.every_steps or hold out a "
                         "dev split")
    if keep not in KEEP:
        raise ValueError(f"eval.keep={keep!r}: must be best or last")
    if patience is not None and not positive_int(patience):
        raise ValueError(f"train.early_stopping_patience={patience!r}: must be an integer >= 1, or null (off)")
    if patience is not None and every_steps is None:
        raise ValueError(f"train.early_stopping_patience={patience} needs evaluations during training: set "
                         "eval.every_steps")


class Best:
    """The best evaluation so far by ``metric`` (higher is better) and, with ``keep="best"``, a copy of
    its weights.

    Memory: with ``keep="best"`` a CPU copy of the model's ``state_dict`` is held (one more copy of the
    weights in host memory: ~90 MB for all-MiniLM-L6-v2 in float32, 4 bytes per parameter), and the
    checkpoint carries it too, so a resumed run keeps the best so far.

    Args:
        metric: the key of the evaluator's metrics to select on (``eval.metric``, e.g. ``ndcg@10``).
        keep: ``best`` (the saved model is the best evaluated) or ``last``.
        patience: stop after this many evaluations in a row without improvement; None: never.
    """

    def __init__(self, metric: str, keep: str = "best", patience: int | None = None):
        self.metric, self.keep, self.patience = metric, keep, patience
        self.step: int | None = None      # the step of the best evaluation
        self.value: float | None = None   # its metric
        self.metrics: dict = {}           # all its metrics
        self.weights: dict | None = None  # its state_dict on CPU (keep="best")
        self.evaluations = 0
        self.since_best = 0               # evaluations since the best one

    def update(self, step: int, metrics: dict, model: torch.nn.Module | None) -> bool:
        """Record the evaluation at ``step``; returns True when it is strictly better than every earlier one.
        A missing or non-finite ``metrics[self.metric]`` is never better. ``model`` None: count only,
        keep no weights (the processes other than rank 0, which saves)."""
        self.evaluations += 1
        value = metrics.get(self.metric)
        improved = (value is not None and math.isfinite(value)
                    and (self.value is None or value > self.value))
        if not improved:
            self.since_best += 1
            return False
        self.step, self.value, self.metrics, self.since_best = step, float(value), dict(metrics), 0
        if self.keep == "best" and model is not None:
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and self.since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> bool:
        """With ``keep="best"``, load the best weights into ``model``; returns whether it did."""
        if self.keep != "best" or self.weights is None:
            return False
        model.load_state_dict(self.weights)
        return True

    def summary(self) -> dict:
        """What summary.json records: the metric, the best step and value, how many evaluations."""
        return {"metric": self.metric, "keep": self.keep, "best_step": self.step, "best_value": self.value,
                "evaluations": self.evaluations, "stopped_early": self.should_stop}

    def state_dict(self) -> dict:
        """Plain containers and tensors (a checkpoint loads with ``weights_only=True``)."""
        return {"step": self.step, "value": self.value, "metrics": self.metrics, "weights": self.weights,
                "evaluations": self.evaluations, "since_best": self.since_best}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore what :meth:`state_dict` gave (None: a checkpoint written without selection)."""
        if state:
            self.step, self.value, self.metrics = state["step"], state["value"], state["metrics"]
            self.weights, self.evaluations, self.since_best = state["weights"], state["evaluations"], state["since_best"]


def evaluate_and_select(evaluator, model, data, dims: list[int], best: Best, step: int, proc) -> dict:
    """Evaluate ``model`` during training at ``step`` (at every Matryoshka dimension in ``dims``) on rank 0,
    share the metrics with every process (so all agree on early stopping) and update ``best``.
    Returns the metrics (a NaN one as None)."""
    metrics = finite_or_missing(evaluator(model, data, dims)) if proc.main else None
    metrics = distributed.broadcast_object(metrics, proc)
    improved = best.update(step, metrics, model if proc.main else None)
    if proc.main:
        value = metrics.get(best.metric)
        log.info("step %d: eval/%s %s (best %s at step %s)%s", step, best.metric,
                 "missing" if value is None else f"{value:.4f}", "none" if best.value is None else f"{best.value:.4f}",
                 best.step, " new best" if improved else "")
    return metrics
