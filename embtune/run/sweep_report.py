"""A sweep read as one comparison: ``embtune-report SWEEP_DIR`` prints a table of its jobs and plots the
metric against temperature and against margin.

A sweep folder holds one numbered folder per job (``outputs/sweeps/<date_time>/<job>/``), each with
``.hydra/overrides.yaml`` and ``.hydra/config.yaml`` (written when the job starts) and ``summary.json``
(written when it ends: ``status`` ``completed``, ``failed`` or ``interrupted``). A job without ``summary.json`` is still
running (or was killed), so the report works on a sweep in progress or half failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from embtune.run.progress import console

STATUS_ORDER = {"completed": 0, "running": 1, "failed": 2}
MAX_TICKS = 12  # swept values labelled one by one on a plot's x axis


def _metric_key(metric: str) -> str:
    """``eval/ndcg@10`` and ``ndcg@10`` both name the summary's ``ndcg@10``."""
    return metric.removeprefix("eval/")


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):  # a job that is writing its .hydra/ right now
        return None


def _configured_loss(path: Path) -> dict:
    """The job's ``loss`` node with interpolations resolved (``loss.temperature=${...}`` sweeps)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path).loss, resolve=True) or {}
    except Exception:  # missing, being written, or an interpolation that needs Hydra's resolvers
        return {}


def job_rows(sweep_dir: str | Path, metric: str = "eval/ndcg@10") -> list[dict]:
    """One dict per job folder of a sweep, in job order.

    Keys: ``job``; ``overrides`` (key -> value as typed on the command line); ``temperature`` and
    ``margin`` (the configured ``loss.*`` values, None when the loss has none); ``status``
    (``completed``, ``failed`` or ``running``); ``base`` and ``final`` (``metric``, None when absent);
    ``train_s``, ``startup_s`` (seconds); ``error`` (for a failed job).

    Raises:
        NotADirectoryError: ``sweep_dir`` is not a folder.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotADirectoryError(f"{sweep_dir}: not a sweep folder (expected outputs/sweeps/<date_time>)")
    key = _metric_key(metric)
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = {}
        for item in _read_yaml(job / ".hydra" / "overrides.yaml") or []:
            k, _, v = str(item).partition("=")
            overrides[k] = v
        loss = _configured_loss(job / ".hydra" / "config.yaml")
        row = {"job": job.name, "overrides": overrides, "temperature": loss.get("temperature"),
               "margin": loss.get("margin"), "status": "running", "base": None, "final": None,
               "train_s": None, "startup_s": None, "error": None}
        if "scale" in loss and row["temperature"] is None:  # ArcFace: s = 1/τ
            row["temperature"] = 1.0 / loss["scale"]
        try:
            summary = json.loads((job / "summary.json").read_text())
        except (OSError, ValueError):  # not written yet, or being written
            summary = None
        if summary is not None:
            row.update(status=summary.get("status", "completed"), base=(summary.get("base") or {}).get(key),
                       final=(summary.get("final") or {}).get(key), train_s=summary.get("train_seconds"),
                       startup_s=summary.get("startup_seconds"), error=summary.get("error"))
        rows.append(row)
    return rows


