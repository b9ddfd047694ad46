"""Run logging: ``metrics.jsonl`` in the run directory, and wandb (offline by default)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from embtune.run.redact import redact, redact_text


class RunLogger:
    """Writes one JSON object per event to ``metrics.jsonl`` and mirrors it to wandb.

    Args:
        output_dir: the run directory.
        run_config: the resolved config (a plain dict), sent to wandb whole.
        wandb: log to wandb as well.
        project, mode, group, name, tags: wandb run settings (mode "offline" needs no account).
    """

    def __init__(self, output_dir: str | Path, run_config: dict | None = None, wandb: bool = True,
                 project: str = "embtune", mode: str = "offline", group: str | None = None,
                 name: str | None = None, tags: list[str] | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._wandb = None
        if wandb:
            import wandb as wb

            # wandb records the command line in the run's metadata: a token pasted into an override must
            # not travel with it
            argv, sys.argv = sys.argv, [redact_text(a) for a in sys.argv]
            try:
                self._wandb = wb.init(project=project, mode=mode, group=group, name=name, tags=tags,
                                      config=redact(run_config), dir=str(self.output_dir), reinit="finish_previous")
            finally:
                sys.argv = argv

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record metrics at a training step. Non-finite values are written as null, never as NaN."""
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

    def summary(self, values: dict) -> None:
        """Set the wandb run summary (flattened with '/')."""
        if self._wandb is not None:
            self._wandb.summary.update(_flatten(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the file and the wandb run; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class StageLogger:
    """A run logger seen through a stage: metric names get ``prefix``, steps get ``step_offset``."""

    def __init__(self, logger, prefix: str = "", step_offset: int = 0):
        self.logger, self.prefix, self.step_offset = logger, prefix, step_offset

    def log(self, metrics: dict, step: int) -> None:
        self.logger.log({self.prefix + k: v for k, v in metrics.items()}, step=step + self.step_offset)

    def summary(self, values: dict) -> None:
        self.logger.summary({self.prefix.rstrip("/"): values} if self.prefix else values)
