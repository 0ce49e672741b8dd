"""Force an interleaving of real processes with the `clipexport.testhook` pause points.

A process started with `pausing_env(folder, point)` stops at `point` and
waits; the test sees it there (`wait_paused`), does what must happen while it
waits (start a rival, kill it, damage a file) and lets it go (`release`).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from clipexport.testhook import ENV_DIR, ENV_POINTS

DEADLINE_S = 240


def pausing_env(folder: Path, *points: str) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return {**os.environ, ENV_POINTS: ",".join(points), ENV_DIR: str(folder)}


def wait_paused(folder: Path, point: str, proc: subprocess.Popen) -> None:
    """Until `proc` waits at `point`; fails with its stderr if it ends first."""
    marker = folder / f"{point}.{proc.pid}"
    deadline = time.monotonic() + DEADLINE_S
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {point}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.02)


def release(folder: Path, point: str, proc: subprocess.Popen) -> None:
    (folder / f"{point}.{proc.pid}.go").touch()
