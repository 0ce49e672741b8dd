"""The views: plain lines and Rich rows, drawn exactly, with a manual clock."""

from __future__ import annotations

import io
import re
import threading
from datetime import timezone

import pytest
from rich.console import Console

from clipexport.progress import PhaseRow, Snapshot, Tracker
from clipexport.progress.display import (
    Display,
    JsonDisplay,
    PlainDisplay,
    RichDisplay,
    choose_mode,
    make_display,
    render_snapshot,
    status_line,
)
from clipexport.progress.estimator import Estimate

T0 = 1_700_000_000.0  # 22:13:20 UTC


class KnownEnd:
    """An estimator that knows the job ends at `end`: keeps these tests about drawing."""

    def __init__(self, end: float) -> None:
        self.end = end

    def estimate(self, state, now):
        return Estimate(max(self.end - now, 1.0))


def local_job() -> list[dict]:
    """A short local job: prepare, load_model, one segment upscaled and encoded, finalize."""
    events = []

    def ev(t, type_, **fields):
        events.append({"v": 1, "job": "cx-abc123", "seq": len(events), "t": T0 + t, "type": type_, **fields})

    ev(0.0, "plan", phases=[
        {"phase": "prepare", "unit": "bytes", "total": 4_000_000},
        {"phase": "load_model", "unit": None, "total": None},
        {"phase": "upscale", "unit": "frames", "total": 200},
        {"phase": "encode", "unit": "frames", "total": 200},
        {"phase": "finalize", "unit": None, "total": None},
    ], features={"backend": "local", "gpu": "cpu", "model": "realesr-animevideov3", "scale": 2,
                 "in_width": 320, "in_height": 240, "frames": 200, "segments": 1, "parallel": 1})
    ev(0.1, "phase_start", phase="prepare", unit="bytes", total=4_000_000)
    ev(0.5, "progress", phase="prepare", unit="bytes", done=4_000_000, total=4_000_000)
    ev(0.5, "phase_end", phase="prepare", unit="bytes", done=4_000_000, total=4_000_000, elapsed=0.4)
    ev(0.6, "phase_start", phase="load_model")
    ev(1.6, "heartbeat", phase="load_model", detail="loading model")
    ev(2.6, "phase_end", phase="load_model", elapsed=2.0)
    ev(2.7, "phase_start", phase="upscale", unit="frames", total=200)
    ev(2.7, "phase_start", phase="upscale", part="seg-0001", unit="frames", total=200, attempt=1, worker="local")
    ev(2.9, "phase_start", phase="encode", unit="frames", total=200)
    ev(2.9, "phase_start", phase="encode", part="seg-0001", unit="frames", total=200, attempt=1, worker="local")
    for k in range(1, 21):
        ev(2.7 + k, "progress", phase="upscale", part="seg-0001", unit="frames", done=10 * k, total=200, attempt=1)
        ev(2.8 + k, "progress", phase="encode", part="seg-0001", unit="frames", done=10 * k - 5, total=200, attempt=1)
    ev(22.7, "phase_end", phase="upscale", part="seg-0001", unit="frames", done=200, total=200, attempt=1, elapsed=20.0)
    ev(22.7, "phase_end", phase="upscale", unit="frames", done=200, total=200, elapsed=20.0)
    ev(23.2, "phase_end", phase="encode", part="seg-0001", unit="frames", done=200, total=200, attempt=1, elapsed=20.3)
    ev(23.2, "phase_end", phase="encode", unit="frames", done=200, total=200, elapsed=20.3)
    ev(23.3, "phase_start", phase="finalize")
    ev(24.1, "phase_end", phase="finalize", elapsed=0.8)
    ev(24.2, "done", output="/exports/out.mp4", elapsed=24.2)
    return events


