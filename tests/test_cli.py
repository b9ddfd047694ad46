"""The `embtune` command: a multirun puts each job in its own folder and prints one table."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def test_multirun_two_temperatures(tmp_path, tiny_bert):
    sweep = tmp_path / "sweep"
    long_override = f"data.cache_dir={tmp_path / ('a-folder-name-long-enough-for-a-tag-of-over-64-characters')}"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "loss.temperature=0.02,0.05", f"model.name_or_path={tiny_bert}",
           long_override,  # wandb refuses tags over 64 characters
           "data.max_train_pairs=16", "data.max_test_queries=8", "train.batch_size=8", "train.max_steps=1",
           "eval.batch_size=16", f"hydra.sweep.dir={sweep}", "logger.mode=offline"]
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables to 80 columns when not on a terminal
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    temps = [json.loads((sweep / str(i) / "summary.json").read_text())["temperature"] for i in (0, 1)]
    assert temps == [0.02, 0.05] or [round(t, 6) for t in temps] == [0.02, 0.05]
    for i in (0, 1):  # one wandb run per job, inside the job's folder
        assert list((sweep / str(i) / "wandb").glob("offline-run-*"))
    table = out.stdout[out.stdout.index("sweep "):]
    assert "loss.temperature" in table and "0.02" in table and "0.05" in table and "final ndcg@10" in table


def test_a_finished_run_is_never_overwritten(tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none",
           "data.max_train_pairs=8", "data.max_test_queries=4", "train.batch_size=4", "train.max_steps=1",
           "eval.before=false", f"hydra.run.dir={run_dir}"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    files = ["summary.json", "metrics.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml"]
    before = {f: (run_dir / f).read_text() for f in files}
    second = subprocess.run([*cmd, "train.max_steps=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode != 0 and "never overwrites" in second.stderr
    assert {f: (run_dir / f).read_text() for f in files} == before  # the record of the first run is intact
    third = subprocess.run([*cmd, "train.max_steps=2", "overwrite=true"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2  # the new run replaced the old one
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == [2]  # log_every=10: only the last step, and no lines left from the first run


def test_a_failed_single_run_is_recorded_and_exits_with_the_error(tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none",
           "loss.min_temperature=0.5", "loss.max_temperature=0.1", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "need 0 < loss.min_temperature <= loss.max_temperature" in out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("ValueError: need 0 < loss.min_temperature")


def test_bad_data_is_one_error_line_naming_file_row_and_field(tmp_path, tiny_bert):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n{"query": "c"}\n')
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none", "data=jsonl",
           f"data.path={data}", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1
    assert f"Error: {data}:2: missing field 'positive' (row has ['query'])" in out.stderr
    assert "Traceback" not in out.stderr  # it is kept in summary.json
    assert "Traceback" in json.loads((run_dir / "summary.json").read_text())["traceback"]
    log_lines = (run_dir / "cli.log").read_text().splitlines()  # the run's log says why it stopped, once
    errors = [line for line in log_lines if "Error: " in line]
    assert len(errors) == 1 and f"[ERROR] - Error: {data}:2: missing field 'positive' (row has ['query'])" in errors[0]
    assert out.stderr.count(f"Error: {data}:2") == 1


def test_a_missing_model_folder_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tmp_path / 'nope'}", "logger=none",
           "data.max_train_pairs=8", "data.max_test_queries=4", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "Error executing job" not in out.stderr
    assert out.stderr.count("Error: ") == 1 and f"{tmp_path / 'nope'}" in out.stderr.split("Error: ")[1]


def test_the_saved_config_reads_key_none_as_null(tmp_path, tiny_bert):
    import yaml

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none",
           "data.max_train_pairs=8", "data.max_test_queries=4", "train.batch_size=4", "train.max_steps=1",
           "model.query_prompt=None", "train.checkpoint_every=None", "eval.before=false", "eval.after=false",
           f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["query_prompt"] is None and saved["train"]["checkpoint_every"] is None
    assert saved["loss"]["temperature"] == 0.05  # the rest as composed
    assert "model.query_prompt=None" in (run_dir / ".hydra" / "overrides.yaml").read_text()  # what was typed
    reproduce = (run_dir / "model" / "README.md").read_text().split("```bash\n")[1].split("\n```")[0]
    assert reproduce.replace(" \\\n  ", " ") == " ".join(["embtune", *(a for a in cmd[3:] if not a.startswith("hydra."))])


def test_a_one_step_run_trains_at_a_nonzero_learning_rate(tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none",
           "data.max_train_pairs=8", "data.max_test_queries=4", "train.batch_size=4", "train.max_steps=1",
           "eval.before=false", "eval.after=false", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/lr" in x]
    assert logged[0]["step"] == 1 and logged[0]["train/lr"] == 2e-5  # no warm-up step at lr 0 when it is the only one


def test_a_piped_run_logs_progress_lines_the_table_and_where_the_model_went(tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "embtune.cli", f"model.name_or_path={tiny_bert}", "logger=none",
           "data.max_train_pairs=40", "data.max_test_queries=8", "train.batch_size=4", "train.max_steps=6",
           "train.log_every=2", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # stdout is a pipe
    assert out.returncode == 0, out.stderr[-3000:]
    printed = (out.stdout + out.stderr).splitlines()
    for text in (out.stdout, (run_dir / "cli.log").read_text()):  # the screen and the run's log file
        steps = [line.split("step ")[1].split()[0] for line in text.splitlines() if "embtune.progress" in line
                 and " step " in line]
        assert steps == ["2/6", "4/6", "6/6"]  # one plain line per train.log_every steps
        assert "metrics: base vs fine-tuned" in text and "ndcg@10" in text
        assert f"model saved to {run_dir / 'model'}" in text
    assert not any(line.startswith("config:") or "_target_" in line for line in printed)  # the config is in .hydra/
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not any("Writing model shards" in line or "Loading weights" in line for line in printed)
    before_training = next(i for i, line in enumerate(printed) if " step " in line)
    assert before_training < 40


def test_a_sweep_reads_an_undefined_metric_as_nan():
    import math

    from embtune.cli import sweep_value

    assert sweep_value({"final": {"ndcg@10": 0.25, "spearman": None}}, "ndcg@10") == 0.25
    assert math.isnan(sweep_value({"final": {"spearman": None}}, "spearman"))  # summary.json: missing (null)
    assert math.isnan(sweep_value({"final": {}}, "spearman"))  # eval.after=false: no final metrics


@pytest.mark.slow
def test_an_optuna_study_whose_every_metric_is_undefined_ends_with_one_error_line(tmp_path, tiny_bert):
    """STS gold scores all equal: Spearman is undefined in every trial, each job returns NaN, and the study
    (no trial with a value) ends with the sweeper's one-line error instead of a traceback. About 40 s."""
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta dog\t3.0\nrain today\tsun tomorrow\t3.0\nbread\tbutter\t3.0\n")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
           f"model.name_or_path={tiny_bert}", "eval=sts", f"eval.path={sts}", "eval.before=false",
           "data.max_train_pairs=16", "train.batch_size=8", "train.max_steps=1", "logger=none",
           f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "Error: all 2 finished trials of study 'embtune' failed, so there is no best value" in out.stderr
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["final"] == {"spearman": None}


