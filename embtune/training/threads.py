"""CPU threads: as many as the CPUs this process may really use, and waiting threads that sleep.

Two OpenMP defaults make a shared CPU slow (measured in docs/performance.md):

- the thread count: torch starts one thread per CPU of the affinity mask, but a container's cgroup CPU
  quota (``cpu.max``; cgroup v1 ``cpu.cfs_quota_us``) may allow fewer; threads beyond the quota are
  throttled in the middle of a parallel region, and every other thread waits for them at its barrier;
- the wait policy: a thread that has finished its share of a parallel region spins (GNU OpenMP: 300,000
  rounds, milliseconds on current x86) before it sleeps. On a machine where another process is busy,
  the spinning thread spends its share of a core on nothing and is then descheduled when the next region
  needs it; a kernel made of thousands of short regions (``embtune.model.kernels``) then waits a
  scheduler time slice per region. A passive thread sleeps at once and is woken (and scheduled first)
  when work arrives.

Both are read by the OpenMP runtime once, when torch loads, so :func:`openmp_defaults` sets them in the
environment before that, leaving alone any value the user has set.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPUs (quota / period) the cgroup CPU controller allows this process, or None without a limit.

    Looks at the process's own cgroup (from ``self_cgroup``) and its parents up to ``root``, in cgroup v2
    (``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"``) and v1 (``cpu/cpu.cfs_quota_us``, -1 for
    none, and ``cpu.cfs_period_us``) layouts; the smallest limit found wins (a parent's quota bounds its
    children). Unreadable files count as no limit.
    """
    root = Path(root)
    v2, v1 = {root}, {root / "cpu", root / "cpu,cpuacct"}
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        parts = [p for p in path.strip().split("/") if p]
        for i in range(len(parts) + 1):  # the cgroup itself and each parent
            rel = Path(*parts[:i]) if i else Path()
            if controllers == "":
                v2.add(root / rel)
            elif "cpu" in controllers.split(","):
                v1.update({root / "cpu" / rel, root / "cpu,cpuacct" / rel})
    limits = []
    for folder in v2:
        fields = _read(folder / "cpu.max").split()
        if len(fields) == 2 and fields[0] != "max":
            limits.append(_ratio(fields[0], fields[1]))
    for folder in v1:
        limits.append(_ratio(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")))
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def available_cpus(affinity: set[int] | None = None, root: str | Path = "/sys/fs/cgroup",
                   self_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """CPUs this process can use at once: the size of its affinity mask (``os.sched_getaffinity``; the CPU
    count where there is none), capped by the cgroup quota rounded down (a quota of 1.5 CPUs keeps one
    thread: two would be throttled each period), at least 1."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    n = len(affinity)
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        n = min(n, math.floor(limit))
    return max(1, n)


def openmp_defaults(environ: MutableMapping[str, str] = os.environ, cpus: int | None = None) -> dict[str, str]:
    """Set, in ``environ``, the OpenMP settings this module explains, where the user has not set them:
    ``OMP_NUM_THREADS`` = :func:`available_cpus` (``cpus`` when given) and ``OMP_WAIT_POLICY=PASSIVE``.
    Effective only before torch is first imported (the runtime reads them as it loads). Returns what it set."""
    wanted = {"OMP_NUM_THREADS": str(cpus or available_cpus()), "OMP_WAIT_POLICY": "PASSIVE"}
    out = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(out)
    return out
