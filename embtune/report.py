"""What a person reads: the progress bar, the base-vs-fine-tuned table, and a sweep's table."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # rich wraps at 80 columns in logs and pipes; sweep tables are wider


class _Bar:
    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def update(self, step: int, loss: float, lr: float, pairs_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, pps=pairs_per_s)


@contextmanager
def progress_bar(total: int):
    """A rich progress bar showing step, loss, learning rate and pairs per second."""
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[pps]:.1f} pairs/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    with progress:
        yield _Bar(progress, progress.add_task("train", total=total, loss=float("nan"), lr=0.0, pps=0.0))


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def print_comparison(base: dict[str, float], final: dict[str, float]) -> None:
    """Print base and fine-tuned metrics side by side, with the difference."""
    table = Table(title="retrieval metrics: base vs fine-tuned")
    for col in ("metric", "base", "fine-tuned", "Δ"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in dict.fromkeys([*base, *final]):
        b, f = base.get(name), final.get(name)
        delta = f - b if b is not None and f is not None else None
        table.add_row(name, _fmt(b), _fmt(f), ("+" if delta and delta > 0 else "") + _fmt(delta))
    console.print(table)


def sweep_rows(sweep_dir: str | Path, metric: str = "ndcg@10") -> list[dict]:
    """One dict per job folder of a sweep: job number, overrides (key -> value), temperature, margin,
    base and final ``metric``; a job without summary.json is reported as failed or running."""
    rows = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job in jobs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = {}
        if overrides_file.is_file():
            for line in overrides_file.read_text().splitlines():
                key, _, value = line.removeprefix("- ").partition("=")
                overrides[key.strip()] = value.strip()
        row = {"job": job.name, "overrides": overrides, "status": "failed or running"}
        summary_file = job / "summary.json"
        if summary_file.is_file():
            s = json.loads(summary_file.read_text())
            row.update(status="done", temperature=s.get("temperature"), margin=s.get("margin"),
                       base=s.get("base", {}).get(metric), final=s.get("final", {}).get(metric))
        rows.append(row)
    return rows


def print_sweep(sweep_dir: str | Path, metric: str = "ndcg@10") -> None:
    """Print one table of a sweep's jobs: the swept overrides (keys whose value differs between jobs) as
    columns, then temperature, margin, base and final ``metric``."""
    rows = sweep_rows(sweep_dir, metric)
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys[:1]
    table = Table(title=f"sweep {sweep_dir}")
    for col in ("job", *swept, "temperature", "margin", f"base {metric}", f"final {metric}", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["job"], *(r["overrides"].get(k, "") for k in swept), _fmt(r.get("temperature")),
                      _fmt(r.get("margin")), _fmt(r.get("base")), _fmt(r.get("final")), r["status"])
    console.print(table)


class SweepTable(Callback):
    """Hydra callback: at the end of a multirun, print the sweep's table."""

    def __init__(self, metric: str = "ndcg@10"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print_sweep(config.hydra.sweep.dir, self.metric)