def swept_keys(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (all keys when every job has the same ones)."""
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    return swept or keys


def _sort_key(row: dict):
    final = row["final"]
    missing = final is None or (isinstance(final, float) and math.isnan(final))
    return (STATUS_ORDER.get(row["status"], 3), missing, -(final or 0.0) if not missing else 0.0, int(row["job"]))


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}g}" if digits < 4 else f"{v:.{digits}f}"


def sweep_table(sweep_dir: str | Path, metric: str = "eval/ndcg@10") -> Table:
    """A rich table of the sweep's jobs, best ``metric`` first; running then failed jobs last."""
    rows = sorted(job_rows(sweep_dir, metric), key=_sort_key)
    keys = swept_keys(rows)
    done = sum(r["status"] == "completed" for r in rows)
    table = Table(title=f"sweep {sweep_dir}: {len(rows)} jobs, {done} completed, "
                        f"{sum(r['status'] == 'failed' for r in rows)} failed, "
                        f"{sum(r['status'] == 'running' for r in rows)} running")
    for col in ("job", *keys, "temperature", "margin", f"base {metric}", f"final {metric}", "Δ",
                "train s", "startup s", "status"):
        table.add_column(col, overflow="fold", justify="left" if col in ("job", *keys, "status") else "right")
    for r in rows:
        delta = r["final"] - r["base"] if r["final"] is not None and r["base"] is not None else None
        status = r["status"] if not r["error"] else f"failed: {r['error'][:80]}"
        table.add_row(r["job"], *(r["overrides"].get(k, "") for k in keys), _fmt(r["temperature"], 3),
                      _fmt(r["margin"], 3), _fmt(r["base"]), _fmt(r["final"]),
                      ("+" if delta and delta > 0 else "") + _fmt(delta), _fmt(r["train_s"], 3),
                      _fmt(r["startup_s"], 3), status)
    return table


def plot_sweep(sweep_dir: str | Path, metric: str = "eval/ndcg@10", out_dir: str | Path | None = None) -> list[Path]:
    """PNG plots of the final ``metric`` against temperature (log x) and against margin, one line per
    value of the other swept overrides; only completed jobs are plotted. A plot is skipped when no
    completed job has that hyperparameter. Up to ``MAX_TICKS`` swept values are each a labelled tick of
    the x axis; the base model's ``metric`` (``summary.json``'s ``base``) is a dashed horizontal line,
    one per line of the plot when the base differs between them (e.g. a swept pooling). Returns the files
    written (in ``out_dir``, default the sweep folder): ``<metric>_vs_temperature.png``,
    ``<metric>_vs_margin.png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in sweeps
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = [r for r in job_rows(sweep_dir, metric) if r["status"] == "completed" and r["final"] is not None]
    out_dir = Path(out_dir or sweep_dir)
    written = []
    for x in ("temperature", "margin"):
        points = [r for r in rows if r[x] is not None]
        if not points:
            continue
        keys = [k for k in swept_keys(points) if len({r["overrides"].get(k) for r in points}) > 1]
        others = [k for k in keys if not k.endswith(f".{x}") and not (x == "temperature" and k.endswith(".scale"))]
        lines: dict[str, list[tuple[float, float]]] = {}
        bases: dict[str, float | None] = {}
        for r in points:
            label = ", ".join(f"{k}={r['overrides'].get(k, '')}" for k in others) or metric
            lines.setdefault(label, []).append((r[x], r["final"]))
            bases.setdefault(label, r["base"])
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        colors = {}
        for label, xy in lines.items():
            xy.sort()
            (line,) = ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=label)
            colors[label] = line.get_color()
        # the base model's score: a line across the axes (hlines, so ax.get_lines() holds the sweep's lines only)
        known = {label: b for label, b in bases.items() if b is not None}
        if len(set(known.values())) == 1:
            ax.hlines(next(iter(known.values())), 0, 1, transform=ax.get_yaxis_transform(), linestyles="--",
                      linewidth=1, colors="gray", label=f"base model {next(iter(known.values())):.4f}")
        else:
            for label, base in known.items():
                ax.hlines(base, 0, 1, transform=ax.get_yaxis_transform(), linestyles="--", linewidth=1,
                          colors=colors[label], label=f"base model, {label}")
        if x == "temperature" and all(p[0] > 0 for xy in lines.values() for p in xy):
            ax.set_xscale("log")
        values = sorted({p[0] for xy in lines.values() for p in xy})
        if len(values) <= MAX_TICKS:  # each swept value labelled (more would overlap: the axis keeps its own)
            ax.set_xticks(values, [f"{v:.3g}" for v in values], rotation=45, fontsize=7)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{x} (τ, logits = cos/τ)" if x == "temperature" else x)
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"{Path(sweep_dir).name}: {metric} vs {x}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_metric_key(metric).replace('/', '_')}_vs_{x}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


class SweepTable(Callback):
    """Hydra callback: at the end of a multirun, print the sweep's table and write its plots; then, when
    no job completed, exit with status 1 and one line naming how many failed and where their errors are
    (SystemExit: Hydra turns a callback's exceptions into warnings, and each failed job returned NaN)."""

    def __init__(self, metric: str = "ndcg@10"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        console.print(sweep_table(sweep, self.metric))
        for path in plot_sweep(sweep, self.metric):
            console.print(f"plot: {path}")
        rows = job_rows(sweep, self.metric) if sweep.is_dir() else []
        if rows and not any(r["status"] == "completed" for r in rows):
            failed = [r["job"] for r in rows if r["status"] == "failed"]
            jobs = failed[0] if len(failed) == 1 else "{" + ",".join(failed) + "}"
            raise SystemExit(f"Error: no job of the sweep completed: {len(failed)} of {len(rows)} failed "
                             f"(errors in {sweep}/{jobs}/summary.json)")


def main(argv: list[str] | None = None) -> int:
    """``embtune-report SWEEP_DIR [--metric eval/ndcg@10] [--plots DIR | --no-plots]``."""
    parser = argparse.ArgumentParser(prog="embtune-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/sweeps/<date_time>")
    parser.add_argument("--metric", default="eval/ndcg@10", help="sort and plot by this metric (default %(default)s)")
    parser.add_argument("--plots", default=None, help="folder for the PNG plots (default: the sweep folder)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    try:
        console.print(sweep_table(args.sweep_dir, args.metric))
    except NotADirectoryError as e:
        print(f"embtune-report: {e}", file=sys.stderr)
        return 2
    if not args.no_plots:
        for path in plot_sweep(args.sweep_dir, args.metric, args.plots):
            console.print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
