"""Jobs survive their terminal: real processes, real signals, then `resume`.

Each render runs as `python -m clipexport` in a subprocess (the environment
comes from the autouse fixture, so every test has its own home and the shared
weights cache). Kills land at random moments, bounded in count and time.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from clipexport import events
from clipexport.errors import EXIT_CANCELLED
from clipexport.jobs import JobState, JobStore
from clipexport.orchestrator import owns_output
from clipexport.progress import Tracker
from tests.clips import make_clip, read_index

CLI = [sys.executable, "-m", "clipexport"]
DEADLINE_S = 240


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_id_of(proc: subprocess.Popen) -> str:
    """Read stderr until the job id line (printed before any work)."""
    line = proc.stderr.readline()
    match = re.search(r"job (cx-[0-9a-f]{6})", line)
    assert match, line
    return match.group(1)


def frames_of(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def joined_log(home: Path, job: str) -> list[dict]:
    return list(events.read_events(JobStore(home / "state").log_path(job)))


def check_log(log: list[dict]) -> None:
    """seq strictly increasing, no segment finished twice, fraction monotone."""
    seqs = [e["seq"] for e in log]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    ends = Counter(e["part"] for e in log if e["type"] == "phase_end" and e.get("phase") == "upscale" and "part" in e)
    assert ends and max(ends.values()) == 1, ends
    tracker, shown = Tracker(), []
    for event in log:
        tracker.feed(event)
        shown.append(tracker.snapshot(event["t"]).fraction)
    assert all(b >= a for a, b in zip(shown, shown[1:]))
    assert log[-1]["type"] == "done" and shown[-1] == 1.0


def wait_for_a_finished_segment(home: Path, job: str) -> None:
    store = JobStore(home / "state")
    deadline = time.monotonic() + DEADLINE_S
    while not store.facts(job, "segment:") and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=60, width=64, height=36, fps=24)


def test_sigkill_at_random_moments_then_resume_is_frame_exact(tmp_path, clip, clipexport_home, monkeypatch):
    reference = tmp_path / "reference.mp4"
    monkeypatch.setenv("CLIPEXPORT_HOME", str(tmp_path / "reference-home"))
    subprocess.run([*CLI, "render", str(clip), "-o", str(reference), "--scale", "2", "--segment-frames", "6",
                    "--progress", "none"], check=True, capture_output=True, timeout=DEADLINE_S)
    monkeypatch.setenv("CLIPEXPORT_HOME", str(clipexport_home))

    out = tmp_path / "out.mp4"
    rng = random.Random(1234)
    proc = start("render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6", "--progress", "plain")
    job = job_id_of(proc)
    wait_for_a_finished_segment(clipexport_home, job)  # the first kill lands mid-job for sure
    kills, deadline = 0, time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            code = proc.wait(timeout=(0 if kills == 0 else rng.uniform(0.3, 2.5)) if kills < 4 else DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            assert not out.exists() or owns_output(JobStore(clipexport_home / "state"), job), (
                "a killed render leaves nothing at the output path, unless it had finished writing it")
            proc = start("resume", job, "--progress", "plain")
            continue
        assert code == 0, proc.stderr.read()
        break
    assert kills >= 1, "the kills should land before the job ends: make the clip longer"
    got, want = frames_of(out), frames_of(reference)
    assert [read_index(f) for f in got] == list(range(60))
    assert len(got) == len(want)
    assert max(float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(got, want)) < 1.0
    check_log(joined_log(clipexport_home, job))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resume_finishes(tmp_path, clip, clipexport_home, signum, code):
    out = tmp_path / "out.mp4"
    proc = start("render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6", "--progress", "plain")
    job = job_id_of(proc)
    store = JobStore(clipexport_home / "state")
    wait_for_a_finished_segment(clipexport_home, job)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    stderr = proc.stderr.read()
    if signum == signal.SIGINT:
        assert f"clipexport resume {job}" in stderr and f"clipexport cancel {job}" in stderr
    assert "Traceback" not in stderr
    assert store.get(job).state == JobState.INTERRUPTED
    stopped = [e for e in joined_log(clipexport_home, job) if e["type"] == "interrupted"]
    assert [(e["exit_code"], e["resumable"]) for e in stopped] == [(code, True)]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    shown = subprocess.run([*CLI, "status", job, "--json"], capture_output=True, text=True, timeout=60)
    status = json.loads(shown.stdout)
    assert status["state"] == "interrupted" and status["remaining_s"] is None
    assert status["eta_text"] == f"interrupted: `clipexport resume {job}`"
    assert 0 < status["fraction"] < 1

    done = subprocess.run([*CLI, "resume", job, "--progress", "none"], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert [read_index(f) for f in frames_of(out)] == list(range(60))
    check_log(joined_log(clipexport_home, job))


def test_resume_refuses_a_changed_input(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    proc = start("render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6", "--progress", "none")
    job = job_id_of(proc)
    wait_for_a_finished_segment(clipexport_home, job)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    make_clip(clip, frames=60, width=64, height=36, fps=24, audio=False)  # same name, new content
    os.utime(clip, None)
    refused = subprocess.run([*CLI, "resume", job], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "clip.mp4" in refused.stderr and "changed" in refused.stderr and "--force" in refused.stderr
    forced = subprocess.run([*CLI, "resume", job, "--force", "--progress", "none"],
                            capture_output=True, text=True, timeout=DEADLINE_S)
    assert forced.returncode == 0, forced.stderr


def test_resume_of_an_unknown_job_fails_and_of_a_finished_one_prints_its_output(tmp_path, clipexport_home):
    unknown = subprocess.run([*CLI, "resume", "cx-000000"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no job 'cx-000000'" in unknown.stderr
    clip = make_clip(tmp_path / "c.mp4", frames=6, width=32, height=18, fps=24)
    subprocess.run([*CLI, "render", str(clip), "-o", str(tmp_path / "o.mp4"), "--progress", "none"],
                   check=True, capture_output=True, timeout=DEADLINE_S)
    job = JobStore(clipexport_home / "state").all()[0].id
    finished = subprocess.run([*CLI, "resume", job], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr  # as a finished `make` does
    assert finished.stdout.strip() == str(tmp_path / "o.mp4") and f"job {job} is done" in finished.stderr


def test_two_renders_and_status_watch_in_parallel(tmp_path, clipexport_home):
    clips = [make_clip(tmp_path / f"c{i}.mp4", frames=36, width=64, height=36, fps=24) for i in range(2)]
    renders = [start("render", str(c), "-o", str(tmp_path / f"o{i}.mp4"), "--scale", "2", "--segment-frames", "6",
                     "--progress", "none") for i, c in enumerate(clips)]
    jobs = [job_id_of(p) for p in renders]
    watch = start("status", "--watch", "--interval", "0.2", "--json")
    for proc in renders:
        assert proc.wait(timeout=DEADLINE_S) == 0, proc.stderr.read()
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert "locked" not in err.lower()
    seen = {json.loads(line)["job"] for line in out.splitlines() if line.startswith("{")}
    assert seen <= set(jobs) and seen, out
    for job in jobs:
        check_log(joined_log(clipexport_home, job))
    listed = subprocess.run([*CLI, "jobs", "--json"], capture_output=True, text=True, timeout=60)
    states = {json.loads(line)["job"]: json.loads(line)["state"] for line in listed.stdout.splitlines()}
    assert states == {jobs[0]: "done", jobs[1]: "done"}


def test_cancel_marks_the_job_and_writes_a_cancelled_event(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    proc = start("render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6", "--progress", "none")
    job = job_id_of(proc)
    store = JobStore(clipexport_home / "state")
    wait_for_a_finished_segment(clipexport_home, job)
    cancelled = subprocess.run([*CLI, "cancel", job, "--purge"], capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert proc.wait(timeout=60) == EXIT_CANCELLED, "the client says it was cancelled, with its own code"
    assert proc.stderr.read().strip().splitlines()[-1] == f"clipexport: error: job {job} was cancelled from another shell"
    assert store.get(job).state == JobState.CANCELLED
    assert joined_log(clipexport_home, job)[-1]["type"] == "cancelled"
    segments = clipexport_home / "data" / "store" / "segments"
    assert not any(segments.glob("*.mp4")) if segments.exists() else True
    assert not out.exists()
    again = subprocess.run([*CLI, "resume", job], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "cancelled" in again.stderr


def test_resume_after_a_kill_between_the_rename_and_done(tmp_path, clipexport_home):
    """The output is in place but the job was not marked done: resume finishes, a stranger's file is kept."""
    import sqlite3

    clip = make_clip(tmp_path / "c.mp4", frames=6, width=32, height=18, fps=24)
    out = tmp_path / "o.mp4"
    subprocess.run([*CLI, "render", str(clip), "-o", str(out), "--progress", "none"],
                   check=True, capture_output=True, timeout=DEADLINE_S)
    store = JobStore(clipexport_home / "state")
    job = store.all()[0].id
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET state = 'interrupted' WHERE id = ?", (job,))
    finished = subprocess.run([*CLI, "resume", job, "--progress", "none"], capture_output=True, text=True,
                              timeout=DEADLINE_S)
    assert finished.returncode == 0, finished.stderr
    assert [read_index(f) for f in frames_of(out)] == list(range(6))

    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET state = 'interrupted' WHERE id = ?", (job,))
    out.write_bytes(b"someone else's file")
    refused = subprocess.run([*CLI, "resume", job], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert out.read_bytes() == b"someone else's file"
