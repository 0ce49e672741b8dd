"""One runner per job, one writer per output: real processes, interleavings forced by pause points.

A job is first left as a killed render leaves it at its most fragile moment:
every segment done, the process SIGKILLed at the finalize phase, where two
runners would mux into the same partial file. Then two `resume`s meet, one
of them held at a pause point so the order is the test's, not luck's.
"""

from __future__ import annotations

import sqlite3
import stat
import subprocess
from pathlib import Path

import av
import pytest

from clipexport.errors import EXIT_BUSY, EXIT_USAGE
from clipexport.jobs import JobState, JobStore
from tests.clips import make_clip, read_index
from tests.pausing import DEADLINE_S, pausing_env, release, wait_paused
from tests.test_resume import CLI, check_log, frames_of, job_id_of, joined_log

FRAMES = 12


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def paused_at_finalize(tmp_path: Path, clip: Path, out: Path) -> tuple[subprocess.Popen, str, Path]:
    """A render held as it begins to finalize, every segment done; its job; its pause folder."""
    pauses = tmp_path / "pauses-render"
    proc = spawn("render", str(clip), "-o", str(out), "--scale", "2", "--segment-frames", "6",
                 "--progress", "none", env=pausing_env(pauses, "finalize"))
    job = job_id_of(proc)
    wait_paused(pauses, "finalize", proc)
    return proc, job, pauses


def killed_at_finalize(tmp_path: Path, clip: Path, out: Path) -> str:
    """A job whose render was SIGKILLed as it began to finalize."""
    proc, job, _ = paused_at_finalize(tmp_path, clip, out)
    proc.kill()
    proc.wait()
    return job


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, out, err


def assert_refused_as_running(result: tuple[int, str, str], job: str, runner: subprocess.Popen) -> None:
    code, out, err = result
    assert code == EXIT_BUSY, err
    assert err.strip().splitlines() == [
        f"clipexport: error: job {job} is already running (pid {runner.pid}); "
        f"follow it with: clipexport status {job} --watch"]
    assert out == ""


def assert_frame_exact(home: Path, job: str, out: Path) -> None:
    assert [read_index(f) for f in frames_of(out)] == list(range(FRAMES))
    assert JobStore(home / "state").get(job).state == JobState.DONE
    check_log(joined_log(home, job))


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=FRAMES, width=32, height=18, fps=24)


def first_takes_the_lock(tmp_path: Path, job: str, round_: int) -> tuple[subprocess.Popen, tuple[int, str, str]]:
    """A holds the job's lock (paused right after taking it) while B tries: B is refused."""
    pauses = tmp_path / f"pauses-{round_}"
    first = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "job-lock-taken"))
    wait_paused(pauses, "job-lock-taken", first)
    second = finished(spawn("resume", job, "--progress", "none"))
    release(pauses, "job-lock-taken", first)
    return first, second


def second_overtakes(tmp_path: Path, job: str, round_: int) -> tuple[subprocess.Popen, tuple[int, str, str]]:
    """A waits just before locking while B takes the lock and holds it: A, let go, is refused."""
    pauses = tmp_path / f"pauses-{round_}"
    late = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "job-lock-before"))
    wait_paused(pauses, "job-lock-before", late)
    runner = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "job-lock-taken"))
    wait_paused(pauses, "job-lock-taken", runner)
    release(pauses, "job-lock-before", late)
    refused = finished(late)
    release(pauses, "job-lock-taken", runner)
    return runner, refused


def one_round(tmp_path: Path, clip: Path, home: Path, round_: int) -> None:
    out = tmp_path / f"out{round_}.mp4"
    job = killed_at_finalize(tmp_path, clip, out)
    order = first_takes_the_lock if round_ % 2 == 0 else second_overtakes
    runner, refused = order(tmp_path, job, round_)
    assert_refused_as_running(refused, job, runner)
    code, stdout, err = finished(runner)
    assert code == 0, err
    assert stdout.strip() == str(out)
    assert not list(tmp_path.glob(f".out{round_}*")), "no partial file is left behind"
    assert_frame_exact(home, job, out)


