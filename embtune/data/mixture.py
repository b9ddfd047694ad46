"""``data=mixture``: several data sets in one run, every batch drawn from one of them.

In-batch negatives from another task are easy and misleading (an NLI hypothesis is no hard negative for
a SciFact claim), so a batch never mixes sources (FlagEmbedding's ``same_dataset_within_batch``). Each
source is any loader node (``_target_`` and its settings, as in ``conf/data/*.yaml``) plus the keys of
:data:`SOURCE_KEYS`; :func:`load_mixture` loads them all (naming the source that fails) before any model
loads. The batch plan (:class:`MixtureBatchSampler`) is a pure function of ``(seed, epoch)``, so a resumed
run sees the batches an uninterrupted one does. How a mixture trains and is evaluated (formats per source,
per-source loss and metrics) is in :mod:`embtune.recipes.mixture`.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Sampler

from embtune.data.dataset import TrainingData

CHOICES = ("proportional", "weighted", "round_robin")
SOURCE_KEYS = ("name", "weight", "in_batch", "data_format")  # a source's own keys; the rest go to its loader
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a name prefixes metric keys (eval/<name>/ndcg@10): no slash


@dataclass
class Source:
    """One data set of a mixture.

    Attributes:
        name: prefixes its metrics (``eval/<name>/ndcg@10``) and its loss (``train/loss/<name>``).
        data: what its loader returned (its dev split once :func:`embtune.recipes.mixture.prepare` ran).
        weight: its share of the batches with ``choice=weighted`` (None otherwise).
        in_batch: False: an anchor's candidates are its own positive and hard negatives only, not the
            batch's other rows.
        format_node: its ``data_format`` (a node with ``_target_``, or keys over the run's), or None: the
            run's ``data_format``.
        data_format: the built format (set by ``prepare``).
    """

    name: str
    data: TrainingData
    weight: float | None = None
    in_batch: bool = True
    format_node: DictConfig | None = None
    data_format: object = None


class Mixture:
    """What ``data=mixture`` returns: the sources and how batches choose among them.

    Offers what the loop reads of a :class:`~embtune.data.TrainingData`: ``name``, ``test`` (every source's
    held-out set, ids prefixed ``<name>/``, for the base-metrics cache key and the text report),
    ``fingerprint`` (of the sources' fingerprints, names and weights) and ``summary()``.
    """

    held_out = None  # each source holds its own dev split (summary: data.sources.<name>.dev_split)

    def __init__(self, sources: list[Source], choice: str):
        self.sources, self.choice = sources, choice
        self.name = "mixture(" + ", ".join(s.name for s in sources) + ")"

    @property
    def rows(self) -> list:
        return [r for s in self.sources for r in s.data.rows]

    @property
    def test(self) -> _Tests | None:
        parts = [(s.name, s.data.test) for s in self.sources if s.data.test is not None]
        return _Tests(parts) if parts else None

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.choice.encode())
        for s in self.sources:
            h.update(f"\n{s.name}\t{s.weight}\t{s.in_batch}\t{s.data.fingerprint}".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """The mixture's rows and fingerprint, and each source's :meth:`TrainingData.summary`."""
        return {"name": self.name, "choice": self.choice, "train_rows": sum(len(s.data.rows) for s in self.sources),
                "fingerprint": self.fingerprint,
                "sources": {s.name: {**s.data.summary(), "weight": s.weight, "in_batch": s.in_batch}
                            for s in self.sources}}


class _Prefixed(Mapping):
    """Several mappings as one, each key prefixed ``<name>/``."""

    def __init__(self, parts: list[tuple[str, Mapping]]):
        self.parts = dict(parts)

    def __getitem__(self, key: str):
        name, _, inner = key.partition("/")
        if name not in self.parts:
            raise KeyError(key)
        return self.parts[name][inner]

    def __iter__(self) -> Iterator[str]:
        return (f"{name}/{k}" for name, part in self.parts.items() for k in part)

    def __len__(self) -> int:
        return sum(map(len, self.parts.values()))


class _Tests:
    """Every source's retrieval set as one (ids prefixed ``<name>/``): read for keys and counts; each
    source is evaluated on its own set."""

    def __init__(self, parts: list[tuple[str, object]]):
        self.queries = _Prefixed([(n, t.queries) for n, t in parts])
        self.corpus = _Prefixed([(n, t.corpus) for n, t in parts])
        self.qrels = _Prefixed([(n, t.qrels) for n, t in parts])
        self._parts = parts

    def __len__(self) -> int:
        return len(self.qrels)

    def identical_ids(self) -> int:
        return sum(t.identical_ids() for _, t in self._parts)


def load_mixture(sources: list, choice: str = "proportional") -> Mixture:
    """Load every source of ``data=mixture`` (see the module docstring and ``conf/data/mixture.yaml``).

    Args:
        sources: one node per data set: a loader's ``_target_`` and settings, plus ``name`` (default: the
            stem of its ``path``/``name``, else ``source<i>``), ``weight`` (a number > 0, with
            ``choice=weighted`` only), ``in_batch`` (default true) and ``data_format`` (null: the run's; a
            node with ``_target_``: another format; keys only: the run's format with these keys changed).
        choice: how a batch's source is chosen (:class:`MixtureBatchSampler`): ``proportional`` (by size),
            ``weighted`` or ``round_robin``.
    Raises:
        ValueError: an empty list, an unknown ``choice``, a source without ``_target_`` or that is itself
            a mixture or is streamed (``streaming: true``), a missing/<= 0 weight with ``choice=weighted`` or a
            weight with another choice, a bad or repeated name, ``in_batch`` not true/false, or a source that
            fails to load: each names ``data.sources[i]`` (and its name); all but the last are raised before
            any source is read.
    """
    if choice not in CHOICES:
        raise ValueError(f"data.choice={choice!r}: must be one of {', '.join(CHOICES)}")
    if not sources:
        raise ValueError("data.sources is empty: list at least one data set (docs/data.md, Mixtures)")
    nodes, names = [], set()
    for i, node in enumerate(sources):
        where = f"data.sources[{i}]"
        if not isinstance(node, (DictConfig, dict)) or not node.get("_target_"):
            raise ValueError(f"{where}: each source is a loader node with a _target_ (e.g. embtune.data.load_beir "
                             "and its path)")
        node = OmegaConf.create(node) if isinstance(node, dict) else node
        if node._target_.rsplit(".", 1)[-1] == "load_mixture":
            raise ValueError(f"{where}: a source cannot itself be a mixture; list its sources here")
        name = node.get("name") or _default_name(node, i)
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise ValueError(f"{where}: name={name!r} must be unique and made of letters, digits, '_', '.', '-' "
                             "(it prefixes the source's metrics)")
        names.add(name)
        where = f"{where} ({name})"
        if node.get("streaming"):
            raise ValueError(f"{where}: streaming=true: a mixture plans every source's batches from all its rows; "
                             "stream one data set with data=jsonl or data=hf instead")
        weight = node.get("weight")
        if choice == "weighted" and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise ValueError(f"{where}: weight={weight!r}: data.choice=weighted needs a weight > 0 for every source")
        if choice != "weighted" and weight is not None:
            raise ValueError(f"{where}: weight={weight!r} is only read with data.choice=weighted (now {choice}); "
                             "drop it or set data.choice=weighted")
        in_batch = node.get("in_batch", True)
        if not isinstance(in_batch, bool):
            raise ValueError(f"{where}: in_batch={in_batch!r} must be true or false")
        fmt = node.get("data_format")
        if fmt is not None and not isinstance(fmt, DictConfig):
            raise ValueError(f"{where}: data_format must be a node (with _target_, or keys over the run's "
                             f"data_format) or null, got {fmt!r}")
        _check_loader_keys(where, node)
        nodes.append((where, name, weight, in_batch, fmt, node))
    loaded = []
    for where, name, weight, in_batch, fmt, node in nodes:
        loader = OmegaConf.create({k: v for k, v in node.items_ex(resolve=False) if k not in SOURCE_KEYS})
        try:
            data = instantiate(loader)
        except InstantiationException as e:
            raise ValueError(f"{where} failed to load: {e.__cause__ or e}") from e
        except (ValueError, FileNotFoundError, TypeError, OSError) as e:
            raise ValueError(f"{where} failed to load: {e}") from e
        if not isinstance(data, TrainingData):
            raise ValueError(f"{where}: {node._target_} returned {type(data).__name__}, not TrainingData")
        loaded.append(Source(name, data, float(weight) if weight is not None else None, in_batch, fmt))
    return Mixture(loaded, choice)


def _check_loader_keys(where: str, node: DictConfig) -> None:
    """Refuse a source whose loader settings its ``_target_`` does not take, or that lacks one it needs.

    Raises:
        ValueError: naming ``where``, the key and the loader, before any source is read.
    """
    try:
        params = inspect.signature(get_object(node._target_)).parameters
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: _target_={node._target_!r} is not a loader that can be imported ({e})") from e
    given = {str(k) for k in node if not str(k).startswith("_") and k not in SOURCE_KEYS}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(given - set(params))
        if unknown:
            raise ValueError(f"{where}: {', '.join(unknown)}: not an option of {node._target_} (it takes "
                             f"{', '.join(params)})")
    needed = [n for n, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                  p.KEYWORD_ONLY)]
    missing = [n for n in needed if n not in given]
    if missing:
        raise ValueError(f"{where}: {', '.join(missing)} is missing: {node._target_} needs it")


def _default_name(node: DictConfig, i: int) -> str:
    where = node.get("path") or node.get("name")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(where).rstrip("/")).stem) if where else ""
    return stem or f"source{i}"


class MixedExamples(Sequence):
    """The examples of every source, one after another: example ``offsets[s] + j`` is source s's j-th."""

    def __init__(self, sources: list[Source], parts: list[Sequence]):
        self.sources, self.parts = sources, parts
        self.offsets = [0]
        for p in parts:
            self.offsets.append(self.offsets[-1] + len(p))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """``(source index, index within that source)`` of example ``i``."""
        s = bisect.bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def source_of(self, i: int) -> Source:
        return self.sources[self.locate(i)[0]]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        s, j = self.locate(i)
        return self.parts[s][j]


def apportion(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder (Hamilton) apportionment: integers summing to ``total``, ``weights`` in proportion
    (ties to the earlier source)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for s in sorted(range(len(weights)), key=lambda s: (counts[s] - exact[s], s))[:total - sum(counts)]:
        counts[s] += 1
    return counts


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of one source each, in an order drawn from ``(seed, epoch)`` alone.

    Each source plans its own batches (``samplers[s]``, e.g. a
    :class:`~embtune.data.sampler.NoDuplicatesBatchSampler` over its examples: no repeated text within a
    batch, its floor), indices shifted by ``offsets[s]`` into :class:`MixedExamples`. With n_s batches
    planned for source s in an epoch, N = Σ n_s:

    - ``proportional``: every planned batch once, in a shuffled order, so a source's share of the steps is
      its share of the batches (about its share of the rows). N batches an epoch.
    - ``weighted``: N batches, source s taking k_s of them, k = the largest-remainder apportionment of N by
      the weights; a source with k_s > n_s takes its batches from fresh plans of its data, pass p planned as
      sampler epoch ``epoch·P + p`` (P: the most passes any source needs); one with k_s < n_s leaves its
      last batches unused.
      Shuffled order.
    - ``round_robin``: the sources in turn, one batch each, S·min_s n_s batches (sentence-transformers'
      ``RoundRobinBatchSampler``: the epoch ends when the smallest source runs out; the larger ones' later
      batches are not used that epoch, and a fresh plan next epoch reaches other rows).

    Args:
        samplers: one batch sampler per source (``set_epoch``, ``len``, iteration, ``unbatched_in``).
        offsets: the first index of each source's examples.
        choice: one of :data:`CHOICES`.
        weights: per source, with ``weighted``.
        seed: the order's seed (``train.seed``).
    """

    def __init__(self, samplers: list, offsets: list[int], choice: str, weights: list[float] | None = None,
                 seed: int = 0):
        if choice not in CHOICES:
            raise ValueError(f"data.choice={choice!r}: must be one of {', '.join(CHOICES)}")
        self.samplers, self.offsets, self.choice, self.weights, self.seed = samplers, offsets, choice, weights, seed
        self.epoch, self.start, self._plan = 0, 0, None
        self._plan = self._make_plan(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan epoch ``epoch`` (kept if already planned); iteration begins at batch ``start``."""
        if epoch != self.epoch or self._plan is None:
            self.epoch, self._plan = epoch, self._make_plan(epoch)
        self.start = start

    def _source_plan(self, s: int, epoch: int) -> list[list[int]]:
        sampler = self.samplers[s]
        sampler.set_epoch(epoch)
        return [[self.offsets[s] + i for i in b] for b in sampler]

    def _make_plan(self, epoch: int) -> list[list[int]]:
        plans = [self._source_plan(s, epoch) for s in range(len(self.samplers))]
        sizes = [len(p) for p in plans]
        order_rng = random.Random(f"mixture:{self.seed}:{epoch}")  # a string seed: the same in every process
        if self.choice == "round_robin":
            turns = min(sizes)
            return [plans[s][j] for j in range(turns) for s in range(len(plans))]
        if self.choice == "weighted":
            counts = apportion(sum(sizes), self.weights)
            passes = max(-(-k // n) for k, n in zip(counts, sizes))  # P: the most passes a source needs
            for s, k in enumerate(counts):
                if k > sizes[s]:  # passes p = 0, 1, ... over the source, each a fresh plan (sampler epoch e·P + p)
                    plans[s], p = [], 0
                    while len(plans[s]) < k:
                        plans[s] += self._source_plan(s, epoch * passes + p)
                        p += 1
                plans[s] = plans[s][:k]
        labels = [s for s, p in enumerate(plans) for _ in p]
        order_rng.shuffle(labels)
        taken = [0] * len(plans)
        out = []
        for s in labels:
            out.append(plans[s][taken[s]])
            taken[s] += 1
        return out

    def source_counts(self) -> list[int]:
        """Batches of each source in the current epoch's plan."""
        counts = [0] * len(self.samplers)
        for b in self._plan:
            counts[bisect.bisect_right(self.offsets, b[0]) - 1] += 1
        return counts

    def unbatched_in(self, epoch: int) -> int:
        """Rows the sources' own plans leave out of epoch ``epoch`` (their floors and text rules; not the
        batches ``round_robin`` or ``weighted`` leave unused)."""
        return sum(s.unbatched_in(epoch) for s in self.samplers)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan[self.start:])

    def __len__(self) -> int:
        return len(self._plan)
