"""embtune's Optuna sweeper where Hydra looks for plugins.

Hydra builds a sweeper only from a class under the ``hydra_plugins`` package (``Plugins._instantiate``
refuses any other ``_target_``), so this namespace package names :class:`embtune.run.optuna_sweeper.
OptunaSweeper` here. Hydra imports every module under ``hydra_plugins`` at start-up: keep this one light
(Optuna is imported only when a sweep runs). ``embtune.cli`` also registers the class with Hydra: after
``pip install -e .`` this folder is reached through an import hook that Hydra's scan does not walk.
"""

from embtune.run.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """``hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml); see :mod:`embtune.run.optuna_sweeper`."""
