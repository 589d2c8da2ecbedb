"""How many CPUs this process may use, and the thread count every pool of trtkit uses.

`os.cpu_count()` is the host's count: under `taskset -c 0,1` or a container CPU limit on a 16-core host it
still says 16, and onnxruntime on 15 threads over 2 CPUs runs 4-6x slower than on 2. The usable count is the
CPU affinity set (os.sched_getaffinity) capped by the cgroup CPU quota (cgroup v2 cpu.max, v1
cpu.cfs_quota_us / cpu.cfs_period_us), rounded up.

`threads()` is what every thread pool uses: `--threads N` (any command that runs a model) or the recipe's
`[run] threads`, else the usable CPUs. The CLI calls `configure()` before numpy, torch or onnxruntime load,
so OpenMP / OpenBLAS / MKL pools (numpy, torch) get the same count through their environment variables.
Imported at CLI start-up: standard library only.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# Environment variables read by the BLAS / OpenMP pools of numpy and torch when they load.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")

_requested: int | None = None


def affinity_cpus() -> int:
    """CPUs in this process's affinity set (os.cpu_count() where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 1.5), or None where no quota is set or readable."""
    for folder in (root / _own_cgroup(), root):  # cgroup v2: "max 100000" or "150000 100000"
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def _own_cgroup() -> str:
    """This process's cgroup v2 path relative to the hierarchy root ('' when unknown or at the root)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip().lstrip("/")
    except OSError:
        pass
    return ""


def available_cpus() -> int:
    """The CPUs this process may actually use: its affinity set, capped by the cgroup quota (rounded up)."""
    count = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def threads() -> int:
    """Threads for a pool: what `--threads` / the recipe asked for, else the usable CPUs."""
    return _requested if _requested is not None else available_cpus()


def requested() -> int | None:
    """The thread count asked for explicitly (--threads, recipe), or None."""
    return _requested


def configure(count: int | None = None) -> int:
    """Set the thread count (None: the usable CPUs) for trtkit's pools and, through their environment
    variables, for the BLAS / OpenMP pools of libraries not loaded yet (a variable the user set is kept unless
    `count` is given). torch, if already loaded, is told directly. Returns the count."""
    global _requested
    if count is not None and count < 1:
        from .errors import OptionError

        raise OptionError(f"--threads must be >= 1, got {count}")
    _requested = count
    value = str(threads())
    for name in THREAD_ENV_VARS:
        if count is not None:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
    torch = sys.modules.get("torch")
    if torch is not None and count is not None:
        torch.set_num_threads(count)
    return threads()
