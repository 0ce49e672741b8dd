"""Damaged state: one line naming the file and what to do, a documented exit code, never a traceback.

Each case damages the real state directory the way a user (or a full disk)
would: a corrupt or read-only jobs.db, jobs.db deleted under a running
render, a full disk, an event log lost or cut short, a read-only HOME, a
CLIPEXPORT_HOME that is a file or relative.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipexport import config
from clipexport.cli import app
from clipexport.errors import EXIT_RESUMABLE, EXIT_STATE
from clipexport.jobs import JobSpec, JobState, JobStore
from tests.clips import make_clip, read_index
from tests.pausing import DEADLINE_S, pausing_env, release, wait_paused
from tests.test_job_locks import FRAMES, finished, killed_at_finalize, paused_at_finalize, spawn
from tests.test_resume import CLI, frames_of, joined_log

runner = CliRunner()


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=FRAMES, width=32, height=18, fps=24)


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Unwritable even to root: `chattr +i` there, plain permissions for anyone else."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag, and root ignores permissions")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def assert_one_line(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("clipexport: error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in line, (needle, line)


def assert_frame_exact(out: Path) -> None:
    assert [read_index(f) for f in frames_of(out)] == list(range(FRAMES))


def test_a_corrupt_job_store(tmp_path, clip, clipexport_home):
    db = clipexport_home / "state" / "jobs.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database, just bytes " * 100)
    assert_one_line(runner.invoke(app, ["jobs"]), EXIT_STATE, str(db), "damaged", "move it aside")
    out = tmp_path / "out.mp4"
    assert_one_line(runner.invoke(app, ["render", str(clip), "-o", str(out)]), EXIT_STATE, str(db))
    assert not out.exists()


def test_a_read_only_job_store(tmp_path, clip, clipexport_home):
    assert runner.invoke(app, ["jobs"]).exit_code == 0  # creates the store
    db = clipexport_home / "state" / "jobs.db"
    out = tmp_path / "out.mp4"
    with read_only(db):
        result = runner.invoke(app, ["render", str(clip), "-o", str(out), "--progress", "none"])
    assert_one_line(result, EXIT_STATE, str(db), "cannot be written", "writable")
    assert not out.exists()


def test_the_job_store_deleted_mid_render_is_recreated_and_the_render_goes_on(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    proc, job, pauses = paused_at_finalize(tmp_path, clip, out)
    state = clipexport_home / "state"
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        (state / name).unlink(missing_ok=True)
    release(pauses, "finalize", proc)
    code, stdout, err = finished(proc)
    assert code == 0 and stdout.strip() == str(out), err
    assert f"{state / 'jobs.db'} was deleted while job {job} ran" in err and "Traceback" not in err
    assert_frame_exact(out)
    assert JobStore(state).get(job).state == JobState.DONE


def test_a_full_disk_stops_the_render_resumably(tmp_path, clip, clipexport_home):
    """At finalize, files may no longer grow past 24 KiB: the output (13 KiB) fits, jobs.db's -shm does not."""
    out = tmp_path / "out.mp4"
    proc, job, pauses = paused_at_finalize(tmp_path, clip, out)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (24 * 1024, 24 * 1024))
    release(pauses, "finalize", proc)
    code, _, err = finished(proc)
    assert code == EXIT_RESUMABLE, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"clipexport: error: {clipexport_home / 'state' / 'jobs.db'}: the job store cannot be "
                           "written") and "free some disk space" in line, line
    assert line.endswith(f"(resumable: `clipexport resume {job}`)") and not out.exists()
    done = subprocess.run([*CLI, "resume", job, "--progress", "none"], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    assert_frame_exact(out)


def test_resume_with_the_event_log_lost_then_cut_short(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    job = killed_at_finalize(tmp_path, clip, out)
    log = JobStore(clipexport_home / "state").log_path(job)
    log.unlink()
    pauses = tmp_path / "pauses-resume"
    proc = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "finalize"))
    wait_paused(pauses, "finalize", proc)
    proc.kill()
    proc.wait()
    assert [e["type"] for e in joined_log(clipexport_home, job)][0] == "plan", "the log starts again from the plan"
    plan_line = log.read_bytes().split(b"\n")[0]
    log.write_bytes(plan_line[: len(plan_line) // 2])  # cut in the middle of the plan
    done = subprocess.run([*CLI, "resume", job, "--progress", "none"], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    assert_frame_exact(out)
    events = joined_log(clipexport_home, job)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)) and events[0]["type"] == "plan" and events[-1]["type"] == "done"


def test_a_read_only_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("CLIPEXPORT_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    with read_only(home):
        result = runner.invoke(app, ["jobs"])
    assert_one_line(result, EXIT_STATE, str(home), "cannot be written", "CLIPEXPORT_HOME")
    assert not (home / ".local").exists()


def test_clipexport_home_that_is_a_file_or_relative(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("CLIPEXPORT_HOME", str(a_file))
    assert_one_line(runner.invoke(app, ["jobs"]), EXIT_STATE, f"CLIPEXPORT_HOME={a_file} is a file", "folder")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPEXPORT_HOME", "relative-home")
    assert config.state_dir() == tmp_path / "relative-home" / "state"
    assert runner.invoke(app, ["jobs"]).exit_code == 0
    assert (tmp_path / "relative-home" / "state" / "jobs.db").is_file()


def test_a_job_written_by_a_newer_version_is_listed_and_cancelled_but_not_resumed(clipexport_home):
    """A setting this version does not know is not fatal to `jobs`; only `resume` must refuse it."""
    store = JobStore(clipexport_home / "state")
    record = store.create(JobSpec(inputs=["/nowhere/a.mp4"], output="/nowhere/o.mp4", model="realesr-animevideov3",
                                  scale=2))
    store.transition(record.id, JobState.INTERRUPTED, "killed")
    with sqlite3.connect(clipexport_home / "state" / "jobs.db") as db:
        (text,) = db.execute("SELECT spec FROM jobs WHERE id = ?", (record.id,)).fetchone()
        db.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps({**json.loads(text), "grain": 3}), record.id))
    assert store.get(record.id).spec.unknown == ("grain",)
    listed = runner.invoke(app, ["jobs"])
    assert listed.exit_code == 0 and record.id in listed.stdout, listed.stderr
    assert_one_line(runner.invoke(app, ["resume", record.id]), 2, "newer clipexport", "grain")
    assert runner.invoke(app, ["cancel", record.id]).exit_code == 0
    assert store.get(record.id).state == JobState.CANCELLED
