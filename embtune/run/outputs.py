"""The run folder: never overwrite a run, clear one on request, record a failure or an interruption, write JSON
atomically."""

from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from embtune.run.redact import redact_text

RUN_FILES = ("summary.json", "metrics.jsonl")  # present once a run has started: never overwrite
# what a run writes; `overwrite=true` removes these before the new run (Hydra rewrites .hydra/ itself)
RUN_OUTPUTS = (*RUN_FILES, "model", "model.tmp", "checkpoints")


class NeverOverwrite(Callback):
    """Hydra callback: refuse to start when the run folder (or a job folder of the sweep folder) already
    holds a run. It runs before Hydra writes ``.hydra/`` into the folder, so nothing there is touched.
    It exits with SystemExit: Hydra turns a callback's exceptions into warnings. ``overwrite=true``
    turns the check off (each job then clears its own folder, see :func:`clear_run`). A multirun with
    ``hub.push=true`` is refused here too, once (every job would replace the one repo's model); a swept
    ``hub.push=true,false`` is left to each job's own check."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not config.get("overwrite"):
            self._check([Path(config.hydra.run.dir)])

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        hub = config.get("hub") or {}
        if hub.get("push") is True and rank() == 0:  # the same for every job: refused once, before any runs
            raise SystemExit(f"Error: hub.push=true in a multirun: every job would push to {hub.get('repo_id')}, "
                             "the last one winning; push the job you choose afterwards with "
                             "embtune-push SWEEP_DIR/JOB REPO_ID")
        if config.get("overwrite"):
            return
        if config.hydra.sweeper.get("storage"):  # a lasting Optuna study goes on in its own folder: the sweeper
            return                               # checks each new trial's job folder (optuna_sweeper.py)
        sweep = Path(config.hydra.sweep.dir)
        self._check(sorted(sweep.iterdir()) if sweep.is_dir() else [])

    @staticmethod
    def _check(folders: list[Path]) -> None:
        if rank() > 0:  # rank 0 may already have started the run in the same folder
            return
        try:
            for folder in folders:
                refuse_if_used(folder)
        except FileExistsError as e:
            raise SystemExit(f"Error: {e}") from None


def refuse_if_used(folder: Path) -> None:
    used = [f for f in RUN_FILES if (folder / f).exists()]
    if used:
        raise FileExistsError(f"{folder} already holds a run ({', '.join(used)}); embtune never overwrites one: "
                              "choose another hydra.run.dir / hydra.sweep.dir, or pass overwrite=true")


def clear_run(folder: Path) -> None:
    """Remove a previous run's outputs from ``folder`` (``overwrite=true``); other files stay."""
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def record_failure(folder: Path, error: BaseException) -> None:
    """Mark the run in ``folder`` as failed: ``summary.json`` gets ``status: failed``, the error and its
    traceback (keeping whatever the run had already written there), so a sweep's report shows it."""
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        summary = {}
    summary.update(status="failed", error=redact_text(f"{type(error).__name__}: {error}"),
                   traceback=redact_text("".join(traceback.format_exception(error))))
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, summary)


def record_interrupted(folder: Path, summary: dict) -> None:
    """Write ``summary`` (``status: interrupted``: a run stopped by SIGINT/SIGTERM after saving a checkpoint)
    as ``folder/summary.json``, atomically; a completed run's summary there is never replaced. The resumed
    run's completed summary replaces it (:func:`write_json`)."""
    path = folder / "summary.json"
    try:
        if json.loads(path.read_text()).get("status") == "completed":
            return
    except (OSError, ValueError, AttributeError):  # none yet, or not a summary: write ours
        pass
    write_json(path, summary)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON through a temporary file and a rename: a reader (a sweep's report,
    a parallel job) sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def rank() -> int:
    """This process's rank under torchrun or srun (0 for a world of one): only rank 0 checks, logs and
    writes the run. Read from the launcher's variables (:func:`embtune.training.distributed.process_env`),
    since it is needed before the process group forms; SLURM variables that form no group give 0 here and
    are refused when the group is set up."""
    from embtune.training.distributed import process_env  # imports torch: only when asked

    try:
        env = process_env(os.environ)
    except ValueError:
        return 0
    return env["rank"] if env else 0
