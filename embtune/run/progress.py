"""What a person reads during a run: the training progress and the base-vs-fine-tuned table (a sweep's
table and plots: ``embtune.run.sweep_report``).

On a terminal the progress is a rich bar (step, epoch, loss, lr, pairs/s, elapsed, ETA). Anywhere else (a
batch job, ``nohup``, ``| tee``, ``> log.txt``) a bar prints once, at the end, so instead one plain line is
logged every ``train.log_every`` steps. Both go to the run's ``cli.log`` (Hydra's file handler): on a
terminal the plain lines are marked file-only, so the screen shows the bar and the file the lines.

Encoding texts to evaluate or mine (:func:`encoding_progress`) gets a transient bar on a terminal (texts
done / total, texts/s, ETA), drawn below the training bar when one is running; elsewhere no bar (the
evaluator logs one line when it starts and one when it ends). Under ``torchrun`` only rank 0 draws.

The libraries' own bars (transformers' ``Loading weights``, downloads) are off in every command
(:func:`quiet_libraries`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from embtune.run.outputs import rank

log = logging.getLogger("embtune.progress")

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # rich wraps at 80 columns in logs and pipes; sweep tables are wider

FILE_ONLY = {"file_only": True}  # `extra=` of a record the screen already shows another way


class ScreenFilter(logging.Filter):
    """Drops file-only records from a console handler (the rich bar or table shows them there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def keep_file_only_records_off_the_screen() -> None:
    """Install :class:`ScreenFilter` on the root logger's stream handlers (not on its file handlers)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, ScreenFilter) for f in handler.filters):
                handler.addFilter(ScreenFilter())


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """One run's progress: a rich bar on a terminal, plain log lines every ``log_every`` steps (always in
    the log file; on the screen too when it is not a terminal). ``show=False`` (torchrun ranks > 0) is silent."""

    def __init__(self, total: int, steps_per_epoch: int, log_every: int, bar: Progress | None, show: bool):
        self.total, self.log_every = total, max(log_every, 1)
        self.steps_per_epoch = max(steps_per_epoch, 1) if steps_per_epoch is not None else None
        self.bar, self.show, self.started = bar, show, time.perf_counter()
        self.task = (bar.add_task("train", total=total, loss=float("nan"), lr=0.0, pps=0.0, epoch=self._epoch(0))
                     if bar else None)
        self.first_step: int | None = None

    def update(self, step: int, loss: float, lr: float, pairs_per_s: float) -> None:
        if not self.show:
            return
        epoch = self._epoch(step)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, lr=lr, pps=pairs_per_s, epoch=epoch)
        if self.first_step is None:  # a resumed run counts its rate from the step it resumed at
            self.first_step = step - 1
        if step % self.log_every == 0 or step == self.total:
            done = step - self.first_step
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
            log.info("step %d/%d  %sloss %.4f  lr %.2e  %.1f pairs/s  ETA %s", step, self.total, epoch,
                     loss, lr, pairs_per_s, _eta(eta), extra=FILE_ONLY if self.bar is not None else None)

    def _epoch(self, step: int) -> str:
        """``"epoch 1.25  "``, or "" when the epoch length is not known."""
        return f"epoch {step / self.steps_per_epoch:.2f}  " if self.steps_per_epoch else ""


@contextmanager
def progress_bar(total: int, steps_per_epoch: int | None = 1, log_every: int = 10, show: bool = True):
    """Training progress for ``total`` steps (see the module docstring); yields an object with
    ``update(step, loss, lr, pairs_per_s)``. ``steps_per_epoch`` None (a stream, whose epochs have no known
    length): no epoch is shown."""
    if show and console.is_terminal:
        keep_file_only_records_off_the_screen()
        bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[epoch]}loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                       "{task.fields[pps]:.1f} pairs/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        with bar:
            yield _Progress(total, steps_per_epoch, log_every, bar, show)
    else:
        yield _Progress(total, steps_per_epoch, log_every, None, show)


class _TextsPerSecond(ProgressColumn):
    """The encoding rate, in texts per second (rich's own speed column counts bytes)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} texts/s" if task.speed else "", style="progress.data.speed")


def _no_progress(n: int) -> None:
    pass


@contextmanager
def encoding_progress(what: str, total: int, show: bool = True):
    """A transient bar while ``total`` texts are encoded for ``what`` (e.g. ``evaluate scifact``), on a
    terminal and on rank 0 only (the ``RANK`` of ``torchrun``); nested below the training bar when that
    one is running (rich >= 14.1 nests live displays). Yields ``advance(n)``: call it with the number of
    texts each encoded batch held (``Embedder.encode(..., progress=advance)``); off a terminal it does
    nothing and nothing is written."""
    if not (show and total > 0 and console.is_terminal and rank() == 0):
        yield _no_progress
        return
    bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), _TextsPerSecond(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task(what, total=total)
    with bar:
        yield lambda n: bar.advance(task, n)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def comparison_table(base: dict[str, float], final: dict[str, float]) -> Table:
    """Base and fine-tuned metrics side by side, with the difference."""
    table = Table(title="metrics: base vs fine-tuned")
    for col in ("metric", "base", "fine-tuned", "Δ"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in dict.fromkeys([*base, *final]):
        b, f = base.get(name), final.get(name)
        delta = f - b if b is not None and f is not None else None
        table.add_row(name, _fmt(b), _fmt(f), ("+" if delta and delta > 0 else "") + _fmt(delta))
    return table


def print_comparison(base: dict[str, float], final: dict[str, float]) -> None:
    """Show :func:`comparison_table`: drawn by rich on a terminal, and logged as plain text (so it is in
    ``cli.log`` and in a piped log)."""
    table = comparison_table(base, final)
    text = io.StringIO()
    Console(file=text, width=120, color_system=None).print(table)
    if console.is_terminal:
        keep_file_only_records_off_the_screen()
        console.print(table)
    log.info("\n%s", text.getvalue().rstrip(), extra=FILE_ONLY if console.is_terminal else None)


def quiet_libraries() -> None:
    """Keep the libraries' own noise out of a run's output: the download/load/save bars of transformers,
    huggingface_hub and datasets, their deprecation warnings (FutureWarning, DeprecationWarning), and
    faiss's lines on which CPU build it loaded. Their errors and real warnings still show."""
    import warnings

    for module in ("transformers", "huggingface_hub", "datasets", "torch", "sentence_transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    from datasets.utils.logging import disable_progress_bar as datasets_quiet
    from huggingface_hub.utils import disable_progress_bars as hub_quiet
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    hub_quiet()
    datasets_quiet()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # "Loading faiss with AVX2 support." and the like