def run_plain(events, end=T0 + 24.2, **kw) -> str:
    now = [T0]
    tracker = Tracker()
    tracker.estimator = KnownEnd(end)
    out = io.StringIO()
    with PlainDisplay(tracker, clock=lambda: now[0], stream=out, refresh=False, tz=timezone.utc, **kw) as display:
        for event in events:
            now[0] = event["t"]
            display.handle(event)
    return out.getvalue()


def test_plain_lines_at_phase_changes_and_every_five_seconds():
    assert run_plain(local_job()) == (
        "22:13:20  prepare started\n"
        "22:13:20  prepare done in 0:00:00\n"
        "22:13:20  load_model started\n"
        "22:13:22  load_model done in 0:00:02\n"
        "22:13:22  upscale started\n"
        "22:13:22  encode started\n"
        "22:13:25   23% · upscale 30/200 frames, 10 frames/s; encode 15/200 frames, 5.4 frames/s"
        " · 0:00:05 elapsed · Less than a minute remaining\n"
        "22:13:30   44% · upscale 80/200 frames, 10 frames/s; encode 65/200 frames, 8.3 frames/s"
        " · 0:00:10 elapsed · Less than a minute remaining\n"
        "22:13:35   64% · upscale 130/200 frames, 10 frames/s; encode 115/200 frames, 9.0 frames/s"
        " · 0:00:15 elapsed · Almost done…\n"
        "22:13:40   85% · upscale 180/200 frames, 10 frames/s; encode 165/200 frames, 9.3 frames/s"
        " · 0:00:20 elapsed · Almost done…\n"
        "22:13:42  upscale done in 0:00:20\n"
        "22:13:43  encode done in 0:00:20\n"
        "22:13:43  finalize started\n"
        "22:13:44  finalize done in 0:00:00\n"
        "22:13:44  100% · done in 0:00:24 → /exports/out.mp4\n"
    )


def test_plain_output_is_never_an_animation():
    text = run_plain(local_job())
    assert "\r" not in text and "\x1b" not in text


def test_plain_waiting_phase_and_error():
    events = local_job()[:6]  # load_model running, with its heartbeat
    events.append({"v": 1, "job": "cx-abc123", "seq": 99, "t": T0 + 8.0, "type": "error", "message": "GPU out of memory", "resumable": True})
    assert run_plain(events, end=T0 + 30) == (
        "22:13:20  prepare started\n"
        "22:13:20  prepare done in 0:00:00\n"
        "22:13:20  load_model started\n"
        "22:13:28  failed after 0:00:08: GPU out of memory\n"
    )


def test_plain_close_without_terminal_event_prints_where_it_stands():
    text = run_plain(local_job()[:9])
    assert text.splitlines()[-1] == (
        "22:13:22   11% · upscale 0/200 frames · 0:00:02 elapsed · Less than a minute remaining"
    )


def test_status_line_of_a_waiting_phase():
    snap = Snapshot("cx", "running", 0.25, 30.0, 600.0, "About 10 minutes remaining", (
        PhaseRow("upload", "bytes", 5e6, 5e6, "done", None, None),
        PhaseRow("queue", None, 0.0, None, "waiting", None, "cold start (2)"),
        PhaseRow("upscale", "frames", 0.0, 1440.0, "pending", None, None),
    ))
    assert status_line(snap) == " 25% · queue: cold start (2) · 0:00:30 elapsed · About 10 minutes remaining"


def snapshot_cloud() -> Snapshot:
    return Snapshot(
        job="cx-3f9a1c",
        state="running",
        fraction=0.4312,
        elapsed=95.0,
        remaining_s=190.0,
        eta_text="About 3 minutes remaining",
        phases=(
            PhaseRow("prepare", "bytes", 48_211_044, 48_211_044, "done", None, None),
            PhaseRow("upload", "bytes", 48_211_044, 48_211_044, "done", None, None),
            PhaseRow("queue", None, 0, None, "done", None, None),
            PhaseRow("load_model", None, 0, None, "waiting", None, "loading model"),
            PhaseRow("upscale", "frames", 576, 1440, "running", 12.14, None),
            PhaseRow("encode", "frames", 560, 1440, "running", 11.8, None),
            PhaseRow("download", "bytes", 12_000_000, None, "running", 2.5e6, None),
            PhaseRow("finalize", None, 0, None, "pending", None, None),
        ),
    )


