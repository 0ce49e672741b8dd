"""Jobs: their spec, their state machine, and the SQLite store of durable facts.

The store is the client's memory across processes: a job's spec (what to
render), its state, the last `seq` and fraction shown, and every durable fact
(input hashes, multipart upload ids, remote call ids, finished segments) as
JSON values under string keys. WAL mode and a busy timeout let several renders
and a `status --watch` share one database without lock errors.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipexport.errors import JobLookupError, StateError

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    """Where a job is; transitions are guarded by `ALLOWED`."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    DONE = "done"
    CANCELLED = "cancelled"


ALLOWED: dict[JobState, set[JobState]] = {
    JobState.RUNNING: {JobState.INTERRUPTED, JobState.FAILED, JobState.DONE, JobState.CANCELLED},
    JobState.INTERRUPTED: {JobState.RUNNING, JobState.CANCELLED},
    JobState.FAILED: {JobState.RUNNING, JobState.CANCELLED},
    JobState.DONE: set(),
    JobState.CANCELLED: set(),
}
RESUMABLE = (JobState.RUNNING, JobState.INTERRUPTED, JobState.FAILED)


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to (re)run a render; stored as JSON with the job."""

    inputs: list[str]
    output: str
    model: str
    scale: int
    weights: str | None = None
    trims: list[list[float] | None] = field(default_factory=list)
    crops: list[list[int] | None] = field(default_factory=list)
    codec: str = "h264"
    crf: int | None = None
    segment_frames: int = 240
    backend: str = "local"
    storage: str | None = None
    endpoint_url: str | None = None
    parallel: int = 1
    gpu: str | None = None
    device: str = "auto"
    overlays: list[list[dict[str, Any]]] = field(default_factory=list)  # per input; see clipexport.overlay
    each: str | None = None  # a directory: each input to its own file there (`output` is that directory)
    precision: str = "auto"
    strict: bool = False  # frames that cannot be decoded fail the job instead of repeating the previous one
    #: Settings in the stored spec that this version does not know (a newer one wrote it); never stored.
    unknown: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> str:
        data = asdict(self)
        del data["unknown"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Read a stored spec; settings a newer version added are named in `unknown`, not fatal.

        `jobs`, `status` and `cancel` must still work on such a job; only
        `resume` refuses it, since it would run without those settings.
        """
        data = json.loads(text)
        known = {f.name for f in fields(cls)} - {"unknown"}
        extra = tuple(sorted(set(data) - known))
        return cls(**{k: v for k, v in data.items() if k in known}, unknown=extra)


