"""Views of a job's progress: Rich rows, plain log lines, NDJSON, or nothing.

The only module of the package that imports Rich. Every view draws the
tracker's `Snapshot`; none does arithmetic of its own.

A `Display` owns the feeding: `handle(event)` feeds the tracker and redraws
as the view wants. `handle` may be called from any thread (one lock guards
the tracker and the drawing). Use it as a context manager, or call `close()`
for the final render.

- ``rich``: a Live view on stderr (`ProgressView`: a header, one row per
  phase in its own unit, an overall row with elapsed time and the ETA in
  words, a summary at the end), laid out for the terminal's width and
  refreshed on its own timer so the countdown moves between events.
- ``plain``: timestamped lines, one at each phase change and a status line
  every few seconds (adaptive, see `line_interval`), never an animation: what
  a log file, CI or a terminal without cursor control (TERM=dumb) wants.
- ``json``: each event as one NDJSON line on stdout, and a periodic
  `snapshot` line (fraction, remaining time), for machines.
- ``none``: feeds the tracker, shows nothing.

The events are those of the contract in `docs/progress-events.md`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import IO, Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .text import amount, clock, header_parts, pack, rate_text, skip_notes, summary_parts
from .tracker import PhaseRow, Snapshot, Tracker, job_info

MODES = ("auto", "rich", "plain", "json", "none")
LOG_FORMAT = "%(asctime)s %(message)s"
Clock = Callable[[], float]


DUMB_TERMS = ("dumb", "unknown")  # no cursor control: an animation would print frame after frame


def choose_mode(mode: str, isatty: bool, term: str | None = None) -> str:
    """Resolve 'auto': Rich on a terminal with cursor control, plain lines otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown display mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "rich" if isatty and (term or "").lower() not in DUMB_TERMS else "plain"
    return mode


def make_display(
    mode: str,
    *,
    stream: IO[str] | None = None,
    tracker: Tracker,
    clock: Clock = time.time,
    refresh: bool = True,
    console: Console | None = None,
    interval: float | None = None,
) -> Display:
    """The display for `mode` ("rich", "plain", "json", "none"; "auto" picks by TTY and TERM).

    `stream` replaces stderr (stdout for json). `refresh=False` turns off the
    background timers (tests drive `tick()` by hand). `interval` fixes the
    seconds between periodic plain lines and JSON snapshots (None: adaptive,
    see `line_interval`).
    """
    if mode == "auto":
        target = stream if stream is not None else sys.stderr
        mode = choose_mode("auto", bool(getattr(target, "isatty", lambda: False)()), os.environ.get("TERM"))
    mode = choose_mode(mode, False)
    if mode == "rich":
        return RichDisplay(tracker, clock=clock, stream=stream, refresh=refresh, console=console)
    if mode == "plain":
        return PlainDisplay(tracker, clock=clock, stream=stream, refresh=refresh, interval=interval)
    if mode == "json":
        return JsonDisplay(tracker, clock=clock, stream=stream, refresh=refresh, interval=interval)
    return Display(tracker, clock=clock)