def test_rich_rows_exact():
    console = Console(file=io.StringIO(), width=100, force_terminal=False, color_system=None, no_color=False)
    console.print(render_snapshot(snapshot_cloud(), bar_width=20))
    lines = [line.rstrip() for line in console.file.getvalue().splitlines()]
    assert lines == [
        "prepare    ━━━━━━━━━━━━━━━━━━━━ 100% 48.2/48.2 MB",
        "upload     ━━━━━━━━━━━━━━━━━━━━ 100% 48.2/48.2 MB",
        "queue      ━━━━━━━━━━━━━━━━━━━━ 100% done",
        "load_model ━━━━━━━━━━━━━━━━━━━━      waiting          loading model",
        "upscale    ━━━━━━━━              40% 576/1,440 frames 12 frames/s",
        "encode     ━━━━━━━╸              38% 560/1,440 frames 12 frames/s",
        "download   ━━━━━━━━━━━━━━━━━━━━      12.0 MB          2.5 MB/s",
        "finalize                             pending",
        "overall    ━━━━━━━━╸             43% 0:01:35 elapsed  About 3 minutes remaining",
    ]


def test_rich_display_is_thread_safe_and_renders_on_close():
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)
    tracker = Tracker()
    events = local_job()
    display = make_display("rich", tracker=tracker, console=console, clock=lambda: T0 + 10)
    assert isinstance(display, RichDisplay)
    chunks = [events[i::4] for i in range(4)]
    threads = [threading.Thread(target=lambda c=c: [display.handle(e) for e in c]) for c in chunks]
    with display:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    text = out.getvalue()
    assert "overall" in text and "100%" in text and "Done" in text
    assert tracker.snapshot(T0 + 30).state == "done"


def test_rich_display_respects_no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    display = make_display("rich", tracker=Tracker(), stream=out, clock=lambda: T0 + 5, refresh=False)
    display.console._force_terminal = True  # draw as on a terminal
    with display:
        for event in local_job()[:10]:
            display.handle(event)
    assert display.console.no_color
    assert not re.search(r"\x1b\[(3[0-7]|38;|9[0-7])", out.getvalue())


@pytest.mark.parametrize(
    ("mode", "tty", "chosen"),
    [("auto", True, "rich"), ("auto", False, "plain"), ("plain", True, "plain"), ("json", True, "json"), ("none", False, "none"), ("rich", False, "rich")],
)
def test_choose_mode(mode, tty, chosen):
    assert choose_mode(mode, tty) == chosen


def test_choose_mode_rejects_unknown():
    with pytest.raises(ValueError, match="unknown display mode"):
        choose_mode("fancy", True)


def test_json_mode_writes_each_event_as_one_line():
    out = io.StringIO()
    tracker = Tracker()
    with make_display("json", tracker=tracker, stream=out) as display:
        assert isinstance(display, JsonDisplay)
        for event in local_job()[:5]:
            display.handle(event)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[1] == (
        '{"v":1,"job":"cx-abc123","seq":1,"t":1700000000.1,"type":"phase_start","phase":"prepare","unit":"bytes","total":4000000}'
    )
    assert tracker.state.events == 5


def test_none_mode_feeds_the_tracker_only():
    tracker = Tracker()
    display = make_display("none", tracker=tracker)
    assert type(display) is Display
    for event in local_job():
        display.handle(event)
    display.close()
    display.handle(local_job()[0])  # after close: ignored, no error
    assert tracker.snapshot(T0 + 30).fraction == 1.0


def test_auto_mode_on_a_pipe_is_plain():
    display = make_display("auto", tracker=Tracker(), stream=io.StringIO(), refresh=False)
    assert isinstance(display, PlainDisplay)
    display.close()
