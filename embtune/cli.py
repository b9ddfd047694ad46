"""The ``embtune`` command: a thin Hydra entry around :func:`embtune.recipes.finetune.train`."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from embtune.training.threads import openmp_defaults

openmp_defaults()  # before torch loads: OpenMP reads its thread count and wait policy once (see the module)
# a batch tokenised during training stays on one thread beside torch's (the token cache turns it on for its
# cold start: embtune.data.token_cache); set here so that `embtune` and `python -m embtune.cli` agree
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from embtune.config import CONFIG_PATH, normalize
from embtune.run.errors import full_traceback, message, user_error
from embtune.run.outputs import clear_run, rank, record_failure, refuse_if_used
from embtune.run.progress import quiet_libraries
from hydra_plugins.embtune_optuna_sweeper import OptunaSweeper

# Hydra finds plugins by walking the folders of the hydra_plugins namespace; an editable install
# (pip install -e .) reaches this one through an import hook instead, which that walk never sees
Plugins.instance().register(OptunaSweeper)

log = logging.getLogger("embtune")

@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train one job; returns the final ``eval.metric`` (what a Hydra sweeper optimises), NaN when the
    metric is undefined (reported as missing in ``summary.json``).

    In a multirun a failing job is recorded as failed (:func:`record_failure`) and returns NaN, so the
    sweep goes on (Hydra's sweepers would stop the sweep on an exception; Optuna marks a NaN trial as
    failed); a user error is logged as one line, any other with its traceback. A sweep where
    no job completed exits non-zero at its end (:class:`embtune.run.SweepTable`). A single run exits after recording it: with ``Error: <message>`` for bad input or settings
    (:func:`embtune.run.errors.user_error`), else with the exception.
    """
    from embtune.recipes import run
    from embtune.run.redact import install_log_filter, redact, redact_text, redact_yaml_file
    from embtune.training.distributed import teardown

    install_log_filter()  # before anything is logged: no API key or token in the console or cli.log
    quiet_libraries()
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    if rank() > 0:  # torchrun: rank 0 logs, evaluates and saves; the others only train
        try:
            run(cfg, output_dir, logger=None)
        except Exception as e:
            cause = user_error(e) if not full_traceback() else None
            if cause is None:
                raise
            # one line, as rank 0 gives: it may be this process's alone (its share of a streamed file)
            raise SystemExit(f"Error (rank {rank()}): {redact_text(message(cause))}") from None
        teardown()
        return None
    if cfg.overwrite:
        clear_run(output_dir)
    refuse_if_used(output_dir)  # a backstop: NeverOverwrite normally refuses earlier
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml") if hc.output_subdir else ():
        redact_yaml_file(output_dir / hc.output_subdir / name)  # what Hydra saved before this job started
    log.info("run folder %s (its config: %s)", output_dir,
             output_dir / hc.output_subdir / "config.yaml" if hc.output_subdir else "not saved")
    multirun = hc.mode == RunMode.MULTIRUN
    logger = None
    try:
        normalize(cfg)  # key=None as null, types checked by key, prompt escapes: before anything is built
        if hc.output_subdir:  # the saved config reads as the run used it (null, not the string 'None')
            OmegaConf.save(cfg, output_dir / hc.output_subdir / "config.yaml")
            redact_yaml_file(output_dir / hc.output_subdir / "config.yaml")
        run_config = OmegaConf.to_container(cfg, resolve=True)
        if cfg.get("resume_from"):
            run_config = _resume_config(cfg, hc.overrides.task)
        run_config = redact(run_config)
        if cfg.get("print_config"):
            log.info("config:\n%s", OmegaConf.to_yaml(run_config))
        if multirun and cfg.get("hub") and cfg.hub.push:  # every job would replace the previous job's upload
            raise ValueError(f"hub.push=true in a multirun: every job would push to {cfg.hub.repo_id}, the last one "
                             "winning; push the job you choose afterwards with embtune-push SWEEP_DIR/JOB REPO_ID")
        # partial: the resolved config holds _target_ keys that instantiate must not build
        logger = instantiate(cfg.logger, _partial_=True)(
            output_dir=output_dir, run_config=run_config,
            group=cfg.logger.get("group") or (Path(hc.sweep.dir).name if multirun else None),
            name=redact_text(cfg.logger.get("name") or (" ".join(hc.overrides.task) or "defaults")),
            # wandb tags are at most 64 characters
            **({"tags": [redact_text(o)[:64] for o in hc.overrides.task]} if cfg.logger.get("wandb") else {}))
        summary = run(cfg, output_dir, logger)
    except Exception as e:
        if logger is not None:
            logger.finish(exit_code=1)
        record_failure(output_dir, e)
        cause = user_error(e) if not full_traceback() else None  # bad data or settings: shown as one line
        if not multirun:
            if cause is not None:
                # the message names the file, row and field; a traceback adds nothing
                line = f"Error: {redact_text(message(cause))}"
                _to_log_files(line)
                raise SystemExit(f"{line}\n(traceback: {output_dir / 'summary.json'}; "
                                 "HYDRA_FULL_ERROR=1 prints it here)") from None
            raise
        where = output_dir / "summary.json"
        if cause is not None:  # one line, as a single run
            log.error("job %s failed: %s; the sweep goes on (traceback: %s)", hc.job.num,
                      redact_text(message(cause)), where)
        else:
            log.exception("job %s failed; the sweep goes on (recorded in %s)", hc.job.num, where)
        return math.nan
    except BaseException:  # Ctrl-C, SystemExit: close wandb, stop everything
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    logger.finish()
    teardown()
    if (output_dir / "model").is_dir():
        log.info("model saved to %s", output_dir / "model")
    log.info("run folder: %s (summary.json, metrics.jsonl, cli.log)", output_dir)
    return sweep_value(summary, cfg.eval.metric)


def _to_log_files(message: str) -> None:
    """Write ``message`` to the run's log files only (``cli.log``: Hydra's file handlers on the root
    logger); the screen gets it once, from the exit."""
    record = logging.LogRecord("embtune", logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def sweep_value(summary: dict, metric: str) -> float:
    """The job's final ``metric`` as a sweeper reads it: NaN where ``summary.json`` reports it missing
    (undefined: no relevant document, a constant similarity), as for a failed job."""
    value = summary["final"].get(metric)
    return math.nan if value is None else float(value)


def _resume_config(cfg: DictConfig, overrides: list[str]) -> dict:
    """The config of the checkpoint being resumed (what the run will use); command-line settings other
    than ``resume_from``, ``logger`` and ``hub.*`` (where the finished model goes) are ignored, with a warning."""
    from embtune.training import checkpoint

    state, _ = checkpoint.load(cfg.resume_from)
    ignored = [o for o in overrides if not o.lstrip("+~").startswith(("resume_from=", "logger", "hub."))]
    if ignored:
        log.warning("resume_from: the checkpoint's config is used; ignoring %s", " ".join(ignored))
    return {**state["config"], "resume_from": str(cfg.resume_from)}


if __name__ == "__main__":
    main()