@dataclass(frozen=True)
class JobRecord:
    id: str
    spec: JobSpec
    state: JobState
    created: float
    updated: float
    last_seq: int
    fraction: float
    message: str | None
    pid: int | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT -1, fraction REAL NOT NULL DEFAULT 0,
    message TEXT, pid INTEGER
);
CREATE TABLE IF NOT EXISTS facts (
    job TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (job, key)
);
"""


def new_job_id() -> str:
    """Short and unique enough to type: `cx-` and six hex digits."""
    return "cx-" + secrets.token_hex(3)


class JobStore:
    """SQLite (WAL) job store; one short transaction per call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "jobs.db"
        self._running: dict[str, JobRecord] = {}  # jobs this process runs: re-registered if jobs.db vanishes
        try:
            _make_private(root)
        except OSError as exc:
            raise StateError(f"{exc.filename or root}: cannot be written ({exc.strerror}); make it writable, "
                             "or set CLIPEXPORT_HOME to a writable folder") from None
        self._create()


    def _create(self, tries: int = 100) -> None:
        """Switch to WAL and create the tables, once, whoever comes first.

        Two processes opening a new database at the same moment race for the
        journal-mode switch, which SQLite answers with "locked" at once rather
        than through the busy timeout: retry for a few seconds.
        """
        for attempt in range(tries):
            try:
                with self._transaction() as db:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == tries - 1:
                    raise _state_error(self.path, exc) from None
                time.sleep(0.05)
            except sqlite3.DatabaseError as exc:
                raise _state_error(self.path, exc) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short transaction; SQLite's errors leave as a StateError naming jobs.db."""
        if not self.path.exists() and self._running:
            self._recreate()
        try:
            with self._transaction() as db:
                yield db
        except sqlite3.DatabaseError as exc:
            raise _state_error(self.path, exc) from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _recreate(self) -> None:
        """jobs.db was deleted under a running job: start it afresh with the jobs this process runs.

        Their other facts are lost, but nothing a resume needs is: finished
        segments are found again by their content keys, inputs are hashed again.
        """
        for suffix in ("-wal", "-shm"):  # the old file's journal must not be replayed into the new one
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        _make_private(self.root)
        self._create()
        with self._connect() as db:
            for r in self._running.values():
                db.execute("INSERT OR IGNORE INTO jobs (id, spec, state, created, updated, pid) VALUES (?,?,?,?,?,?)",
                           (r.id, r.spec.to_json(), JobState.RUNNING.value, r.created, time.time(), os.getpid()))
        logger.warning("clipexport: %s was deleted while job %s ran; re-created it, the job goes on",
                       self.path, ", ".join(self._running))

    def log_path(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id / "events.jsonl"

    def create(self, spec: JobSpec, job_id: str | None = None) -> JobRecord:
        """A new running job; `job_id` is one the caller already locked (see `locks`)."""
        now = time.time()
        with self._connect() as db:
            while True:
                candidate = job_id or new_job_id()
                try:
                    db.execute(
                        "INSERT INTO jobs (id, spec, state, created, updated, pid) VALUES (?,?,?,?,?,?)",
                        (candidate, spec.to_json(), JobState.RUNNING.value, now, now, os.getpid()),
                    )
                    break
                except sqlite3.IntegrityError:
                    if job_id is not None:
                        raise JobLookupError(f"job {job_id} exists already; run the command again") from None
                    continue
        record = self._running[candidate] = self.get(candidate)
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobLookupError(f"no job {job_id!r}: `clipexport jobs` lists them")
        return _record(row)

    def all(self) -> list[JobRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [_record(r) for r in rows]

    def transition(self, job_id: str, state: JobState, message: str | None = None) -> JobRecord:
        """Move a job to `state`; an illegal transition raises JobLookupError."""
        current = self.get(job_id)
        if state != current.state and state not in ALLOWED[current.state]:
            raise JobLookupError(f"job {job_id} is {current.state.value}; it cannot become {state.value}")
        pid = os.getpid() if state == JobState.RUNNING else None
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET state = ?, message = ?, updated = ?, pid = ? WHERE id = ?",
                (state.value, message, time.time(), pid, job_id),
            )
        record = self.get(job_id)
        if state == JobState.RUNNING:
            self._running[job_id] = record
        else:
            self._running.pop(job_id, None)
        return record

    def record_progress(self, job_id: str, seq: int, fraction: float) -> None:
        """Remember the last seq stored and fraction shown (never lowered)."""
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET last_seq = MAX(last_seq, ?), fraction = MAX(fraction, ?), updated = ? WHERE id = ?",
                (seq, fraction, time.time(), job_id),
            )

    def set_fact(self, job_id: str, key: str, value: Any) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO facts (job, key, value) VALUES (?,?,?)",
                (job_id, key, json.dumps(value)),
            )

    def fact(self, job_id: str, key: str) -> Any:
        with self._connect() as db:
            row = db.execute("SELECT value FROM facts WHERE job = ? AND key = ?", (job_id, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def facts(self, job_id: str, prefix: str = "") -> dict[str, Any]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, value FROM facts WHERE job = ? AND key LIKE ? ESCAPE '\\'",
                (job_id, prefix.replace("%", "\\%").replace("_", "\\_") + "%"),
            ).fetchall()
        return {k: json.loads(v) for k, v in rows}

    def clear_fact(self, job_id: str, key: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM facts WHERE job = ? AND key = ?", (job_id, key))


def _state_error(path: Path, exc: sqlite3.DatabaseError) -> StateError:
    """What went wrong with jobs.db, and what the user can do about it."""
    text = str(exc)
    if "readonly" in text or "unable to open" in text:
        return StateError(f"{path}: the job store cannot be written ({text}); make it and its folder writable")
    if "full" in text or "I/O" in text:
        return StateError(f"{path}: the job store cannot be written ({text}); free some disk space, then "
                          "run the command again", resumable=True)
    return StateError(f"{path}: the job store is damaged ({text}); move it aside to start a new one "
                      "(the jobs it lists are lost; finished segments are kept)")


def _make_private(root: Path) -> None:
    """The state dir 0700 and the store 0600, older installs included.

    The job store and the event logs say what a user renders and where;
    SQLite gives the -wal and -shm files the database file's own mode, so
    creating that file 0600 first covers them.
    """
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "jobs").mkdir(mode=0o700, exist_ok=True)
    for directory in (root, root / "jobs"):
        directory.chmod(0o700)
    fd = os.open(root / "jobs.db", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = root / f"jobs.db{suffix}"
        if side.exists():
            side.chmod(0o600)


def _record(row: tuple) -> JobRecord:
    job_id, spec, state, created, updated, last_seq, fraction, message, pid = row
    return JobRecord(
        id=job_id,
        spec=JobSpec.from_json(spec),
        state=JobState(state),
        created=created,
        updated=updated,
        last_seq=last_seq,
        fraction=fraction,
        message=message,
        pid=pid,
    )
