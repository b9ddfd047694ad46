"""embtune.training.threads: the CPUs a process may use (affinity mask, cgroup v1/v2 quota, from fake
files) and the OpenMP settings the command sets before torch loads."""

import pytest

from embtune.training import threads as T


def _v2(tmp_path, own: str | None, parent: str | None = None):
    """A cgroup v2 tree: root/cpu.max = parent's limit, root/job/cpu.max = the process's own."""
    (tmp_path / "job").mkdir()
    if parent is not None:
        (tmp_path / "cpu.max").write_text(parent + "\n")
    if own is not None:
        (tmp_path / "job" / "cpu.max").write_text(own + "\n")
    (tmp_path / "self_cgroup").write_text("0::/job\n")
    return tmp_path, tmp_path / "self_cgroup"


@pytest.mark.parametrize("own, parent, limit", [
    ("150000 100000", None, 1.5),            # 1.5 CPUs
    ("max 100000", None, None),              # no quota
    ("max 100000", "50000 100000", 0.5),     # the parent's quota bounds the child
    ("300000 100000", "200000 100000", 2.0),
    (None, None, None),                      # no cpu controller files at all
])
def test_cgroup_v2_limit_is_quota_over_period_and_the_smallest_on_the_path(tmp_path, own, parent, limit):
    root, self_cgroup = _v2(tmp_path, own, parent)
    assert T.cgroup_cpu_limit(root, self_cgroup) == limit


def test_cgroup_v1_limit_reads_cfs_quota_and_period_and_minus_one_is_none(tmp_path):
    cpu = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "self_cgroup").write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert T.cgroup_cpu_limit(tmp_path, tmp_path / "self_cgroup") == 2.5
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert T.cgroup_cpu_limit(tmp_path, tmp_path / "self_cgroup") is None


def test_unreadable_files_mean_no_limit(tmp_path):
    assert T.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent_self") is None
    root, self_cgroup = _v2(tmp_path, "garbage")
    assert T.cgroup_cpu_limit(root, self_cgroup) is None


@pytest.mark.parametrize("affinity, own, cpus", [
    ({0, 1, 2, 3}, "max 100000", 4),       # the affinity mask alone
    ({0, 1, 2, 3}, "150000 100000", 1),    # 1.5 CPUs of quota: one thread (two would be throttled)
    ({0, 1, 2, 3}, "200000 100000", 2),
    ({5}, "800000 100000", 1),             # a mask of one CPU under a large quota
    ({0, 1}, "20000 100000", 1),           # a fifth of a CPU still runs one thread
])
def test_available_cpus_is_the_affinity_mask_capped_by_the_quota_rounded_down(tmp_path, affinity, own, cpus):
    root, self_cgroup = _v2(tmp_path, own)
    assert T.available_cpus(affinity, root, self_cgroup) == cpus


def test_openmp_defaults_fill_in_only_what_the_user_left_unset():
    env = {}
    assert T.openmp_defaults(env, cpus=3) == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "8"}
    assert T.openmp_defaults(env, cpus=3) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "8"}


def test_the_command_sets_them_before_torch_loads():
    """The runtime reads them once, as torch loads: ``embtune.cli`` must call this before importing torch."""
    import subprocess
    import sys

    code = ("import os, sys\nimport embtune.training.threads as t\nseen = []\n"
            "t.openmp_defaults = lambda *a, **k: seen.append('torch' in sys.modules)\n"
            "import embtune.cli\nprint(seen, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["[False]", "True"]  # called once, torch not yet loaded; loaded afterwards


def _scripts() -> dict[str, str]:
    """pyproject.toml's ``[project.scripts]``: command -> ``module:function`` (read by hand: Python 3.10 has
    no tomllib, and the installed entry points may be another checkout's)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    table = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', table, re.M))


@pytest.mark.parametrize("command", ["embtune", "embtune-eval", "embtune-mine", "embtune-push", "embtune-report"])
def test_every_console_script_sets_them_before_torch_loads_or_loads_no_torch(command):
    """Each installed command, run as its console script runs it (``--help``: it gets as far as parsing the
    command line): a command that loads torch calls openmp_defaults once, before torch is imported; one that
    never loads torch (pushing, the sweep report) needs no call."""
    import subprocess
    import sys

    module, function = _scripts()[command].split(":")
    code = ("import sys\nimport embtune.training.threads as t\nseen = []\n"
            "t.openmp_defaults = lambda *a, **k: seen.append('torch' in sys.modules)\n"
            f"import {module} as m\nsys.argv = [{command!r}, '--help']\n"
            f"try:\n    m.{function}()\nexcept SystemExit:\n    pass\n"
            "print('RESULT', seen, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    result = out.stdout.split("RESULT", 1)[1].split()
    if command in ("embtune-push", "embtune-report"):
        assert result[-1] == "False"  # torch never loaded
    else:
        assert result == ["[False]", "True"]  # called once, torch not yet loaded; loaded afterwards
