"""Sweeps: every job in its own folder, a failed job recorded while the others finish, one wandb run per
job, and ``embtune-report``'s table and plots (also on a sweep still running)."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO

from embtune.run.progress import console
from embtune.run.sweep_report import job_rows, plot_sweep, sweep_table
from embtune.run.sweep_report import main as report_main

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["data.max_train_pairs=16", "data.max_test_queries=8", "train.batch_size=8", "train.max_steps=2",
        "train.log_every=1", "eval.batch_size=16"]

# A stand-in for the wandb package: records init/log/summary/finish calls as JSON lines in the run's dir.
FAKE_WANDB = textwrap.dedent('''
    import json, os

    class _Summary(dict):
        pass

    class _Run:
        def __init__(self, kwargs):
            self.file = os.path.join(kwargs["dir"], "fake_wandb.jsonl")
            self.summary = _Summary()
            self._write("init", {k: v for k, v in kwargs.items() if k != "config"},
                        loss=kwargs["config"]["loss"])

        def _write(self, event, data, **extra):
            with open(self.file, "a") as f:
                f.write(json.dumps({"event": event, "data": data, **extra}) + "\\n")

        def log(self, data, step=None):
            self._write("log", data, step=step)

        def finish(self, exit_code=0):
            self._write("finish", dict(self.summary), exit_code=exit_code)

    def init(**kwargs):
        return _Run(kwargs)
''')


def _job(sweep, num, overrides, loss, summary=None):
    """A hand-made job folder, as Hydra and embtune write it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": loss}))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def _done(base, final, seconds=3.0):
    return {"status": "completed", "base": {"ndcg@10": base}, "final": {"ndcg@10": final},
            "train_seconds": seconds, "startup_seconds": 1.0}


def test_report_of_a_half_finished_half_failed_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["loss=hinge", "loss.margin=0.1", "pooling=mean"], {"margin": 0.1}, _done(0.5, 0.60))
    _job(sweep, 1, ["loss=hinge", "loss.margin=0.2", "pooling=mean"], {"margin": 0.2}, _done(0.5, 0.70))
    _job(sweep, 2, ["loss=hinge", "loss.margin=0.1", "pooling=cls"], {"margin": 0.1}, _done(0.4, 0.65))
    _job(sweep, 3, ["loss=hinge", "loss.margin=0.2", "pooling=cls"], {"margin": 0.2},
         {"status": "failed", "error": "ValueError: boom"})
    _job(sweep, 10, ["loss=hinge", "loss.margin=0.3", "pooling=cls"], {"margin": 0.3})  # still running
    (sweep / "multirun.yaml").write_text("{}")  # not a job folder

    rows = job_rows(sweep, "eval/ndcg@10")
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "10"]  # numeric order, not "10" < "2"
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["failed", "running"]
    assert rows[1]["overrides"] == {"loss": "hinge", "loss.margin": "0.2", "pooling": "mean"}
    assert rows[0]["temperature"] is None and rows[0]["margin"] == 0.1 and rows[3]["error"] == "ValueError: boom"

    assert report_main([str(sweep), "--metric", "eval/ndcg@10"]) == 0
    out = capsys.readouterr().out
    # best final NDCG@10 first (jobs 1, 2, 0), then running, then failed; only swept keys are columns
    assert re.findall(r"^│ (\d+) +│", out, re.M) == ["1", "2", "0", "10", "3"]
    assert "loss.margin" in out and "pooling" in out and "│ loss " not in out
    assert "0.7000" in out and "+0.2000" in out and "failed: ValueError: boom" in out and "running" in out
    assert "5 jobs, 3 completed, 1 failed, 1 running" in out.replace("\n", " ")
    # margin plot (one line per pooling); no temperature plot: hinge has none
    assert (sweep / "ndcg@10_vs_margin.png").read_bytes().startswith(PNG)
    assert not (sweep / "ndcg@10_vs_temperature.png").exists()


def test_plot_lines_per_other_swept_value(tmp_path, monkeypatch):
    import matplotlib.figure

    sweep = tmp_path / "sweep"
    for i, (t, pooling, final) in enumerate([(0.01, "mean", 0.5), (0.1, "mean", 0.6), (0.01, "cls", 0.4), (0.1, "cls", 0.7)]):
        _job(sweep, i, [f"loss.temperature={t}", f"pooling={pooling}"], {"temperature": t}, _done(0.3, final))
    axes = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: axes.append(self.axes[0]))
    plot_sweep(sweep, "ndcg@10")
    (ax,) = axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"pooling=mean": ([0.01, 0.1], [0.5, 0.6]), "pooling=cls": ([0.01, 0.1], [0.4, 0.7])}
    assert ax.get_xscale() == "log"


def test_plot_labels_the_swept_values_and_draws_the_base_score(tmp_path, monkeypatch):
    import matplotlib.figure

    sweep = tmp_path / "sweep"
    for i, (t, final) in enumerate([(0.02, 0.5), (0.05, 0.6), (0.1, 0.55)]):
        _job(sweep, i, [f"loss.temperature={t}", "train.max_steps=2"], {"temperature": t}, _done(0.42, final))
    axes = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: axes.append(self.axes[0]))
    plot_sweep(sweep, "ndcg@10")
    (ax,) = axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.02", "0.05", "0.1"]
    assert list(ax.get_xticks()) == [0.02, 0.05, 0.1]
    (base,) = ax.collections  # one dashed line across the axes at the base model's NDCG@10
    (segment,) = base.get_segments()
    assert segment[:, 1].tolist() == [0.42, 0.42] and base.get_label() == "base model 0.4200"
    # one line: train.max_steps is the same in every job, so it names no line
    assert [line.get_label() for line in ax.get_lines()] == ["ndcg@10"]


