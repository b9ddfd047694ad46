"""How a ``data=mixture`` run trains (:mod:`embtune.data.mixture`): each source's data format and dev split,
its checks, its examples and batches (one source per batch), its candidates (per-source ``in_batch``), its
loss in the log and its evaluation. The loop calls these in place of the single-data-set functions.
"""

from __future__ import annotations

import logging
import statistics

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import check_compatible, normalize_node
from embtune.data.batching import plan_batches as plan_source_batches
from embtune.data.checks import make_examples as make_source_examples
from embtune.data.dev_split import describe_held_out, hold_out_dev
from embtune.data.mixture import MixedExamples, Mixture, MixtureBatchSampler
from embtune.eval.evaluators import Retrieval
from embtune.training import distributed

log = logging.getLogger(__name__)


def prepare(data: Mixture, format_node: DictConfig, data_format, evaluator):
    """Build each source's data format (its own node, its keys over the run's ``format_node``, or the run's
    ``data_format``), hold out each source's dev split (a retrieval evaluator, a source without a test set),
    and return the evaluator that evaluates every source (:class:`PerSource`; another evaluator, e.g.
    ``eval=sts``, reads its own file and is returned as it is).

    Raises:
        ValueError: a source's format that cannot be built, naming ``data.sources[i] (name)``.
    """
    for i, s in enumerate(data.sources):
        where = f"data.sources[{i}] ({s.name}).data_format"
        if s.format_node is None:
            s.data_format = data_format
        else:
            node = s.format_node if s.format_node.get("_target_") else OmegaConf.merge(format_node, s.format_node)
            try:
                s.data_format = instantiate(normalize_node(node, where, group="data_format"))
            except Exception as e:  # a wrong key or value: named by source
                raise ValueError(f"{where}: {getattr(e, '__cause__', None) or e}") from e
        if isinstance(evaluator, Retrieval):
            s.data = hold_out_dev(s.data, s.data_format)
            log.info("source %s: %s", s.name, describe_held_out(s.data, evaluator))
    return PerSource(evaluator, data) if isinstance(evaluator, Retrieval) else evaluator


def check(data: Mixture, objective, negatives, loss_fn, teacher) -> None:
    """Each source's pre-flight checks (those of ``embtune.config.check_run`` that depend on the format),
    and what a mixture cannot do.

    Raises:
        ValueError: naming ``data.sources[i] (name)``: a format that cannot feed the loss or the negatives;
            ``in_batch: false`` where the candidates are not in-batch ones plus data negatives
            (``negatives=hard`` without ``cross_device``); an objective that merges rows into classes across
            the data (``loss=arcface`` etc.: classes of two sources would be merged).
    """
    if not objective.per_example:
        raise ValueError(f"data=mixture with loss={loss_fn.name}: this loss builds classes across all rows, so "
                         "classes of different sources would merge; train it on one data set")
    for i, s in enumerate(data.sources):
        where = f"data.sources[{i}] ({s.name})"
        try:
            check_compatible(s.data_format, negatives, loss_fn, objective)
            objective.check(s.data_format, teacher)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if not s.in_batch and (not objective.candidates or negatives.name != "hard"
                               or getattr(negatives, "cross_device", False)):
            raise ValueError(f"{where}: in_batch=false leaves an anchor its own positive and hard negatives only; "
                             f"that needs negatives=hard (without cross_device) and a loss over candidates, not "
                             f"negatives={negatives.name}, loss={loss_fn.name}")


def make_examples(data: Mixture, data_format, objective):
    """:func:`embtune.data.checks.make_examples` for each source with its own format: ``(MixedExamples,
    row_of)``, ``row_of(i)`` naming the source and the row."""
    parts, names = [], []
    for s in data.sources:
        examples, row_of = make_source_examples(s.data, s.data_format, objective)
        parts.append(examples)
        names.append(row_of)
    mixed = MixedExamples(data.sources, parts)

    def row_of(i: int) -> str:
        s, j = mixed.locate(i)
        return f"{data.sources[s].name}: {names[s](j)}"

    return mixed, row_of


