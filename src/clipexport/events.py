"""The progress event contract (version 1): stamping, validation, the log.

Every part of the tool speaks this contract (`docs/progress-events.md`).
Producers (the worker, transfers, the orchestrator) build *partial* events,
plain dicts with `type`, `phase`, `part`, `done`, ... ; an `Emitter` stamps
them with `v`, `job`, `seq` and `t` and hands them to its sinks (the event
log, the display, the structured log). Keeping events as plain JSON-ready
dicts lets extra fields through untouched, as the contract allows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from clipexport.errors import StateError

VERSION = 1
TYPES = ("plan", "phase_start", "progress", "heartbeat", "phase_end", "done", "error", "cancelled",
         "interrupted", "snapshot")
PHASES = ("prepare", "upload", "queue", "load_model", "upscale", "encode", "download", "finalize")
TERMINAL_TYPES = ("done", "error", "cancelled")
ENDING_TYPES = (*TERMINAL_TYPES, "interrupted")  # the last event of one run of a job
LOGGED_TYPES = ("phase_start", "phase_end", "done", "error")
PROGRESS_INTERVAL_S = 0.25  # how often producers report cumulative progress

Event = dict[str, Any]
Sink = Callable[[Event], None]

logger = logging.getLogger("clipexport.events")


class Emitter:
    """Stamps partial events and passes them to every sink, in order.

    `seq` continues from `next_seq`, so a resumed job keeps one strictly
    increasing sequence across runs. The clock is injected for tests.
    Thread-safe: transfers and backends emit from their own threads, and
    sinks see events in `seq` order. Nothing is delivered after an event of
    `ENDING_TYPES`: a straggler from another thread (or a display's periodic
    snapshot) would otherwise follow the run's last event, and after an
    `error` a later event reads as a resumed job. A sink may emit (a
    display's snapshot after a phase ends): that event is queued and
    delivered right after the one being delivered, so every sink still sees
    `seq` in order.
    """

    def __init__(
        self,
        job: str,
        sinks: Iterable[Sink] = (),
        *,
        next_seq: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.job = job
        self.sinks: list[Sink] = list(sinks)
        self.next_seq = next_seq
        self._clock = clock
        self._lock = threading.RLock()
        self._ended = False
        self._queued: list[Event] | None = None  # a list while events are being delivered

    def emit(self, partial: Event) -> Event:
        """Stamp `partial` (left unchanged) and deliver the full event (unless the run has ended).

        Called by a sink during a delivery, it queues `partial` behind the
        event being delivered and returns `partial` itself, not yet stamped.
        """
        with self._lock:
            if self._queued is not None:
                self._queued.append(partial)
                return partial
            self._queued = [partial]
            try:
                first = None
                while self._queued:
                    event = self._deliver(self._queued.pop(0))
                    first = first or event
            finally:
                self._queued = None
        return first

    def _deliver(self, partial: Event) -> Event:
        event: Event = {"v": VERSION, "job": self.job, "seq": self.next_seq, "t": round(self._clock(), 3)}
        event.update({k: v for k, v in partial.items() if k not in event})
        if self._ended:
            return event
        self.next_seq += 1
        self._ended = event["type"] in ENDING_TYPES
        for sink in self.sinks:
            sink(event)
        return event

    def __call__(self, type_: str, **fields: Any) -> Event:
        """Shorthand: `emitter("phase_start", phase="upscale")`."""
        return self.emit({"type": type_, **fields})


class Throttle:
    """Lets cumulative progress through at most once per `interval` seconds.

    Progress is cumulative, so skipping intermediate values loses nothing;
    phase starts and ends are never throttled by their producers.
    """

    def __init__(self, interval: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf

    def ready(self) -> bool:
        """True (and the clock restarts) when `interval` has passed since the last True."""
        now = self._clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


class EventLog:
    """Append-only JSON Lines file, one event a line.

    Each line is written whole and flushed; phase boundaries and terminal
    events are also fsynced so a crash loses at most a few progress lines,
    which the contract makes harmless (progress is cumulative).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # a job's log is its user's alone
            os.fchmod(fd, 0o600)
            self._file = open(fd, "a", encoding="utf-8")
            if _ends_mid_line(path):  # a crash cut the last line: keep it from swallowing the next
                self._file.write("\n")
        except OSError as exc:
            raise self._unwritable(exc) from None

    def __call__(self, event: Event) -> None:
        try:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._file.flush()
            if event["type"] != "progress" and event["type"] != "heartbeat":
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> StateError:
        """A full disk or a read-only folder stops the job resumably, in one line."""
        return StateError(f"{self.path}: the event log cannot be written ({exc.strerror}); free some disk space "
                          "or make it writable, then run the command again", resumable=True)

    def close(self) -> None:
        self._file.close()


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_events(path: Path) -> Iterator[Event]:
    """Yield the events of a log, skipping a line cut short by a crash; none for a missing log."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def last_seq(path: Path) -> int:
    """The highest `seq` in a log, or -1 for a missing or empty one."""
    return max((e.get("seq", -1) for e in read_events(path)), default=-1)


def validate_event(event: Event) -> None:
    """Raise ValueError naming the first way `event` breaks the contract."""
    for field, kind in (("v", int), ("job", str), ("seq", int), ("t", (int, float)), ("type", str)):
        if not isinstance(event.get(field), kind) or isinstance(event.get(field), bool):
            raise ValueError(f"event field {field!r} missing or of the wrong type: {event!r}")
    if event["v"] != VERSION:
        raise ValueError(f"unknown contract version {event['v']}")
    if event["type"] not in TYPES:
        raise ValueError(f"unknown event type {event['type']!r}")
    if event["type"] == "plan":
        _validate_plan(event)
    elif event["type"] in ("phase_start", "progress", "heartbeat", "phase_end"):
        if not isinstance(event.get("phase"), str):
            raise ValueError(f"{event['type']} event without a phase: {event!r}")
    if event["type"] == "progress" and not isinstance(event.get("done"), (int, float)):
        raise ValueError(f"progress event without a numeric done: {event!r}")
    if event["type"] == "done" and not isinstance(event.get("output"), str):
        raise ValueError("done event without an output path")
    if event["type"] in ("error", "interrupted") and not isinstance(event.get("resumable"), bool):
        raise ValueError(f"{event['type']} event without a resumable flag")
    if event["type"] == "snapshot" and not isinstance(event.get("fraction"), (int, float)):
        raise ValueError("snapshot event without a numeric fraction")


def _validate_plan(event: Event) -> None:
    phases = event.get("phases")
    if not isinstance(phases, list) or not phases:
        raise ValueError("plan event without phases")
    for phase in phases:
        if not isinstance(phase.get("phase"), str) or "total" not in phase or "unit" not in phase:
            raise ValueError(f"malformed plan phase: {phase!r}")
    if not isinstance(event.get("features"), dict):
        raise ValueError("plan event without features")


def log_line(event: Event) -> str | None:
    """The structured `[Progress Event]` line for phase changes, else None."""
    if event["type"] not in LOGGED_TYPES:
        return None
    fields = [f"job={event['job']}"]
    if "phase" in event:
        fields.append(f"phase={event['phase']}")
    if "part" in event:
        fields.append(f"part={event['part']}")
    fields.append(f"event={event['type']}")
    if "elapsed" in event:
        fields.append(f"elapsed={event['elapsed']:.3f}")
    unit, done = event.get("unit"), event.get("done")
    if unit and done is not None:
        fields.append(f"{unit}={done}")
        if unit == "frames" and event.get("elapsed"):
            fields.append(f"fps_actual={done / event['elapsed']:.1f}")
    if event["type"] == "error":
        fields.append(f"resumable={str(event.get('resumable')).lower()}")
    return "[Progress Event] " + " ".join(fields)


def log_sink(event: Event) -> None:
    """Sink that writes the structured line of phase changes to the log."""
    line = log_line(event)
    if line is not None:
        logger.info(line)
