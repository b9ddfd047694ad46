"""Bayesian sweeps on Optuna (>= 4) with a study that lasts: ``embtune -m hparams_search=optuna``.

A Hydra ``Sweeper`` (Hydra's public plugin interface) that asks Optuna for each trial's parameters, launches
the trials as jobs through the configured Hydra launcher (as Hydra's basic sweeper does), and tells Optuna
the value each job returned. Hydra builds sweepers only from the ``hydra_plugins`` package, so
``hydra_plugins/embtune_optuna_sweeper`` names this class there; ``conf/hydra/sweeper/optuna.yaml`` picks it.

The study lives in ``hydra.sweeper.storage`` (an RDB URL such as ``sqlite:///sweeps/study.db``; null keeps
it in memory) and is loaded when it exists, so:

- ``n_trials`` counts the study's finished trials (completed + failed), not this run's: the same command
  started again after an interrupt runs only the trials still missing.
- a trial whose process died (killed, Ctrl-C) is told to Optuna as failed and marked ``interrupted``; it
  does not count, and its parameters are queued again, so the restart runs it first.
- workers on several machines may share one study (PostgreSQL or MySQL URL; sqlite only on one machine):
  each asks for trials until the study holds ``n_trials`` finished or running ones.

A job that returns NaN or None (an undefined metric; a failed embtune job returns NaN) or raises is a
failed trial, never a value.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

from hydra.core.override_parser.types import Transformer
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from embtune.run.search_space import choice_strings, search_space

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
FAILURE = "failure"  # user attr of a trial whose job ran and failed (counted); interrupted trials lack it
WORKER = "worker"  # user attr: {"host", "pid"} of the sweep process that asked for the trial


def objective_value(ret: JobReturn) -> tuple[float | None, str | None]:
    """``(value, None)`` for a job that returned a finite number, else ``(None, why it failed)``: the job
    raised, returned None (no metric), NaN/±inf (undefined metric, or embtune's failed job) or no number."""
    if ret.status == JobStatus.FAILED:
        try:
            ret.return_value  # raises the job's exception
        except Exception as e:
            return None, f"the job raised {type(e).__name__}: {e}"
    value = ret.return_value
    if value is None:
        return None, "the job returned None (no metric)"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number"
    if not math.isfinite(value):
        return None, f"the job returned {value} (undefined metric or failed job)"
    return value, None


def finished_trials(study) -> list:
    """The study's trials that count towards ``n_trials``: completed ones and failed ones whose job ran."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and FAILURE in t.user_attrs)]


def _job_error(job_dir: str | None) -> str:
    """``": <error>"`` from a failed embtune job's ``summary.json``, else ``""``."""
    import json

    try:
        error = json.loads((Path(job_dir) / "summary.json").read_text()).get("error") if job_dir else None
    except (OSError, ValueError):
        error = None
    return f": {error}" if error else ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OptunaSweeper(Sweeper):
    """Hydra sweeper: ``n_trials`` trials of an Optuna study, ``n_jobs`` launched at a time.

    Args:
        direction: ``maximize`` or ``minimize`` the value the job returns (embtune: ``eval.metric``).
        study_name: the study's name in ``storage``.
        storage: an RDB URL (``sqlite:///path/study.db``, ``postgresql://...``) or None (in memory).
        n_trials: trials the study should hold, finished (completed + failed) or running.
        n_jobs: trials asked for and launched together (run in parallel with ``hydra/launcher=joblib``).
        sampler: a config node with ``_target_`` (e.g. ``optuna.samplers.TPESampler``), or None for
            Optuna's default. Its ``seed`` is offset by the number of trials already in the study, so a
            resumed study does not replay its first random trials.
        params: ``key -> search space`` (see :func:`embtune.run.search_space.search_space`); the command line may add more.

    Raises:
        ValueError: a ``direction`` other than maximize/minimize, ``n_trials`` or ``n_jobs`` below 1, or
            a stored study whose direction differs.
    """

    def __init__(self, direction: str = "maximize", study_name: str | None = None, storage: str | None = None,
                 n_trials: int = 20, n_jobs: int = 1, sampler: DictConfig | None = None,
                 params: DictConfig | None = None) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction}: expected one of {', '.join(DIRECTIONS)}")
        if storage and not study_name:
            raise ValueError(f"hydra.sweeper.storage={storage} needs a hydra.sweeper.study_name to load the study by")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be at least 1")
        self.direction, self.study_name, self.storage = direction, study_name, storage
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler = sampler
        self.params = params or {}
        self.config = self.launcher = self.hydra_context = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _study(self):
        import optuna
        from hydra.utils import instantiate

        if self.storage and self.storage.startswith("sqlite:///") and self.storage != "sqlite:///:memory:":
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # sqlite won't
        sampler = None
        if self.sampler is not None:
            seed = self.sampler.get("seed")
            if seed is not None and self.storage and self.study_name in optuna.get_all_study_names(self.storage):
                # a resumed study must not replay its first random trials: offset by the trials stored so far
                seed += len(optuna.load_study(study_name=self.study_name, storage=self.storage).trials)
            sampler = instantiate(self.sampler, **({"seed": seed} if seed is not None else {}))
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            raise ValueError(f"hydra.sweeper.direction={self.direction}, but study {self.study_name!r} in "
                             f"{self.storage} was created to {study.direction.name.lower()}")
        return study

    def _requeue_interrupted(self, study) -> None:
        """Fail this host's running trials whose sweep process is gone, and queue their parameters again."""
        from optuna.trial import TrialState

        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get(WORKER) or {}
            if worker.get("host") != host or _process_alive(worker.get("pid", -1)):
                continue  # running here or on another machine
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker on this host got there first
                continue
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.warning("trial %d was interrupted (process %s is gone): failed, its parameters queued again",
                        t.number, worker.get("pid"))

    def sweep(self, arguments: list[str]) -> None:
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        overrides = [*(f"{k}={v}" for k, v in self.params.items()), *arguments]
        space, fixed = search_space(overrides)
        strings = choice_strings(overrides)
        if not space:
            raise ValueError("hydra.sweeper.params: nothing to search (give at least one interval, range or "
                             "choice, e.g. loss.temperature='tag(log, interval(0.01, 0.2))')")
        study = self._study()
        self._requeue_interrupted(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("study %r (%s): %d of %d trials finished; sampler %s", study.study_name,
                 self._where(), len(finished_trials(study)), self.n_trials, type(study.sampler).__name__)
        worker = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            left = self.n_trials - len(finished_trials(study)) - running
            if left <= 0:
                break
            trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            _refuse_used_job_folders(study, trials, sweep_dir)
            batch = []
            for t in trials:
                t.set_user_attr(WORKER, worker)
                t.set_user_attr("job_dir", str(sweep_dir / str(t.number)))
                # the job folder is named after the trial: unique across restarts and workers
                batch.append((*(f"{k}={strings[k][v] if k in strings else Transformer.str(v)}"
                                for k, v in t.params.items()),
                              *(f"{k}={v}" for k, v in fixed.items()), f"hydra.sweep.subdir={t.number}"))
            try:
                self.validate_batch_is_legal(batch)
                returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except Exception as e:  # the config does not compose, or the launcher broke: stop here
                for t in trials:
                    t.set_user_attr(FAILURE, f"{type(e).__name__}: {e}")
                    study.tell(t, state=TrialState.FAIL)
                raise
            except BaseException:  # Ctrl-C: not the trials' fault, run them again next time
                for t in trials:
                    study.tell(t, state=TrialState.FAIL)
                    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                raise
            for t, ret in zip(trials, returns):
                value, why = objective_value(ret)
                if value is None:
                    why += _job_error(ret.working_dir)
                    t.set_user_attr(FAILURE, why)
                    study.tell(t, state=TrialState.FAIL)
                    log.warning("trial %d failed: %s", t.number, why)
                else:
                    study.tell(t, value)
        self._report(study, sweep_dir)

    def _where(self) -> str:
        from embtune.run.redact import redact_text

        return redact_text(self.storage) if self.storage else "in memory"

    def _report(self, study, sweep_dir: Path) -> None:
        """Print every trial of the study (this run's and earlier ones'), write ``optimization_results.yaml``
        in the sweep folder; an all-failed study ends with SystemExit and a one-line message."""
        from optuna.trial import TrialState
        from rich.table import Table

        from embtune.run.progress import console

        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        keys = list(dict.fromkeys(k for t in trials for k in t.params))
        failed = len(finished_trials(study)) - len(done)
        interrupted = sum(t.state == TrialState.FAIL for t in trials) - failed
        table = Table(title=f"study {study.study_name} ({self._where()}): {len(trials)} trials, {len(done)} "
                            f"completed, {failed} failed, {interrupted} interrupted")
        for col in ("trial", *keys, "value", "state", "job folder"):
            table.add_column(col, overflow="fold", justify="right" if col in ("trial", "value") else "left")
        for t in trials:
            state = t.state.name.lower()
            if t.state == TrialState.FAIL:
                state = f"failed: {t.user_attrs[FAILURE][:80]}" if FAILURE in t.user_attrs else "interrupted"
            table.add_row(str(t.number), *(f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float)
                                           else str(t.params.get(k, "")) for k in keys),
                          "—" if t.value is None else f"{t.value:.4f}", state, t.user_attrs.get("job_dir", ""))
        console.print(table)
        results = {"name": "optuna", "study_name": study.study_name, "storage": self._where(),
                   "direction": self.direction, "best_params": None, "best_value": None,
                   "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                               **{k: t.user_attrs[k] for k in (FAILURE, "job_dir", "retry_of") if k in t.user_attrs}}
                              for t in trials]}
        if done:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value)
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        if not done:
            raise SystemExit(f"Error: all {len(finished_trials(study))} finished trials of study "
                             f"{study.study_name!r} failed, so there is no best value; each trial's reason is in "
                             f"the table above and in its job folder's summary.json")


def _refuse_used_job_folders(study, trials: list, sweep_dir: Path) -> None:
    """A new trial's job folder (``sweep_dir/<trial number>``) that already holds a run belongs to another
    study or sweep: refuse it, telling Optuna the trials failed, rather than write into it.

    Raises:
        SystemExit: naming the folder and how to go on.
    """
    from optuna.trial import TrialState

    from embtune.run.outputs import refuse_if_used

    try:
        for t in trials:
            refuse_if_used(sweep_dir / str(t.number))
    except FileExistsError as e:
        for t in trials:
            t.set_user_attr(FAILURE, "its job folder holds another run")
            study.tell(t, state=TrialState.FAIL)
        raise SystemExit(f"Error: {e} (a study continues in the sweep folder it started in; another study "
                         "needs its own hydra.sweep.dir)") from None
