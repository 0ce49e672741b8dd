"""Views of a job's progress: Rich rows, plain log lines, NDJSON, or nothing.

The only module of the package that imports Rich. Every view draws the
tracker's `Snapshot`; none does arithmetic of its own.

A `Display` owns the feeding: `handle(event)` feeds the tracker and redraws
as the view wants. `handle` may be called from any thread (one lock guards
the tracker and the drawing). Use it as a context manager, or call `close()`
for the final render.

- ``rich``: a Live multi-row view on stderr (one row per phase in its own
  unit, an overall row with elapsed time and the ETA in words), refreshed on
  its own timer so the countdown moves between events.
- ``plain``: timestamped lines, one at each phase change and one every few
  seconds, never an animation: what a log file or CI wants.
- ``json``: each event as one NDJSON line on stdout, for machines.
- ``none``: feeds the tracker, shows nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .text import amount, clock, rate_text
from .tracker import PhaseRow, Snapshot, Tracker

MODES = ("auto", "rich", "plain", "json", "none")
Clock = Callable[[], float]


def choose_mode(mode: str, isatty: bool) -> str:
    """Resolve 'auto': Rich on a terminal, plain lines otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown display mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "rich" if isatty else "plain"
    return mode


def make_display(
    mode: str,
    *,
    stream: IO[str] | None = None,
    tracker: Tracker,
    clock: Clock = time.time,
    refresh: bool = True,
    console: Console | None = None,
) -> Display:
    """The display for `mode` ("rich", "plain", "json", "none"; "auto" picks by TTY).

    `stream` replaces stderr (stdout for json). `refresh=False` turns off the
    background timers (tests drive `tick()` by hand).
    """
    if mode == "auto":
        target = stream if stream is not None else sys.stderr
        mode = choose_mode("auto", bool(getattr(target, "isatty", lambda: False)()))
    mode = choose_mode(mode, False)
    if mode == "rich":
        return RichDisplay(tracker, clock=clock, stream=stream, refresh=refresh, console=console)
    if mode == "plain":
        return PlainDisplay(tracker, clock=clock, stream=stream, refresh=refresh)
    if mode == "json":
        return JsonDisplay(tracker, clock=clock, stream=stream)
    return Display(tracker, clock=clock)


class Display:
    """Feeds the tracker; shows nothing (the "none" mode and the base of the others)."""

    def __init__(self, tracker: Tracker, *, clock: Clock = time.time) -> None:
        self.tracker = tracker
        self.clock = clock
        self._lock = threading.RLock()
        self._closed = False

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


class JsonDisplay(Display):
    """Each event as one line of JSON on stdout."""

    def __init__(self, tracker: Tracker, *, clock: Clock = time.time, stream: IO[str] | None = None) -> None:
        super().__init__(tracker, clock=clock)
        self.stream = stream

    def _on_event(self, event: dict[str, Any]) -> None:
        out = self.stream if self.stream is not None else sys.stdout
        out.write(json.dumps(event, separators=(",", ":")) + "\n")
        out.flush()


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


def phase_text(row: PhaseRow) -> str:
    """One phase for a plain line: 'upscale 576/1,440 frames, 12 frames/s'."""
    if row.state == "waiting" or row.unit is None:
        return f"{row.phase}: {row.detail}" if row.detail else f"{row.phase}: waiting"
    text = f"{row.phase} {amount(row.done, row.total, row.unit)}"
    rate = rate_text(row.rate, row.unit)
    return f"{text}, {rate}" if rate else text


def percent(fraction: float) -> str:
    """Floor, so a job never reads 100% before it is done."""
    return f"{int(fraction * 100 + 1e-9):3d}%"


def status_line(snap: Snapshot) -> str:
    """The body of a periodic plain line (no timestamp)."""
    active = [phase_text(r) for r in snap.phases if r.state in ("running", "waiting")]
    parts = [percent(snap.fraction)]
    if active:
        parts.append("; ".join(active))
    parts.append(f"{clock(snap.elapsed)} elapsed")
    parts.append(snap.eta_text)
    return " · ".join(parts)


