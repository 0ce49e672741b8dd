"""`cancel --purge` from another shell: the client says "cancelled", shared segments survive.

Segments are content-addressed, so two jobs rendering the same clip with the
same options share them: purging one job must keep what the other, still
unfinished, needs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clipexport.errors import EXIT_CANCELLED
from clipexport.jobs import JobState, JobStore
from tests.clips import make_clip
from tests.pausing import DEADLINE_S, pausing_env, wait_paused
from tests.test_job_locks import FRAMES, assert_frame_exact, finished, killed_at_finalize, spawn
from tests.test_resume import CLI, job_id_of, joined_log


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=FRAMES, width=32, height=18, fps=24)


def test_purge_keeps_segments_another_unfinished_job_needs(tmp_path, clip, clipexport_home):
    a_out = tmp_path / "a.mp4"
    a = killed_at_finalize(tmp_path, clip, a_out)
    other = make_clip(tmp_path / "other.mp4", frames=6, width=32, height=18, fps=24)
    pauses = tmp_path / "pauses-b"
    b_proc = spawn("render", str(clip), str(other), "-o", str(tmp_path / "b.mp4"), "--scale", "2",
                   "--segment-frames", "6", "--progress", "none", env=pausing_env(pauses, "finalize"))
    b = job_id_of(b_proc)
    wait_paused(pauses, "finalize", b_proc)
    store = JobStore(clipexport_home / "state")
    a_keys, b_keys = (set(store.facts(job, "segkey:").values()) for job in (a, b))
    shared, own = a_keys & b_keys, b_keys - a_keys
    assert shared and own, "b renders a's clip (shared segments) and one of its own"
    segments = clipexport_home / "data" / "store"
    kept_files = {key: (segments / key).stat().st_ino for key in shared}

    cancelled = subprocess.run([*CLI, "cancel", b, "--purge"], capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"({len(shared)} kept: other unfinished jobs share them)" in cancelled.stderr
    code, _, err = finished(b_proc)
    assert code == EXIT_CANCELLED, err
    assert err.strip().splitlines()[-1] == f"clipexport: error: job {b} was cancelled from another shell"
    assert store.get(b).state == JobState.CANCELLED
    assert {key: (segments / key).stat().st_ino for key in shared} == kept_files
    assert not any((segments / key).exists() for key in own)

    resumed_from = len(joined_log(clipexport_home, a))
    done = subprocess.run([*CLI, "resume", a, "--progress", "none"], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    assert_frame_exact(clipexport_home, a, a_out)
    redone = [e for e in joined_log(clipexport_home, a)[resumed_from:] if e["type"] == "phase_end" and "part" in e]
    assert redone == [], "every segment a needed was still there"