def test_a_sweep_where_every_job_fails_on_bad_data_exits_nonzero_with_one_line_per_job(tmp_path, tiny_bert):
    sweep = tmp_path / "sweep"
    missing = tmp_path / "no-such-train.jsonl"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "loss.temperature=0.02,0.05", f"model.name_or_path={tiny_bert}",
           "logger=none", "data=jsonl", f"data.path={missing}", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout  # kept in each summary.json
    both = out.stdout + out.stderr
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "failed" and "Traceback" in summary["traceback"]
        assert sum(f"job {job} failed: " in line and str(missing) in line for line in both.splitlines()) == 1
    assert f"Error: no job of the sweep completed: 2 of 2 failed (errors in {sweep}/{{0,1}}/summary.json)" in out.stderr


def test_the_end_of_sweep_exit_depends_on_whether_any_job_completed(tmp_path):
    from omegaconf import OmegaConf

    from embtune.run import SweepTable

    def sweep_with(statuses):
        sweep = tmp_path / "-".join(statuses)
        for i, status in enumerate(statuses):
            (sweep / str(i)).mkdir(parents=True)
            (sweep / str(i) / "summary.json").write_text(json.dumps({"status": status, "base": {}, "final": {}}))
        return {"hydra": {"sweep": {"dir": str(sweep)}}}

    SweepTable().on_multirun_end(OmegaConf.create(sweep_with(["failed", "completed"])))  # returns: exit 0
    with pytest.raises(SystemExit, match=r"no job of the sweep completed: 1 of 1 failed \(errors in .*/0/summary"):
        SweepTable().on_multirun_end(OmegaConf.create(sweep_with(["failed"])))


def test_hub_push_in_a_multirun_is_refused_once_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "loss.temperature=0.02,0.05", "hub.push=true",
           "hub.repo_id=someone/model", "logger=none", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and out.stderr.count("hub.push=true in a multirun") == 1
    assert "someone/model" in out.stderr and not sweep.exists()  # no job folder was made
