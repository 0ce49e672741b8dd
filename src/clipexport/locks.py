"""One runner per job, one writer per output: locks the OS drops when their process dies.

A job's state in the store says what was done, not who is doing it now: two
`resume`s of one job, or two renders to one output, would both go on and
write the same files. So a process that runs a job first takes an exclusive
`flock` on `locks/job-<id>.lock` in the state dir, and one on a lock file
named after the absolute output path, and holds both until it exits. The
kernel releases a flock when its process dies, however it dies: a lock
left by a killed process is simply taken by the next one, and no pid is
ever guessed alive or dead. The holder writes its pid and job into the file
so that a refusal can name them. Lock files are removed on release; a
taker that finds its file replaced in between retries on the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipexport import testhook
from clipexport.errors import BusyError

LOCK_DIR = "locks"


class Lock:
    """A held flock on one lock file; `release` (or the process's death) lets go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def note(self, **owner: Any) -> None:
        """Tell the process that finds this lock taken who holds it."""
        data = json.dumps({"pid": os.getpid(), **owner}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd < 0:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1


def lock_job(state_root: Path, job_id: str, *, wait_s: float = 0.0) -> Lock:
    """Become the one process running `job_id` (trying for `wait_s`), or raise BusyError naming it."""
    testhook.pause("job-lock-before")
    path = _lock_dir(state_root) / f"job-{job_id}.lock"
    deadline = time.monotonic() + wait_s
    lock = _take(path, wait=False)
    while lock is None and time.monotonic() < deadline:
        time.sleep(0.05)
        lock = _take(path, wait=False)
    if lock is None:
        pid = owner(path).get("pid", "?")
        raise BusyError(f"job {job_id} is already running (pid {pid}); "
                        f"follow it with: clipexport status {job_id} --watch")
    lock.note(job=job_id)
    testhook.pause("job-lock-taken")
    return lock


def lock_output(state_root: Path, output: str, *, job: str, force: bool,
                on_wait: Callable[[str], None] = lambda _: None) -> Lock:
    """Become the one job writing `output`.

    Taken before the output's existence is checked, so a file another job
    finishes meanwhile is seen and refused. Held elsewhere: refused at once,
    or with `force` waited for (the caller then replaces that job's file, as
    asked).
    """
    path = _lock_dir(state_root) / f"output-{hashlib.sha256(output.encode()).hexdigest()[:24]}.lock"
    lock = _take(path, wait=False)
    if lock is None:
        held = owner(path)
        who = f"job {held.get('job', '?')} (pid {held.get('pid', '?')})"
        if not force:
            raise BusyError(f"{output}: {who} is writing it; wait for it to finish, "
                            "or use --force to replace its file once it is done")
        on_wait(f"waiting for {who} to finish writing {output}")
        while lock is None:  # a blocking take returns once it holds the lock
            lock = _take(path, wait=True)
    lock.note(job=job, output=output)
    testhook.pause("output-lock-taken")
    return lock


def owner(path: Path, wait_s: float = 1.0) -> dict[str, Any]:
    """Who holds a lock, as its holder wrote it (it writes right after locking)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:  # not written yet
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.01)


def _take(path: Path, *, wait: bool) -> Lock | None:
    """The lock on `path`, or None when another process holds it (and not `wait`)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return Lock(path, fd)
        os.close(fd)  # its holder released and removed it meanwhile: lock the new file


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock_dir(state_root: Path) -> Path:
    directory = state_root / LOCK_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory
