"""A reader that goes away (`| head -1`) turns the display off; the job still finishes.

Real shell pipes, real processes: the render's stdout (or stdout and stderr
together) goes into `head -1`, which exits after the first line while the
render is still emitting events.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import pytest

from clipexport import config
from clipexport.jobs import JobStore
from tests.clips import make_clip

CLI = f"{sys.executable} -m clipexport"


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


@pytest.mark.parametrize(("flags", "redirect"), [("--json", ""), ("--progress plain", "2>&1")],
                         ids=["json-stdout", "stderr-into-stdout"])
def test_a_closed_pipe_does_not_stop_the_job(flags, redirect, tmp_path):
    clip = make_clip(tmp_path / "in.mp4", frames=6, width=64, height=36)
    out = tmp_path / "out.mp4"
    script = f'{CLI} render {clip} -o {out} {flags} {redirect} | head -1; echo "rc=${{PIPESTATUS[0]}}" >&2'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)

    assert proc.stdout.count("\n") == 1  # head read its line and left
    assert proc.stderr.strip().splitlines()[-1] == "rc=0", proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert frame_count(out) == 6
    assert [job.state.value for job in JobStore(config.state_dir()).all()] == ["done"]  # the store it used