def plan_batches(examples: MixedExamples, objective, t: DictConfig, proc: distributed.Dist, data: Mixture):
    """``(sampler, rng)`` as :func:`embtune.data.batching.plan_batches`, with every batch from one source:
    each source is planned on its own (no repeated text, the floor, W processes' shares), then
    :class:`~embtune.data.mixture.MixtureBatchSampler` orders the batches by ``data.choice``.

    Raises:
        ValueError: a source too small for one batch, naming it.
    """
    samplers, rng = [], None
    for i, (s, part) in enumerate(zip(data.sources, examples.parts)):
        try:
            sampler, rng = plan_source_batches(part, objective, t, proc)
        except ValueError as e:
            raise ValueError(f"data.sources[{i}] ({s.name}): {e}") from e
        samplers.append(sampler.batches if isinstance(sampler, distributed.ShardedBatchSampler) else sampler)
    weights = [s.weight for s in data.sources] if data.choice == "weighted" else None
    sampler = MixtureBatchSampler(samplers, examples.offsets, data.choice, weights, seed=t.seed)
    if proc.world > 1:
        sampler = distributed.ShardedBatchSampler(sampler, proc.rank, proc.world)
    return sampler, rng


def make_loader(examples: MixedExamples, objective, t: DictConfig, model, sampler, rng):
    """:func:`embtune.data.batching.make_loader` where a batch of a source with ``in_batch: false`` has every
    other row's candidates masked (:func:`own_candidates_only`)."""
    def collate(idx: list[int]) -> tuple[list[int], dict]:
        batch = objective.collate(model, [examples[i] for i in idx], rng)
        if not examples.source_of(idx[0]).in_batch:
            own_candidates_only(batch)
        return idx, batch

    return torch.utils.data.DataLoader(range(len(examples)), batch_sampler=sampler, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(t.seed))


def own_candidates_only(batch: dict) -> None:
    """Mark as false negatives (score −inf) every candidate of ``batch["false_negative"]`` [B,C] that is not
    anchor i's own: its positive (column i) and its K hard negatives (columns B + i·K … B + (i+1)·K − 1),
    the candidates order of :func:`embtune.data.batching.candidate_batch`. In place."""
    fn = batch["false_negative"]
    b, c = fn.shape
    k = (c - b) // b
    col = torch.arange(c)
    row = torch.arange(b)[:, None]
    own = (col[None, :] == row) | ((col[None, :] >= b + row * k) & (col[None, :] < b + (row + 1) * k))
    batch["false_negative"] = fn | ~own


class SourceLosses:
    """``train/loss/<source>``: the mean loss of each source's batches since the last log line (a source
    with no batch in that window is not logged). Plain data (not a mixture): nothing is logged."""

    def __init__(self, examples):
        self.examples = examples if isinstance(examples, MixedExamples) else None
        self.sums: dict[str, list[float]] = {}

    def add(self, idx: list[int], loss: float) -> None:
        if self.examples is not None:
            self.sums.setdefault(self.examples.source_of(idx[0]).name, []).append(loss)

    def flush(self) -> dict[str, float]:
        out = {f"train/loss/{name}": sum(v) / len(v) for name, v in self.sums.items()}
        self.sums = {}
        return out


class PerSource:
    """The run's retrieval evaluator, on every source with a test set or dev split in turn: metrics
    ``<source>/<name>`` (``scifact/ndcg@10``, ``scifact/dim64/ndcg@10``), and each plain ``<name>`` the
    mean over the sources that report it (the macro average, each source counting once whatever its size).
    So ``eval.metric=ndcg@10`` selects on the mean and ``eval.metric=scifact/ndcg@10`` on one source. Every
    other attribute is the wrapped evaluator's."""

    def __init__(self, evaluator: Retrieval, data: Mixture):
        self.inner = evaluator
        names = [s.name for s in data.sources if s.data.test is not None]
        self.metrics = (*evaluator.metrics, *(f"{n}/{m}" for n in names for m in evaluator.metrics))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, data: Mixture, dims: list[int]) -> dict[str, float]:
        out, per = {}, {}
        for s in data.sources:
            if s.data.test is None:
                continue
            metrics = self.inner(model, s.data, dims)
            out.update({f"{s.name}/{k}": v for k, v in metrics.items()})
            for k, v in metrics.items():
                per.setdefault(k, []).append(v)
        for k, values in per.items():
            known = [v for v in values if v is not None]
            out[k] = statistics.fmean(known) if len(known) == len(values) else None  # a missing one: no mean
        return out
