"""How many CPUs this process may really use, and how many other processes keep busy right now:
torch's threads, and the ETA's prior for a CPU, follow them.

Needs no torch, so the plan (and `--estimate`) can name them without loading
the model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["busy_elsewhere", "usable_cpus"]

PROC_STAT = Path("/proc/stat")
BUSY_WINDOW_S = 0.1  # how long `busy_elsewhere` watches: 10 clock ticks a core


def usable_cpus() -> int:
    """CPUs this process may really use: affinity, then any cgroup v2 quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def busy_elsewhere(window_s: float = BUSY_WINDOW_S, *, read: Callable[[], str] = PROC_STAT.read_text,
                   sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Cores that other processes keep busy now, watched over `window_s` (this process sleeps
    through it, so what the kernel counts as busy is somebody else's work); None where the kernel
    does not say (no /proc/stat).

    A render started on an editor's busy machine gets what is left: the
    plan says so, and its first estimate is not the idle machine's.
    """
    try:
        before = _busy_ticks(read())
        sleep(window_s)
        after = _busy_ticks(read())
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, (after - before) / ticks / window_s)


def _busy_ticks(stat: str) -> int:
    """Clock ticks all CPUs spent on anything but idle and I/O wait, from /proc/stat's first line."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle  # guest time is counted in user already
