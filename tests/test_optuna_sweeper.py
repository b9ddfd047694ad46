"""embtune's Optuna sweeper (embtune/run/optuna_sweeper.py): the search-space syntax, failed trials, a
study in sqlite that resumes after an interrupt and runs only the missing trials."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from packaging.version import Version
from test_sweep import TINY

from embtune.run.optuna_sweeper import FAILURE, OptunaSweeper, objective_value
from embtune.run.search_space import choice_strings, search_space


def test_installed_optuna_is_4_or_newer():
    assert Version(optuna.__version__) >= Version("4")


def test_the_installed_embtune_command_finds_the_optuna_sweeper_from_any_folder(tmp_path):
    """Run from outside the repository (no ``hydra_plugins`` folder on the path), as a user runs it after
    ``pip install -e .``: Hydra's plugin scan alone misses the sweeper there, so ``hparams_search=optuna``
    failed with "Unknown plugin class"."""
    command = shutil.which("embtune", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert command, "the embtune command is not installed (pip install -e .)"
    out = subprocess.run([command, "--info", "plugins"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    section = out.stdout.split("\tSweeper:\n")[1].split("\n\n")[0]  # up to the blank line after the list
    assert {"BasicSweeper", "OptunaSweeper"} <= {line.strip() for line in section.splitlines()}


def test_search_space_syntax_maps_to_optuna_distributions():
    space, fixed = search_space([
        "loss.temperature=tag(log, interval(0.01, 0.2))", "loss.margin=interval(0.05, 0.6)",
        "train.batch_size=range(8, 33, 8)",  # Hydra's range excludes stop: 8, 16, 24, 32
        "train.lr=range(0.5, 2.0, 0.5)",  # 0.5, 1.0, 1.5
        "pooling=mean,cls", "x=choice(1, 'a b', true)", "y=shuffle(range(1, 4))", "train.max_steps=2"])
    assert space == {
        "loss.temperature": FloatDistribution(0.01, 0.2, log=True),
        "loss.margin": FloatDistribution(0.05, 0.6),
        "train.batch_size": IntDistribution(8, 32, step=8),
        "train.lr": FloatDistribution(0.5, 1.5, step=0.5),
        "pooling": CategoricalDistribution(["mean", "cls"]),
        "x": CategoricalDistribution([1, "a b", True]),
        "y": CategoricalDistribution([1, 2, 3]),
    }
    assert fixed == {"train.max_steps": "2"}
    # choices go back on the command line as override strings: a space escaped, a list kept a list
    assert choice_strings(["x=choice(1, 'a b')", "z=choice([1,2],[3])", "w=interval(0, 1)"]) == {
        "x": {1: "1", "a b": "a\\ b"}, "z": {"[1,2]": "[1,2]", "[3]": "[3]"}}


@pytest.mark.parametrize("override,message", [
    ("a=tag(log, choice(1, 2))", "only tag\\(log, interval"),
    ("a=tag(foo, interval(0, 1))", "only tag\\(log, interval.*foo"),
    ("a=range(5, 1)", "a=range\\(5, 1\\): the range holds no value"),
])
def test_search_space_refuses_what_optuna_cannot_sample(override, message):
    with pytest.raises(ValueError, match=message):
        search_space([override])


def _ret(value=None, error=None):
    if error is not None:
        return JobReturn(status=JobStatus.FAILED, _return_value=error)
    return JobReturn(status=JobStatus.COMPLETED, _return_value=value)


def test_only_a_finite_number_is_a_value():
    assert objective_value(_ret(0.25)) == (0.25, None)
    for returned, why in [(math.nan, "returned nan"), (None, "returned None"), (math.inf, "returned inf"),
                          ("abc", "returned 'abc', not a number")]:
        value, reason = objective_value(_ret(returned))
        assert value is None and why in reason
    assert objective_value(_ret(error=RuntimeError("boom"))) == (None, "the job raised RuntimeError: boom")


class FakeLauncher:
    """Returns the value ``values(overrides)`` for each job; raises KeyboardInterrupt at job ``stop_at``."""

    def __init__(self, values, stop_at=None):
        self.values, self.stop_at, self.launched = values, stop_at, []

    def launch(self, batch, initial_job_idx):
        if self.stop_at is not None and len(self.launched) == self.stop_at:
            raise KeyboardInterrupt
        self.launched.extend(batch)
        return [_ret(self.values(dict(o.split("=", 1) for o in job))) for job in batch]


def _sweeper(tmp_path, launcher, n_trials=3, storage=None):
    sweeper = OptunaSweeper(direction="maximize", study_name="s", storage=storage, n_trials=n_trials,
                            sampler=OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "seed": 0}),
                            params=OmegaConf.create({"loss.temperature": "tag(log, interval(0.01, 0.2))"}))
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    sweeper.launcher = launcher
    sweeper.validate_batch_is_legal = lambda batch: None  # composing needs Hydra's config loader
    return sweeper


def test_an_interrupted_study_resumes_with_only_the_missing_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = FakeLauncher(lambda o: float(o["loss.temperature"]), stop_at=2)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while trial 2 runs
        _sweeper(tmp_path, first, storage=storage).sweep([])
    assert len(first.launched) == 2
    second = FakeLauncher(lambda o: float(o["loss.temperature"]))
    _sweeper(tmp_path, second, storage=storage).sweep([])
    assert len(second.launched) == 1  # only the third trial, with the interrupted trial's parameters

    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert FAILURE not in trials[2].user_attrs and trials[3].user_attrs["retry_of"] == 2
    assert trials[3].params == trials[2].params
    assert dict(o.split("=", 1) for o in second.launched[0])["hydra.sweep.subdir"] == "3"  # folder = trial
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1, 2, 3]
    assert results["best_value"] == max(t.value for t in trials if t.value is not None)


def test_nan_and_none_are_failed_trials_and_an_all_failed_study_is_a_clear_error(tmp_path):
    storage = f"sqlite:///{tmp_path / 'new folder' / 'study.db'}"  # the folder is made
    returns = iter([math.nan, None])
    with pytest.raises(SystemExit, match="all 2 finished trials of study 's' failed, so there is no best value"):
        _sweeper(tmp_path, FakeLauncher(lambda o: next(returns)), n_trials=2, storage=storage).sweep([])
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 and all(t.value is None for t in trials)
    assert "returned nan" in trials[0].user_attrs[FAILURE] and "returned None" in trials[1].user_attrs[FAILURE]
    # failed trials count: started again, the study has its 2 trials and runs nothing more
    again = FakeLauncher(lambda o: 0.5)
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, again, n_trials=2, storage=storage).sweep([])
    assert again.launched == []


def test_a_failed_trial_names_the_jobs_error(tmp_path):
    job = tmp_path / "sweep" / "0"

    def launch(batch, initial_job_idx):  # the job runs, fails and records why in its own folder
        job.mkdir(parents=True)
        (job / "summary.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad margin"}))
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=math.nan, working_dir=str(job))]

    launcher = FakeLauncher(lambda o: math.nan)
    launcher.launch = launch
    with pytest.raises(SystemExit):
        _sweeper(tmp_path, launcher, n_trials=1).sweep([])
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["trials"][0][FAILURE] == ("the job returned nan (undefined metric or failed job): "
                                             "ValueError: bad margin")


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="hydra.sweeper.direction=up"):
        OptunaSweeper(direction="up")
    with pytest.raises(ValueError, match="needs a hydra.sweeper.study_name"):
        OptunaSweeper(storage="sqlite:///x.db", study_name=None)


@pytest.mark.slow
@pytest.mark.parametrize("sweep_dir", ["dated", "fixed"])
def test_a_killed_sqlite_study_started_again_runs_only_the_last_trial(tmp_path, tiny_bert, sweep_dir):
    """3 trials with sqlite storage; the sweep is killed (SIGKILL) when trial 2's job starts. The same
    command started again runs one job (trial 2's parameters) and its report lists every trial; with a
    fixed ``hydra.sweep.dir`` the new job goes into the same folder beside the first run's."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    where = "sweeps/${now:%H-%M-%S-%f}" if sweep_dir == "dated" else "sweeps/one"
    cmd = [sys.executable, "-m", "embtune.cli", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
           f"hydra.sweeper.storage={storage}", f"model.name_or_path={tiny_bert}", *TINY, "logger=none",
           f"hydra.sweep.dir={tmp_path}/{where}"]
    env = {**os.environ, "COLUMNS": "250"}
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900
    while not list(tmp_path.glob("sweeps/*/2/.hydra")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    (first_dir,) = (tmp_path / "sweeps").iterdir()
    assert sorted(p.name for p in first_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if sweep_dir == "dated":
        (second_dir,) = set((tmp_path / "sweeps").iterdir()) - {first_dir}
        assert sorted(p.name for p in second_dir.iterdir() if p.is_dir()) == ["3"]  # one job: the missing trial
    else:
        second_dir = first_dir
        assert sorted(p.name for p in first_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    study = optuna.load_study(study_name="embtune", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[3].params == study.trials[2].params
    final = json.loads((second_dir / "3" / "summary.json").read_text())["final"]["ndcg@10"]
    assert study.trials[3].value == pytest.approx(final)
    report = out.stdout
    assert "4 trials, 3 completed, 0 failed, 1 interrupted" in " ".join(report.split())  # the title may wrap
    for n, folder in [(0, first_dir / "0"), (1, first_dir / "1"), (2, first_dir / "2"), (3, second_dir / "3")]:
        assert f"│ {n:>5} │" in report and str(folder) in report


def test_a_new_trials_job_folder_that_holds_a_run_is_refused_and_its_trial_failed(tmp_path):
    from embtune.run.optuna_sweeper import _refuse_used_job_folders

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text("{}")  # another study's trial 0, in the same sweep folder
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"loss.temperature": FloatDistribution(0.01, 0.2)})
    with pytest.raises(SystemExit, match=rf"^Error: {tmp_path / '0'} already holds a run .*its own hydra.sweep.dir"):
        _refuse_used_job_folders(study, [trial], tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert (tmp_path / "0" / "summary.json").read_text() == "{}"
