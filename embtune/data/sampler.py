"""Batch samplers with a fixed plan per (seed, epoch), so a resumed run can skip to the batch it stopped at:
batches without repeated texts (no in-batch negative is a copy of a positive), with groups of rows kept
together, none smaller than a floor; and plain shuffled batches (the same planner, with no texts)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator

from torch.utils.data import Sampler


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which no text appears twice (a query with two positives, or a text that is one
    row's query and another's positive, would otherwise be a false in-batch negative).

    Batches are planned for the whole epoch up front (seeded by ``seed`` and the epoch), so ``len()`` is
    exact: every process of a distributed run agrees on the number of steps and none waits forever.

    1. Greedy: the examples in shuffled order fill a batch up to ``batch_size``; one that clashes with the
       batch being filled (shares a text) waits, and waiting ones get the first chance at the next batch.
       With ``group_of``, the rows of one group (e.g. one query's positives) are one unit: planned into
       the same batch, their own texts shared among them only (a group larger than a batch is split).
    2. The floor: a batch of fewer than ``min_size`` rows (the last ones, made of examples that clash with
       each other) is first merged with the other short ones where no text clashes, then filled up to
       ``min_size`` with rows moved from the latest full batches (a donor keeps at least ``min_size``;
       the moved row must not clash). A batch that still falls short is left out: its rows are
       *unbatched* this epoch (:attr:`unbatched`; a fresh order next epoch). Every other row is used
       exactly once.
    3. ``multiple``: every batch holds a multiple of it (the number of processes, so each takes an equal
       share); the rows cut off the end of a batch are unbatched too.

    Batches whose plan needs no floor and no cut are exactly those of step 1. Set the epoch with
    :meth:`set_epoch` for a fresh order each epoch.

    Args:
        texts_of: index -> the texts of that example (e.g. query and positive); None: no text rule
            (plain shuffled batches).
        n: number of examples.
        batch_size: rows per batch (at most).
        drop_last: drop a final batch smaller than ``batch_size`` (its rows count as unbatched).
        seed: shuffling seed.
        min_size: the floor, rows per batch (1: none).
        multiple: each batch's size is a multiple of this.
        group_of: index -> a group key; rows with the same key are planned together. None: no groups.
    Raises:
        ValueError: ``batch_size``, ``min_size`` or ``multiple`` < 1, or ``min_size`` > ``batch_size``.
    """

    def __init__(self, texts_of: Callable[[int], tuple[str, ...]] | None, n: int, batch_size: int,
                 drop_last: bool = False, seed: int = 0, min_size: int = 1, multiple: int = 1,
                 group_of: Callable[[int], str] | None = None):
        if batch_size < 1 or min_size < 1 or multiple < 1 or min_size > batch_size:
            raise ValueError(f"need 1 <= min_size <= batch_size and multiple >= 1, got min_size={min_size}, "
                             f"batch_size={batch_size}, multiple={multiple}")
        self.texts_of, self.n, self.batch_size, self.drop_last, self.seed = texts_of, n, batch_size, drop_last, seed
        self.min_size, self.multiple = min_size, multiple
        self.units = _units(n, group_of, batch_size)
        self.epoch, self.start = 0, 0
        self._unbatched: dict[int, int] = {}
        self._plan: list[list[int]] | None = None
        self._plan = self._make_plan()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan epoch ``epoch``; iteration begins at batch ``start`` (a resumed run's position). The plan of
        the epoch already planned is kept (it depends on the seed and the epoch alone)."""
        if epoch != self.epoch or self._plan is None:
            self.epoch = epoch
            self._plan = self._make_plan()
        self.start = start

    @property
    def unbatched(self) -> int:
        """Rows of the current epoch's plan that are in no batch (see the class docstring)."""
        return self._unbatched[self.epoch]

    def unbatched_in(self, epoch: int) -> int:
        """Rows left out of epoch ``epoch``'s plan (planned on demand)."""
        if epoch not in self._unbatched:
            current, start = self.epoch, self.start
            self.set_epoch(epoch)
            self.set_epoch(current, start)
        return self._unbatched[epoch]

    def _texts(self, unit: list[int]) -> set:
        return {t for i in unit for t in self.texts_of(i)} if self.texts_of is not None else set()

    def _make_plan(self) -> list[list[int]]:
        order = list(range(len(self.units)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        units = _Ordered(self.units, order)  # position p -> unit; texts looked up as they are needed
        batches = self._greedy(units)
        if self.drop_last and batches and sum(len(units[u]) for u in batches[-1]) < self.batch_size:
            batches.pop()
        if self.min_size > 1:
            batches = self._floor(batches, units)
        plan = [[i for u in b for i in units[u]] for b in batches]
        if self.multiple > 1:
            plan = [b[:len(b) - len(b) % self.multiple] for b in plan]
        plan = [b for b in plan if b]
        self._unbatched[self.epoch] = self.n - sum(map(len, plan))
        return plan

    def _greedy(self, units) -> list[list[int]]:
        """Step 1: batches of unit positions. Only the units waiting for a later batch keep their texts."""
        upcoming, waiting = iter(range(len(units))), deque()
        batches: list[list[int]] = []
        while True:
            batch, size, seen = [], 0, set()

            def fits(u: int, texts: set) -> bool:
                nonlocal size
                if size + len(units[u]) > self.batch_size or texts & seen:
                    return False
                batch.append(u)
                size += len(units[u])
                seen.update(texts)
                return True

            for _ in range(len(waiting)):  # earlier clashes get the first chance
                u, texts = waiting.popleft()
                if not fits(u, texts):
                    waiting.append((u, texts))
            for u in upcoming:
                texts = self._texts(units[u])
                if not fits(u, texts):
                    waiting.append((u, texts))
                if size >= self.batch_size:
                    break
            if not batch:
                break
            batches.append(batch)
        return batches

    def _floor(self, batches: list[list[int]], units) -> list[list[int]]:
        """Step 2 of the class docstring: merge short batches, then fill them from the latest full ones."""
        texts: dict[int, set] = {}

        def text_of(u):
            if u not in texts:
                texts[u] = self._texts(units[u])
            return texts[u]

        def rows(b):
            return sum(len(units[u]) for u in b)

        def clash(u, b):
            return any(text_of(u) & text_of(v) for v in b)

        full = [b for b in batches if rows(b) >= self.min_size]
        short: list[list[int]] = []
        for u in (u for b in batches if rows(b) < self.min_size for u in b):  # first fit, in plan order
            for b in short:
                if rows(b) + len(units[u]) <= self.batch_size and not clash(u, b):
                    b.append(u)
                    break
            else:
                short.append([u])
        for b in short:
            for donor in reversed(full):
                for u in reversed(list(donor)):
                    if rows(b) >= self.min_size:
                        break
                    if (rows(donor) - len(units[u]) >= self.min_size and rows(b) + len(units[u]) <= self.batch_size
                            and not clash(u, b)):
                        donor.remove(u)
                        b.append(u)
                if rows(b) >= self.min_size:
                    break
        return full + [b for b in short if rows(b) >= self.min_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan[self.start:])

    def __len__(self) -> int:
        """Batches in the whole epoch (also when iteration starts later)."""
        return len(self._plan)


def _units(n: int, group_of: Callable[[int], str] | None, batch_size: int):
    """Rows 0..n−1 as planning units: one row each, or the rows of each group (first appearance order),
    split into pieces of at most ``batch_size``."""
    if group_of is None:
        return _Singles(n)
    groups: dict = {}
    for i in range(n):
        groups.setdefault(group_of(i), []).append(i)
    return [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


class _Singles:
    """The units of ungrouped rows, ``[i]`` for row i, without a list per row."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[int]:
        return [i]


class _Ordered:
    """Units in a shuffled order: position p -> ``units[order[p]]``."""

    def __init__(self, units, order: list[int]):
        self.units, self.order = units, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, p: int) -> list[int]:
        return self.units[self.order[p]]


class ShuffledBatchSampler(NoDuplicatesBatchSampler):
    """Shuffled batches of ``batch_size`` indices, a fresh order per epoch drawn from ``(seed, epoch)``:
    the planner above without texts, so consecutive slices of the shuffled order (with the same floor,
    ``min_size``, and ``multiple``).

    Unlike a ``DataLoader(shuffle=True)`` generator, the order of epoch e does not depend on how many
    epochs were drawn before, so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool = False, seed: int = 0, min_size: int = 1,
                 multiple: int = 1):
        super().__init__(None, n, batch_size, drop_last, seed, min_size, multiple)