def test_a_dead_runners_lock_is_taken_and_a_second_resume_is_refused(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    job = killed_at_finalize(tmp_path, clip, out)
    pauses = tmp_path / "pauses-killed"
    holder = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "job-lock-taken"))
    wait_paused(pauses, "job-lock-taken", holder)
    holder.kill()
    holder.wait()
    assert (clipexport_home / "state" / "locks" / f"job-{job}.lock").exists(), "a killed holder leaves its file"

    pauses = tmp_path / "pauses"
    runner = spawn("resume", job, "--progress", "none", env=pausing_env(pauses, "job-lock-taken"))
    wait_paused(pauses, "job-lock-taken", runner)  # the dead holder's lock was taken over
    assert_state_is_private(clipexport_home / "state", job)
    assert_refused_as_running(finished(spawn("resume", job, "--progress", "none")), job, runner)
    release(pauses, "job-lock-taken", runner)
    code, stdout, err = finished(runner)
    assert code == 0 and stdout.strip() == str(out), err
    assert_frame_exact(clipexport_home, job, out)
    again = subprocess.run([*CLI, "resume", job], capture_output=True, text=True, timeout=DEADLINE_S)
    assert again.returncode == 0 and again.stdout.strip() == str(out), again.stderr
    assert not list((clipexport_home / "state" / "locks").iterdir()), "released locks leave no file"


def assert_state_is_private(state: Path, job: str) -> None:
    """0700 directories and 0600 files: jobs.db and its -wal/-shm, event logs, lock files."""
    reader = sqlite3.connect(state / "jobs.db")  # a reader opens the -wal and -shm files, as `status` does
    try:
        reader.execute("SELECT count(*) FROM jobs").fetchone()
        names = {p.name for p in state.rglob("*")}
        assert {"jobs.db", "jobs.db-wal", "jobs.db-shm", "events.jsonl", f"job-{job}.lock"} <= names, names
        for path in [state, *state.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    finally:
        reader.close()


@pytest.mark.stress
def test_concurrent_resumes_twenty_times_each_frame_exact_or_refused(tmp_path, clip, monkeypatch):
    for round_ in range(20):
        home = tmp_path / f"home-{round_}"  # a fresh store each round: its segments are rendered, not reused
        monkeypatch.setenv("CLIPEXPORT_HOME", str(home))
        one_round(tmp_path, clip, home, round_)


def test_a_second_render_to_the_same_output_is_refused_at_once_unless_forced(tmp_path, clip, clipexport_home):
    out = tmp_path / "out.mp4"
    pauses = tmp_path / "pauses"
    first = spawn("render", str(clip), "-o", str(out), "--progress", "none",
                  env=pausing_env(pauses, "output-lock-taken"))
    wait_paused(pauses, "output-lock-taken", first)
    refused = subprocess.run([*CLI, "render", str(clip), "-o", str(out)], capture_output=True, text=True,
                             timeout=DEADLINE_S)
    assert refused.returncode == EXIT_BUSY, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"clipexport: error: {out}: job {_lock_owner(clipexport_home)} (pid {first.pid}) is writing it; "
        "wait for it to finish, or use --force to replace its file once it is done"]
    forced = spawn("render", str(clip), "-o", str(out), "--scale", "2", "--progress", "none", "--force")
    assert "waiting for job" in forced.stderr.readline()
    release(pauses, "output-lock-taken", first)
    code, stdout, err = finished(first)
    assert code == 0 and stdout.strip() == str(out), err
    code, stdout, err = finished(forced)
    assert code == 0 and stdout.strip() == str(out), err
    with av.open(str(out)) as container:
        assert container.streams.video[0].width == 64, "the forced render, waited for, replaced the file"
    late = subprocess.run([*CLI, "render", str(clip), "-o", str(out)], capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert late.returncode == EXIT_USAGE and "already exists" in late.stderr


def _lock_owner(home: Path) -> str:
    import json

    (lock,) = (home / "state" / "locks").glob("output-*.lock")
    return json.loads(lock.read_text())["job"]
