"""The console scripts ``embtune-eval`` and ``embtune-mine`` (``[project.scripts]`` in pyproject.toml): thin
entries that put the OpenMP defaults in the environment (:func:`embtune.training.threads.openmp_defaults`:
the CPUs this process may use, sleeping waiters) before torch loads, as ``embtune`` (:mod:`embtune.cli`)
does, and only then import their command (:mod:`embtune.recipes.evaluate`, :mod:`embtune.recipes.mine`),
which loads torch. ``embtune-push`` and ``embtune-report`` load no torch and need no entry.

``python -m embtune.recipes.evaluate`` (or ``.mine``) imports the ``embtune.recipes`` package, and torch with
it, before its own code runs: it keeps the OpenMP runtime's defaults.
"""

from __future__ import annotations

from embtune.training.threads import openmp_defaults


def evaluate():
    """``embtune-eval``: :func:`embtune.recipes.evaluate.main` (Hydra reads the command line)."""
    openmp_defaults()  # before torch loads: OpenMP reads its thread count and wait policy once
    from embtune.recipes.evaluate import main

    return main()


def mine():
    """``embtune-mine``: :func:`embtune.recipes.mine.main` (Hydra reads the command line)."""
    openmp_defaults()
    from embtune.recipes.mine import main

    return main()
