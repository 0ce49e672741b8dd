"""A pause point for tests that must force an interleaving of processes.

A race between two processes is tested by stopping one of them at the
critical point, not by hoping for the timing. With `CLIPEXPORT_TEST_PAUSE`
naming a point (comma-separated names) and `CLIPEXPORT_TEST_PAUSE_DIR` a
folder, a process reaching that point creates `<dir>/<point>.<pid>` and
waits until `<dir>/<point>.<pid>.go` exists. Without the variables (every
real run) `pause` returns at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_POINTS = "CLIPEXPORT_TEST_PAUSE"
ENV_DIR = "CLIPEXPORT_TEST_PAUSE_DIR"


def pause(point: str) -> None:
    """Wait at `point` until the test releases it (a no-op unless asked for)."""
    if point not in os.environ.get(ENV_POINTS, "").split(","):
        return
    here = Path(os.environ[ENV_DIR]) / f"{point}.{os.getpid()}"
    go = here.with_name(here.name + ".go")
    here.touch()
    while not go.exists():
        time.sleep(0.02)
