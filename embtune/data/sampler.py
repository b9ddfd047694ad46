"""Batch samplers with a fixed plan per (seed, epoch), so a resumed run can skip to the batch it stopped at:
plain shuffled batches, and batches without repeated texts (no in-batch negative is a copy of a positive)."""

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
    An example that clashes with the batch being filled waits for the next one; batches are full except
    possibly the last ones. Set the epoch with :meth:`set_epoch` for a fresh order each epoch.

    Args:
        texts_of: index -> the texts of that example (e.g. query and positive).
        n: number of examples.
        batch_size: examples per batch.
        drop_last: drop a final batch smaller than ``batch_size``.
        seed: shuffling seed.
    """

    def __init__(self, texts_of: Callable[[int], tuple[str, ...]], n: int, batch_size: int,
                 drop_last: bool = False, seed: int = 0):
        self.texts_of, self.n, self.batch_size, self.drop_last, self.seed = texts_of, n, batch_size, drop_last, seed
        self.epoch, self.start = 0, 0
        self._plan = self._make_plan()

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan epoch ``epoch``; iteration begins at batch ``start`` (a resumed run's position)."""
        self.epoch, self.start = epoch, start
        self._plan = self._make_plan()

    def _make_plan(self) -> list[list[int]]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        upcoming, waiting = iter(order), deque()
        batches: list[list[int]] = []
        while True:
            batch, seen = [], set()

            def fits(i: int) -> bool:
                texts = set(self.texts_of(i))
                if texts & seen:
                    return False
                batch.append(i)
                seen.update(texts)
                return True

            for _ in range(len(waiting)):  # earlier clashes get the first chance
                i = waiting.popleft()
                if len(batch) >= self.batch_size or not fits(i):
                    waiting.append(i)
            for i in upcoming:
                if not fits(i):
                    waiting.append(i)
                if len(batch) >= self.batch_size:
                    break
            if not batch:
                break
            batches.append(batch)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan[self.start:])

    def __len__(self) -> int:
        """Batches in the whole epoch (also when iteration starts later)."""
        return len(self._plan)


class ShuffledBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size`` indices, a fresh order per epoch drawn from ``(seed, epoch)``.

    Unlike a ``DataLoader(shuffle=True)`` generator, the order of epoch e does not depend on how many
    epochs were drawn before, so a resumed run sees the same batches as an uninterrupted one.

    Args:
        n: number of examples.
        batch_size: indices per batch.
        drop_last: drop a final batch smaller than ``batch_size``.
        seed: shuffling seed.
    """

    def __init__(self, n: int, batch_size: int, drop_last: bool = False, seed: int = 0):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order; iteration begins at batch ``start``."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        for b in range(self.start, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