def test_plot_draws_one_base_line_per_line_when_the_bases_differ(tmp_path, monkeypatch):
    import matplotlib.figure

    sweep = tmp_path / "sweep"
    for i, (t, pooling, base) in enumerate([(0.01, "mean", 0.3), (0.1, "mean", 0.3), (0.01, "cls", 0.2),
                                            (0.1, "cls", 0.2)]):
        _job(sweep, i, [f"loss.temperature={t}", f"pooling={pooling}"], {"temperature": t}, _done(base, 0.5))
    axes = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: axes.append(self.axes[0]))
    plot_sweep(sweep, "ndcg@10")
    (ax,) = axes
    bases = {c.get_label(): c.get_segments()[0][0, 1] for c in ax.collections}
    assert bases == {"base model, pooling=mean": 0.3, "base model, pooling=cls": 0.2}


def test_report_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_by_two_sweep_with_one_failing_job(tmp_path, tiny_bert, capsys, monkeypatch):
    """2×2 multirun: min_temperature × max_temperature, with the temperature set to the max (so it
    varies too). The cell min 0.05 > max 0.03 fails when the loss is built; the three others finish."""
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "loss.min_temperature=0.01,0.05", "loss.max_temperature=0.1,0.03",
           "loss.temperature=${loss.max_temperature}", f"model.name_or_path={tiny_bert}", *TINY,
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)]), "COLUMNS": "250"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]  # the sweep goes on past the failed job

    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    summaries = {j: json.loads((sweep / j / "summary.json").read_text()) for j in jobs}
    overrides = {j: yaml.safe_load((sweep / j / ".hydra" / "overrides.yaml").read_text()) for j in jobs}
    failed = [j for j in jobs if summaries[j]["status"] == "failed"]
    assert failed == [j for j in jobs if "loss.min_temperature=0.05" in overrides[j]
                      and "loss.max_temperature=0.03" in overrides[j]]
    assert "min_temperature" in summaries[failed[0]]["error"] and "Traceback" in summaries[failed[0]]["traceback"]
    for j in set(jobs) - set(failed):
        s = summaries[j]
        assert s["status"] == "completed" and s["steps"] == 2 and s["startup_seconds"] > 0
        events = [json.loads(x) for x in (sweep / j / "metrics.jsonl").read_text().splitlines()]
        configured = float(next(o for o in overrides[j] if o.startswith("loss.max_temperature=")).split("=")[1])
        steps = [e for e in events if "train/loss" in e]
        assert [e["train/temperature"] for e in steps] == pytest.approx([configured] * 2)
        assert all(e["train/margin"] is None for e in steps)  # InfoNCE has no margin: logged as null
        assert any("time/startup_s" in e for e in events)

    # one wandb run per job: grouped by the sweep folder's name, tagged with the job's overrides,
    # offline, closed with exit code 1 for the failed job
    for j in jobs:
        calls = [json.loads(x) for x in (sweep / j / "fake_wandb.jsonl").read_text().splitlines()]
        init, finish = calls[0], calls[-1]
        assert init["event"] == "init" and finish["event"] == "finish"
        assert init["data"]["group"] == "sweep" and init["data"]["mode"] == "offline"
        assert init["data"]["tags"] == [o for o in overrides[j] if not o.startswith("hydra.")]
        assert init["loss"]["temperature"] == init["loss"]["max_temperature"]  # the resolved config
        assert finish["exit_code"] == (1 if j in failed else 0)
        if j not in failed:
            assert any("train/temperature" in c["data"] for c in calls if c["event"] == "log")

    # the table printed at the end of the sweep and embtune-report's: four rows, the failed one shown
    assert "4 jobs, 3 completed, 1 failed, 0 running" in out.stdout.replace("\n", " ")
    monkeypatch.setattr(console, "width", 300)  # one line per row
    assert report_main([str(sweep), "--no-plots"]) == 0
    table = capsys.readouterr().out
    assert sorted(re.findall(r"^│ (\d+) +│", table, re.M)) == jobs
    assert re.search(rf"^│ {failed[0]} .*│ failed: ValueError: need 0 < loss.min_temperature", table, re.M)
    assert sweep_table(sweep).row_count == 4
    assert sorted(r["temperature"] for r in job_rows(sweep)) == [0.03, 0.03, 0.1, 0.1]  # ${...} resolved
    assert (sweep / "ndcg@10_vs_temperature.png").read_bytes().startswith(PNG)
    assert not math.isnan(summaries[jobs[0]]["final"]["ndcg@10"])


@pytest.mark.slow
def test_optuna_search_with_parallel_joblib_jobs(tmp_path, tiny_bert):
    """hparams_search=optuna with hydra/launcher=joblib: two trials run at once, each in its own job
    folder, and Optuna's best value is the best final NDCG@10 that the jobs returned."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"model.name_or_path={tiny_bert}", *TINY, "logger=none", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    finals = [json.loads((sweep / j / "summary.json").read_text())["final"]["ndcg@10"] for j in ("0", "1")]
    temps = [r["temperature"] for r in job_rows(sweep)]
    assert all(0.01 <= t <= 0.2 for t in temps) and temps[0] != temps[1]  # sampled from the search space
    assert results["best_value"] == pytest.approx(max(finals))
    assert 0.01 <= results["best_params"]["loss.temperature"] <= 0.2