def silence_closed_pipes() -> None:
    """Point stdout and stderr at /dev/null where their reader has gone.

    Later messages (the output path, a last line) and the flush at exit then
    go nowhere instead of raising BrokenPipeError; a pipe's write end reports
    POLLERR once its read end is closed.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(flags & (select.POLLERR | select.POLLHUP) for _, flags in poller.poll(0)):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Display:
    """Feeds the tracker; shows nothing (the "none" mode and the base of the others)."""

    def __init__(self, tracker: Tracker, *, clock: Clock = time.time) -> None:
        self.tracker = tracker
        self.clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._stopping = False
        self._muted = False  # its reader went away: the tracker is still fed, nothing is drawn

    def handle(self, event: dict[str, Any]) -> None:
        """Take one event (from any thread)."""
        with self._lock:
            if self._closed:
                return
            self.tracker.feed(event)
            self._on_event(event)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self.tracker.snapshot(self.clock())

    def tick(self) -> None:
        """Redraw if the view wants to (its timer calls this)."""

    def attach(self, emit: Callable[[dict[str, Any]], Any]) -> None:
        """Views that make events of their own (`JsonDisplay`'s snapshots) emit them here."""

    def log_handler(self) -> logging.Handler:
        """Where log records go while this view shows (`--verbose`): stderr, one a line."""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        return handler

    def stopping(self) -> None:
        """A stop was asked for: say "Stopping…" now and draw the running rows as interrupted.

        Called from a helper thread the moment a signal arrives, while the
        job's own thread may still be busy finishing a frame; once only.
        """
        with self._lock:
            if self._stopping or self._closed:
                return
            self._stopping = True
        self._on_stopping()

    def _on_stopping(self) -> None:
        print("clipexport: Stopping…", file=sys.stderr, flush=True)

    def _shown(self, now: float) -> Snapshot:
        """The snapshot to draw: once stopping, nothing runs and no time remains."""
        snap = self.tracker.snapshot(now)
        return interrupted(snap) if self._stopping else snap

    def _put(self, stream: IO[str], text: str) -> None:
        """Write and flush; a reader gone (`| head -1`) mutes the display, never stops the job."""
        if self._muted:
            return
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            self._muted = True
            silence_closed_pipes()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._on_close()

    def _on_event(self, event: dict[str, Any]) -> None:
        pass

    def _on_close(self) -> None:
        pass

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FIRST_S = 30.0  # the first half minute of a job: a periodic line every MIN_INTERVAL_S
MIN_INTERVAL_S = 5.0
MAX_INTERVAL_S = 30.0


def line_interval(elapsed: float, remaining: float | None) -> float:
    """Seconds between periodic lines: frequent at first, then about 1 % of
    the job's expected length, between 5 and 30 s (an hour's job writes
    about 120 lines, not 720)."""
    if elapsed < FIRST_S:
        return MIN_INTERVAL_S
    ahead = remaining if remaining is not None and math.isfinite(remaining) and remaining > 0 else 0.0
    return min(max((elapsed + ahead) / 100.0, MIN_INTERVAL_S), MAX_INTERVAL_S)


class _Cadence:
    """When the next periodic line is due: every `fixed` seconds, or by `line_interval`."""

    def __init__(self, fixed: float | None = None) -> None:
        self.fixed = fixed
        self.last: float | None = None
        self._wait = fixed if fixed is not None else MIN_INTERVAL_S  # no snapshot is asked for sooner

    def due(self, now: float, snapshot: Callable[[], Snapshot]) -> Snapshot | None:
        """The snapshot to write now, or None; the first line comes one interval in."""
        if self.last is None:
            self.last = now
            return None
        since = now - self.last
        if since < self._wait:
            return None
        snap = snapshot()
        if self.fixed is None:
            self._wait = line_interval(snap.elapsed, snap.remaining_s)
            if since < self._wait:
                return None
        self.last = now
        return snap


def snapshot_fields(snap: Snapshot) -> dict[str, Any]:
    """A snapshot as JSON fields: the `snapshot` event's and `status --json`'s.

    The 80 % range of the remaining time comes along when the estimator
    gives one (`remaining_lo_s`, `remaining_hi_s`).
    """
    fields: dict[str, Any] = {
        "fraction": round(snap.fraction, 4),
        "elapsed": round(snap.elapsed, 1),
        "remaining_s": _round1(snap.remaining_s),
    }
    if snap.remaining_lo_s is not None and snap.remaining_hi_s is not None:
        fields["remaining_lo_s"] = _round1(snap.remaining_lo_s)
        fields["remaining_hi_s"] = _round1(snap.remaining_hi_s)
    fields["eta_text"] = snap.eta_text
    fields["phases"] = [{"phase": r.phase, "state": r.state, "unit": r.unit, "done": r.done, "total": r.total}
                        for r in snap.phases]
    return fields


def _round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class JsonDisplay(Display):
    """Each event as one line of JSON on stdout, and a `snapshot` event after each phase ends and periodically.

    The snapshot is emitted through the job's own emitter (`attach`), from
    the timer's thread: it gets the next `seq` like any event and enters the
    event log too, so a log replays what a consumer saw. An emitter delivers
    nothing after the run's last event, so no snapshot follows it.
    """

    def __init__(self, tracker: Tracker, *, clock: Clock = time.time, stream: IO[str] | None = None,
                 interval: float | None = None, refresh: bool = True) -> None:
        super().__init__(tracker, clock=clock)
        self.stream = stream
        self._cadence = _Cadence(interval)
        self._emit: Callable[[dict[str, Any]], Any] | None = None
        self._ticker = _Ticker(_tick_period(interval), self.tick) if refresh else None

    def attach(self, emit: Callable[[dict[str, Any]], Any]) -> None:
        """Give the view the job's emitter, for its snapshots."""
        self._emit = emit

    def _on_event(self, event: dict[str, Any]) -> None:
        self._put(self.stream if self.stream is not None else sys.stdout,
                  json.dumps(event, separators=(",", ":")) + "\n")
        if event.get("type") == "phase_end" and self._emit is not None:
            # Every phase's end also gets a snapshot, however short the job: the
            # emitter queues it right behind this event.
            now = self.clock()
            self._cadence.last = now
            self._emit({"type": "snapshot", **snapshot_fields(self.tracker.snapshot(now))})

    def tick(self) -> None:
        # The emitter calls our `handle` under its own lock: ask for it with ours released.
        with self._lock:
            if self._closed or self._emit is None or self.tracker.state.terminal or not self.tracker.state.events:
                return
            now = self.clock()
            snap = self._cadence.due(now, lambda: self.tracker.snapshot(now))
        if snap is not None:
            self._emit({"type": "snapshot", **snapshot_fields(snap)})

    def _on_close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()


def _tick_period(interval: float | None) -> float:
    """How often a timer asks whether a line is due."""
    return min(1.0, interval) if interval is not None else 1.0


class _Ticker:
    """A daemon thread that calls `fn` every `interval` seconds until stopped."""

    def __init__(self, interval: float, fn: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._interval = interval
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name="clipexport-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._fn()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


# -- plain lines ---------------------------------------------------------------


def phase_text(row: PhaseRow, note: str = "") -> str:
    """One phase for a plain line: 'upscale 576/1,440 frames, 12 frames/s, encode 96 behind'."""
    if row.state == "waiting" or row.unit is None:
        return f"{row.phase}: {row.detail}" if row.detail else f"{row.phase}: waiting"
    parts = [f"{row.phase} {amount(row.done, row.total, row.unit)}", rate_text(row.rate, row.unit), note]
    return ", ".join(p for p in parts if p)


def percent(fraction: float) -> str:
    """Floor, so a job never reads 100% before it is done."""
    return f"{int(fraction * 100 + 1e-9):3d}%"


def status_line(snap: Snapshot) -> str:
    """The body of a periodic plain line (no timestamp)."""
    active = [phase_text(r, note) for r, note in merged(snap.phases) if r.state in ("running", "waiting")]
    parts = [percent(snap.fraction)]
    if active:
        parts.append("; ".join(active))
    parts.append(f"{clock(snap.elapsed)} elapsed")
    parts.append(snap.eta_text)
    return " · ".join(parts)


class PlainDisplay(Display):
    """Timestamped lines: the header, each phase change, notes on work served
    from earlier runs, a periodic status line (every `interval` seconds, or
    by `line_interval` when None) and a final line with the summary.

    Lines look like::

        12:00:00  clip.mp4 → out.mp4 · 1280x720 → 2560x1440 · realesr-animevideov3 · L4 · modal
        12:00:05  upload started
        12:00:10   12% · upload 30.2/48.2 MB, 3.1 MB/s · 0:00:10 elapsed · About 3 minutes remaining
        12:00:16  upload done in 0:00:11
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        clock: Clock = time.time,
        stream: IO[str] | None = None,
        interval: float | None = None,
        refresh: bool = True,
        tz: tzinfo | None = None,
    ) -> None:
        super().__init__(tracker, clock=clock)
        self.stream = stream
        self.tz = tz
        self._cadence = _Cadence(interval)
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._noted: set[str] = set()
        self._final = False
        self._ticker = _Ticker(_tick_period(interval), self.tick) if refresh else None

    def _write(self, now: float, text: str) -> None:
        stamp = datetime.fromtimestamp(now, self.tz).strftime("%H:%M:%S")
        out = self.stream if self.stream is not None else sys.stderr
        self._put(out, f"{stamp}  {text}\n")

    def _on_event(self, event: dict[str, Any]) -> None:
        now = self.clock()
        typ = event.get("type")
        phase = event.get("phase")
        whole = "part" not in event and isinstance(phase, str)
        if typ == "plan" and not self._started:
            header = header_parts(job_info(self.tracker.state))
            if header:
                self._write(now, " · ".join(header))
        elif typ == "phase_start" and whole and phase not in self._started:
            self._started.add(phase)
            self._notes(now)
            self._write(now, f"{phase} started")
        elif typ == "phase_end" and whole and phase not in self._ended:
            self._ended.add(phase)
            elapsed = event.get("elapsed")
            took = f" in {clock(elapsed)}" if isinstance(elapsed, (int, float)) else ""
            self._write(now, f"{phase} done{took}")
            self._notes(now)
        elif typ == "interrupted":
            self._write(now, f"stopped after {clock(self.tracker.snapshot(now).elapsed)}; the job is resumable")
            self._final = True
        elif typ in ("done", "error", "cancelled"):
            self._final_line(now)
        else:
            self._periodic(now)

    def _notes(self, now: float) -> None:
        """Each note on skipped work once, as soon as a phase change shows it."""
        snap = self.tracker.snapshot(now)
        for note in skip_notes(snap.phases, snap.info):
            if note not in self._noted:
                self._noted.add(note)
                self._write(now, note)

    def _final_line(self, now: float) -> None:
        snap = self.tracker.snapshot(now)
        if snap.state == "done":
            where = [f"done → {snap.message}"] if snap.message else ["done"]
            self._write(now, " · ".join(["100%", *where, *summary_parts(snap)]))
        elif snap.state == "error":
            self._write(now, f"failed after {clock(snap.elapsed)}")  # the CLI prints the message, once
        elif snap.state == "cancelled":
            self._write(now, f"cancelled after {clock(snap.elapsed)}")
        else:
            return
        self._final = True

    def _periodic(self, now: float) -> None:
        if self._final:
            return
        snap = self._cadence.due(now, lambda: self._shown(now))
        if snap is not None:
            self._write(now, status_line(snap))

    def tick(self) -> None:
        with self._lock:
            if not self._closed and self.tracker.state.events:
                self._periodic(self.clock())

    def _on_stopping(self) -> None:
        with self._lock:
            self._write(self.clock(), "Stopping…")

    def _on_close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if not self._final and self.tracker.state.events:
            now = self.clock()
            if self.tracker.state.terminal:
                self._final_line(now)
            else:
                self._write(now, status_line(self._shown(now)))


# -- Rich ----------------------------------------------------------------------


class RichDisplay(Display):
    """A Live view of `ProgressView`: header, one row per phase, the overall row, the summary."""

    def __init__(
        self,
        tracker: Tracker,
        *,
        clock: Clock = time.time,
        stream: IO[str] | None = None,
        refresh: bool = True,
        console: Console | None = None,
        refresh_per_second: float = 4.0,
    ) -> None:
        super().__init__(tracker, clock=clock)
        if console is None:
            no_color = bool(os.environ.get("NO_COLOR"))
            console = Console(stderr=True, no_color=no_color) if stream is None else Console(file=stream, no_color=no_color)
        self.console = console
        self.live = Live(
            console=console,
            get_renderable=self._renderable,
            auto_refresh=refresh,
            refresh_per_second=refresh_per_second,
            redirect_stdout=False,
            redirect_stderr=False,
            transient=False,
        )
        self._live_started = False

    # Live's refresh thread holds Live's lock and then asks for ours (to draw
    # a snapshot); so Live is never called while we hold our lock.

    def handle(self, event: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            self.tracker.feed(event)
            start, self._live_started = not self._live_started, True
        if start:
            self.live.start()

    def tick(self) -> None:
        if self._live_started and not self._closed:
            self.live.refresh()

    def log_handler(self) -> logging.Handler:
        """Log records printed through the console, so they scroll above the live view."""
        handler = _ConsoleHandler(self.console)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        return handler

    def _renderable(self) -> RenderableType:
        with self._lock:
            return render_snapshot(self._shown(self.clock()))

    def _on_stopping(self) -> None:
        if self._live_started:
            self.live.console.print("Stopping…")
            self.live.refresh()
        else:
            super()._on_stopping()

    def _on_close(self) -> None:
        if self._live_started:
            self.live.refresh()
            self.live.stop()

    def close(self) -> None:
        # Live.stop joins its refresh thread, which may wait on our lock:
        # mark closed under the lock, stop the Live outside it.
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._on_close()


class _ConsoleHandler(logging.Handler):
    """A log handler that prints through a Rich console (above its Live view)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(Text(self.format(record), style="dim"), soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)


_STYLE = {"done": "green", "running": "cyan", "waiting": "yellow", "pending": "dim", "interrupted": "yellow"}


def interrupted(snap: Snapshot) -> Snapshot:
    """A snapshot as a stopping job shows it: running rows interrupted, no rate, no ETA."""
    rows = tuple(dataclasses.replace(r, state="interrupted", rate=None) if r.state in ("running", "waiting") else r
                 for r in snap.phases)
    return dataclasses.replace(snap, phases=rows, remaining_s=None, eta_text="stopping…")


WIDE_MIN = 90  # narrower consoles get the compact layout: the bars leave the phase rows
NAME_W, PCT_W = 10, 4  # "load_model", "100%"
ETA_W = 35  # the longest ETA in words: "About 23 hours 50 minutes remaining"
WHAT_MIN = 16  # "0:01:35 elapsed", "576/1,440 frames"
BAR_MIN, BAR_MAX = 10, 40
LAG_S = 5.0  # encode's lag behind upscale is shown once it is worth this many seconds of upscaling


@dataclass(frozen=True)
class _Row:
    """One row as text: every layout draws these, so the layouts cannot disagree."""

    name: str
    state: str  # a key of _STYLE, or the job's state for the overall row
    fraction: float | None  # None: work of unknown size (a pulse)
    pct: str
    what: str  # work done in its own unit, or the state
    info: str  # rate, detail or ETA
    width: int  # the widest `what` this row can take (its total done), so columns keep still
    note: str = ""  # encode's lag: after the info, or under it where the line is too narrow

    @property
    def info_note(self) -> str:
        return f"{self.info} · {self.note}" if self.info and self.note else self.info or self.note


def _phase_row(row: PhaseRow, note: str = "") -> _Row:
    frac = row.fraction if row.state != "pending" else 0.0
    pct = percent(row.fraction).strip() if row.fraction is not None and row.state != "pending" else ""
    if row.unit is None:
        what = row.state
        info = row.detail or ""
    else:
        what = amount(row.done, row.total, row.unit) if row.state != "pending" else "pending"
        info = rate_text(row.rate, row.unit) if row.state == "running" else (row.detail or "")
    top = max(row.done, row.total or 0.0)
    width = len(amount(top, row.total, row.unit)) if row.unit is not None else len(what)
    return _Row(row.phase, row.state, frac, pct, what, info, max(width, len(what)), note)


def _upscale_row(up: PhaseRow, enc: PhaseRow) -> tuple[PhaseRow, str]:
    """Upscale and encode as one row: they run together, frame by frame.

    Encoding left after the last upscaled frame shows as encode's own count;
    before that, encode's lag shows once it is worth `LAG_S` of upscaling.
    """
    if up.state == "done" and enc.state == "running":
        return dataclasses.replace(enc, phase=up.phase), "encoding"
    lag = up.done - enc.done
    if enc.state == "running" and up.rate and lag / up.rate >= LAG_S:
        return up, f"encode {lag:,.0f} behind"
    return up, ""


def merged(phases: tuple[PhaseRow, ...]) -> list[tuple[PhaseRow, str]]:
    """The phases as every view shows them, each with a note: upscale and encode as one."""
    by_name = {r.phase: r for r in phases}
    up, enc = by_name.get("upscale"), by_name.get("encode")
    rows = []
    for row in phases:
        if up is not None and enc is not None and row.phase in ("upscale", "encode"):
            if row.phase == "upscale":
                rows.append(_upscale_row(up, enc))
            continue
        rows.append((row, ""))
    return rows


def _rows(snap: Snapshot) -> list[_Row]:
    """The rows of a snapshot, upscale and encode merged, the overall row last."""
    rows = [_phase_row(row, note) for row, note in merged(snap.phases)]
    elapsed = f"{clock(snap.elapsed)} elapsed"
    rows.append(_Row("overall", snap.state, snap.fraction, percent(snap.fraction).strip(), elapsed, snap.eta_text,
                     len(elapsed)))
    return rows


def _bar(row: _Row, width: int, animation_time: float) -> ProgressBar:
    if row.fraction is None:  # a pulse for work of unknown size, timed by the snapshot (not the wall clock)
        return ProgressBar(total=None, completed=0.0, width=width, animation_time=animation_time)
    return ProgressBar(total=1.0, completed=row.fraction, width=width)


def _row_style(row: _Row) -> str:
    if row.name == "overall":
        return {"error": "red", "cancelled": "yellow"}.get(row.state, "bold")
    return _STYLE.get(row.state, "")


class ProgressView:
    """A snapshot drawn to the console's width (also used by `clipexport status`).

    From the top: the header (what the job is), notes on work served from
    earlier runs, one row per phase, the overall row, and at the end the
    summary or the error. Percent, counts and ETA keep fixed widths; the bars
    take what is left, up to `BAR_MAX`. Below `WIDE_MIN` columns (or when the
    bars would be shorter than `BAR_MIN`) the phase rows lose their bars and
    the overall bar gets a line of its own, so that nothing that matters is
    cut at 60 columns.
    """

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        snap, width = self.snap, options.max_width
        yield from _lines(header_parts(snap.info), width, "bold")
        yield from _lines(skip_notes(snap.phases, snap.info), width, "dim")
        rows = _rows(snap)
        what_w = max(WHAT_MIN, *(r.width for r in rows))
        bar_w = min(BAR_MAX, width - NAME_W - PCT_W - what_w - ETA_W - 4)
        if width >= WIDE_MIN and bar_w >= BAR_MIN:
            yield self._wide(rows, what_w, bar_w)
        else:
            yield from self._compact(rows, what_w, width)
        yield from self._end(width)

    def _wide(self, rows: list[_Row], what_w: int, bar_w: int) -> Table:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, width=NAME_W)
        grid.add_column(no_wrap=True, width=bar_w)
        grid.add_column(no_wrap=True, justify="right", width=PCT_W)
        grid.add_column(no_wrap=True, width=what_w)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        for row in rows:
            style = _row_style(row)
            grid.add_row(Text(row.name, style=style), _bar(row, bar_w, self.snap.elapsed), Text(row.pct, style=style),
                         Text(row.what, style=style), Text(row.info_note, style=style if row.name == "overall" else "dim"))
        return grid

    def _compact(self, rows: list[_Row], what_w: int, width: int) -> Iterator[RenderableType]:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, width=NAME_W)
        grid.add_column(no_wrap=True, justify="right", width=PCT_W)
        grid.add_column(no_wrap=True, width=what_w)
        grid.add_column(overflow="fold")
        *phases, overall = rows
        room = width - NAME_W - PCT_W - what_w - 3
        for row in phases:
            style = _row_style(row)
            info = "\n".join(pack([p for p in (row.info, row.note) if p], room))
            grid.add_row(Text(row.name, style=style), Text(row.pct, style=style), Text(row.what, style=style),
                         Text(info, style="dim"))
        yield grid
        style = _row_style(overall)
        bar = Table.grid(padding=(0, 1))
        bar.add_column(no_wrap=True, width=max(1, width - PCT_W - 1))
        bar.add_column(no_wrap=True, justify="right", width=PCT_W)
        bar.add_row(_bar(overall, max(1, width - PCT_W - 1), self.snap.elapsed), Text(overall.pct, style=style))
        yield bar
        yield from _lines([overall.what, overall.info], width, style)

    def _end(self, width: int) -> Iterator[RenderableType]:
        snap = self.snap
        if snap.state == "done":
            if snap.message:
                yield Text(f"output {snap.message}", style="green", overflow="fold")
            yield from _lines(summary_parts(snap), width, "green")
        elif snap.state == "error" and snap.message:
            yield Text(f"error: {snap.message}", style="red", overflow="fold")


def _lines(parts: list[str], width: int, style: str) -> Iterator[Text]:
    for line in pack(parts, width):
        yield Text(line, style=style, overflow="fold")


def render_snapshot(snap: Snapshot) -> RenderableType:
    """The Rich view of a snapshot, laid out for whatever console draws it."""
    return ProgressView(snap)
