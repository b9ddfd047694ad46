"""What a person reads during a run: the progress bar and the base-vs-fine-tuned table (a sweep's
table and plots: ``embtune.run.sweep_report``)."""

from __future__ import annotations

import os
from contextlib import contextmanager

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