class PlainDisplay(Display):
    """Timestamped lines: at each phase change and every `interval` seconds.

    Lines look like::

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
        interval: float = 5.0,
        refresh: bool = True,
        tz: tzinfo | None = None,
    ) -> None:
        super().__init__(tracker, clock=clock)
        self.stream = stream
        self.interval = interval
        self.tz = tz
        self._last_line: float | None = None
        self._started: set[str] = set()
        self._ended: set[str] = set()
        self._final = False
        self._ticker = _Ticker(interval, self.tick) if refresh else None

    def _write(self, now: float, text: str) -> None:
        stamp = datetime.fromtimestamp(now, self.tz).strftime("%H:%M:%S")
        out = self.stream if self.stream is not None else sys.stderr
        out.write(f"{stamp}  {text}\n")
        out.flush()

    def _on_event(self, event: dict[str, Any]) -> None:
        now = self.clock()
        typ = event.get("type")
        phase = event.get("phase")
        whole = "part" not in event and isinstance(phase, str)
        if typ == "phase_start" and whole and phase not in self._started:
            self._started.add(phase)
            self._write(now, f"{phase} started")
            return
        if typ == "phase_end" and whole and phase not in self._ended:
            self._ended.add(phase)
            elapsed = event.get("elapsed")
            took = f" in {clock(elapsed)}" if isinstance(elapsed, (int, float)) else ""
            self._write(now, f"{phase} done{took}")
            return
        if typ in ("done", "error", "cancelled"):
            self._final_line(now)
            return
        self._periodic(now)

    def _final_line(self, now: float) -> None:
        snap = self.tracker.snapshot(now)
        if snap.state == "done":
            where = f" → {snap.message}" if snap.message else ""
            self._write(now, f"100% · done in {clock(snap.elapsed)}{where}")
        elif snap.state == "error":
            self._write(now, f"failed after {clock(snap.elapsed)}: {snap.message or 'unknown error'}")
        elif snap.state == "cancelled":
            self._write(now, f"cancelled after {clock(snap.elapsed)}")
        else:
            return
        self._final = True
        self._last_line = now

    def _periodic(self, now: float) -> None:
        if self._final:
            return
        if self._last_line is None:
            self._last_line = now  # the first status line comes one interval in
            return
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._write(now, status_line(self.tracker.snapshot(now)))

    def tick(self) -> None:
        with self._lock:
            if not self._closed and self.tracker.state.events:
                self._periodic(self.clock())

    def _on_close(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if not self._final and self.tracker.state.events:
            now = self.clock()
            if self.tracker.state.terminal:
                self._final_line(now)
            else:
                self._write(now, status_line(self.tracker.snapshot(now)))


# -- Rich ----------------------------------------------------------------------


class RichDisplay(Display):
    """A Live view: one row per phase, then the overall row."""

    BAR_WIDTH = 30

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

    def _renderable(self) -> RenderableType:
        with self._lock:
            return render_snapshot(self.tracker.snapshot(self.clock()), self.BAR_WIDTH)

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


_STYLE = {"done": "green", "running": "cyan", "waiting": "yellow", "pending": "dim"}


def render_snapshot(snap: Snapshot, bar_width: int = 30) -> RenderableType:
    """The Rich rows of a snapshot (also used by `clipexport status`)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=10)  # phase
    grid.add_column(no_wrap=True, width=bar_width)  # bar
    grid.add_column(no_wrap=True, justify="right", width=4)  # percent
    grid.add_column(no_wrap=True)  # amount / elapsed
    grid.add_column(no_wrap=True)  # rate / detail / eta
    for row in snap.phases:
        style = _STYLE.get(row.state, "")
        frac = row.fraction
        if row.state == "pending":
            bar: RenderableType = ProgressBar(total=1.0, completed=0.0, width=bar_width)
        elif frac is None:
            # a pulse for work of unknown size, timed by the snapshot (not the wall clock)
            done = row.state == "done"
            bar = ProgressBar(total=1.0 if done else None, completed=1.0 if done else 0.0, width=bar_width, animation_time=snap.elapsed)
        else:
            bar = ProgressBar(total=1.0, completed=frac, width=bar_width)
        pct = percent(frac).strip() if frac is not None and row.state != "pending" else ""
        if row.unit is None:
            what = row.state if row.state != "waiting" else "waiting"
            info = row.detail or ""
        else:
            what = amount(row.done, row.total, row.unit) if row.state != "pending" else "pending"
            info = rate_text(row.rate, row.unit) if row.state == "running" else (row.detail or "")
        grid.add_row(Text(row.phase, style=style), bar, Text(pct, style=style), Text(what, style=style), Text(info, style="dim"))
    overall_style = {"error": "red", "cancelled": "yellow"}.get(snap.state, "bold")
    grid.add_row(
        Text("overall", style=overall_style),
        ProgressBar(total=1.0, completed=snap.fraction, width=bar_width),
        Text(percent(snap.fraction).strip(), style=overall_style),
        Text(f"{clock(snap.elapsed)} elapsed"),
        Text(snap.eta_text, style=overall_style),
    )
    if snap.state == "error" and snap.message:
        return Group(grid, Text(f"error: {snap.message}", style="red"))
    return grid
