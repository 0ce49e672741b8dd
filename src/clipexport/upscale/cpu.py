"""How many CPUs this process may really use: torch's threads, and the ETA's prior for a CPU, follow it.

Needs no torch, so the plan (and `--estimate`) can name it without loading
the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus"]


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
