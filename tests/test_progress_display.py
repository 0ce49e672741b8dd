"""The views: plain lines and Rich rows, drawn exactly, with a manual clock."""

from __future__ import annotations

import dataclasses
import io
import json
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
    _rows,
    choose_mode,
    line_interval,
    make_display,
    render_snapshot,
    snapshot_fields,
    status_line,
)
from clipexport.events import Emitter, validate_event
from clipexport.progress import TimingModel, fit_logs
from clipexport.progress.replay import replay_events
from clipexport.progress.text import skip_notes, summary_parts
from clipexport.progress.tracker import JobInfo
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
                 "in_width": 320, "in_height": 240, "frames": 200, "segments": 1, "parallel": 1,
                 "duration_s": 8.333},
       inputs=["/clips/intro.mp4"], output="/exports/out.mp4")
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
    ev(24.1, "phase_end", phase="finalize", elapsed=0.8, bytes=1_234_567)
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


def test_plain_lines_header_phase_changes_every_five_seconds_at_first_and_summary():
    assert run_plain(local_job()) == (
        "22:13:20  intro.mp4 → out.mp4 · 320x240 → 640x480 · realesr-animevideov3 · cpu · local\n"
        "22:13:20  prepare started\n"
        "22:13:20  prepare done in 0:00:00\n"
        "22:13:20  load_model started\n"
        "22:13:22  load_model done in 0:00:02\n"
        "22:13:22  upscale started\n"
        "22:13:22  encode started\n"
        "22:13:25   23% · upscale 30/200 frames, 10 frames/s"
        " · 0:00:05 elapsed · About 20 seconds remaining\n"
        "22:13:30   44% · upscale 80/200 frames, 10 frames/s"
        " · 0:00:10 elapsed · About 20 seconds remaining\n"
        "22:13:35   64% · upscale 130/200 frames, 10 frames/s"
        " · 0:00:15 elapsed · Almost done…\n"
        "22:13:40   85% · upscale 180/200 frames, 10 frames/s"
        " · 0:00:20 elapsed · Almost done…\n"
        "22:13:42  upscale done in 0:00:20\n"
        "22:13:43  encode done in 0:00:20\n"
        "22:13:43  finalize started\n"
        "22:13:44  finalize done in 0:00:00\n"
        "22:13:44  100% · done → /exports/out.mp4 · 1.2 MB · 640x480 · 8.3 s of video · took 0:00:24"
        " · 8.3 frames/s (0.34x real time)\n"
    )


def test_plain_output_is_never_an_animation():
    text = run_plain(local_job())
    assert "\r" not in text and "\x1b" not in text


def test_plain_waiting_phase_and_error():
    events = local_job()[:6]  # load_model running, with its heartbeat
    events.append({"v": 1, "job": "cx-abc123", "seq": 99, "t": T0 + 8.0, "type": "error", "message": "GPU out of memory", "resumable": True})
    assert run_plain(events, end=T0 + 30) == (
        "22:13:20  intro.mp4 → out.mp4 · 320x240 → 640x480 · realesr-animevideov3 · cpu · local\n"
        "22:13:20  prepare started\n"
        "22:13:20  prepare done in 0:00:00\n"
        "22:13:20  load_model started\n"
        "22:13:28  failed after 0:00:08\n"  # the message is the CLI's one line, not repeated here
    )


def test_plain_close_without_terminal_event_prints_where_it_stands():
    text = run_plain(local_job()[:9])
    assert text.splitlines()[-1] == (
        "22:13:22   11% · upscale 0/200 frames · 0:00:02 elapsed · About 20 seconds remaining"
    )


def test_status_line_of_a_waiting_phase():
    snap = Snapshot("cx", "running", 0.25, 30.0, 600.0, "About 10 minutes remaining", (
        PhaseRow("upload", "bytes", 5e6, 5e6, "done", None, None),
        PhaseRow("queue", None, 0.0, None, "waiting", None, "cold start (2)"),
        PhaseRow("upscale", "frames", 0.0, 1440.0, "pending", None, None),
    ))
    assert status_line(snap) == " 25% · queue: cold start (2) · 0:00:30 elapsed · About 10 minutes remaining"


def snapshot_cloud(**changes) -> Snapshot:
    """A cloud job mid-way: an upload served from the store, 2 of 6 segments cached, encode lagging."""
    snap = Snapshot(
        job="cx-3f9a1c",
        state="running",
        fraction=0.4312,
        elapsed=95.0,
        remaining_s=4000.0,
        eta_text="About 1 hour 10 minutes remaining",
        phases=(
            PhaseRow("prepare", "bytes", 48_211_044, 48_211_044, "done", None, None),
            PhaseRow("upload", "bytes", 48_211_044, 48_211_044, "done", None, None, skipped=1, parts=1),
            PhaseRow("queue", None, 0, None, "done", None, None),
            PhaseRow("load_model", None, 0, None, "waiting", None, "loading model"),
            PhaseRow("upscale", "frames", 576, 1440, "running", 12.14, None, skipped=2, parts=6),
            PhaseRow("encode", "frames", 480, 1440, "running", 11.8, None, skipped=2, parts=6),
            PhaseRow("download", "bytes", 12_000_000, None, "running", 2.5e6, None),
            PhaseRow("finalize", None, 0, None, "pending", None, None),
        ),
        info=JobInfo(inputs=("/clips/a.mp4", "/clips/b.mp4"), output="/exports/out.mp4", in_size=(1280, 720),
                     out_size=(5120, 2880), model="realesr-animevideov3", device="L4", precision="fp16",
                     backend="modal", frames=1440, duration_s=60.0, segments=6),
    )
    return dataclasses.replace(snap, **changes)


def draw(snap: Snapshot, width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None, no_color=False)
    console.print(render_snapshot(snap))
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


VIEW_AT = {
    120: [
        "a.mp4 + b.mp4 → out.mp4 · 1280x720 → 5120x2880 · realesr-animevideov3 · L4 · fp16 · modal",
        "upload skipped: already in the store · 2 of 6 segments already rendered",
        "prepare    ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 100% 48.2/48.2 MB",
        "upload     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 100% 48.2/48.2 MB",
        "queue      ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 100% done",
        "load_model ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━      waiting            loading model",
        "upscale    ━━━━━━━━━━━━━━━━                          40% 576/1,440 frames   12 frames/s · encode 96 behind",
        "download   ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━      12.0 MB            2.5 MB/s",
        "finalize                                                 pending",
        "overall    ━━━━━━━━━━━━━━━━━                         43% 0:01:35 elapsed    About 1 hour 10 minutes remaining",
    ],
    80: [
        "a.mp4 + b.mp4 → out.mp4 · 1280x720 → 5120x2880",
        "realesr-animevideov3 · L4 · fp16 · modal",
        "upload skipped: already in the store · 2 of 6 segments already rendered",
        "prepare    100% 48.2/48.2 MB",
        "upload     100% 48.2/48.2 MB",
        "queue      100% done",
        "load_model      waiting            loading model",
        "upscale     40% 576/1,440 frames   12 frames/s · encode 96 behind",
        "download        12.0 MB            2.5 MB/s",
        "finalize        pending",
        "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━                                             43%",
        "0:01:35 elapsed · About 1 hour 10 minutes remaining",
    ],
    60: [
        "a.mp4 + b.mp4 → out.mp4 · 1280x720 → 5120x2880",
        "realesr-animevideov3 · L4 · fp16 · modal",
        "upload skipped: already in the store",
        "2 of 6 segments already rendered",
        "prepare    100% 48.2/48.2 MB",
        "upload     100% 48.2/48.2 MB",
        "queue      100% done",
        "load_model      waiting            loading model",
        "upscale     40% 576/1,440 frames   12 frames/s",
        "                                   encode 96 behind",
        "download        12.0 MB            2.5 MB/s",
        "finalize        pending",
        "━━━━━━━━━━━━━━━━━━━━━━━╸                                 43%",
        "0:01:35 elapsed · About 1 hour 10 minutes remaining",
    ],
}


@pytest.mark.parametrize("width", sorted(VIEW_AT))
def test_view_exact_at_120_80_and_60_columns(width):
    assert draw(snapshot_cloud(), width) == VIEW_AT[width]


def test_view_of_a_finished_job_ends_with_its_summary():
    tracker = Tracker()
    tracker.estimator = KnownEnd(T0 + 24.2)
    for event in local_job():
        tracker.feed(event)
    assert draw(tracker.snapshot(T0 + 30), 60) == [
        "intro.mp4 → out.mp4 · 320x240 → 640x480",
        "realesr-animevideov3 · cpu · local",
        "prepare    100% 4.0/4.0 MB",
        "load_model 100% done",
        "upscale    100% 200/200 frames",
        "finalize   100% done",
        "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 100%",
        "0:00:24 elapsed · Done",
        "output /exports/out.mp4",
        "1.2 MB · 640x480 · 8.3 s of video",
        "took 0:00:24 · 8.3 frames/s (0.34x real time)",
    ]


LONG = dataclasses.replace(
    snapshot_cloud(), eta_text="About 23 hours 50 minutes remaining", elapsed=360_000.0,
    phases=(PhaseRow("upscale", "frames", 1_234_567, 9_876_543, "running", 1234.5, None),
            PhaseRow("encode", "frames", 1_234_567, 9_876_543, "running", 1234.5, None),
            PhaseRow("download", "bytes", 123_456_789_012, 999_456_789_012, "running", 12.3e6, None)),
)


@pytest.mark.parametrize("width", range(60, 131, 5))
@pytest.mark.parametrize("snap", [snapshot_cloud(), LONG], ids=["cloud", "long"])
def test_nothing_that_matters_is_cut_at_60_columns_or_more(snap, width):
    lines = draw(snap, width)
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    for row in _rows(snap):  # percent, counts, rate and ETA each whole on one line
        for piece in (row.pct, row.what, row.info, row.note):
            assert piece in text, (piece, text)


def test_encode_lag_shows_only_when_worth_seconds_of_upscaling():
    def info(enc_done, up_state="running", enc_state="running"):
        up = PhaseRow("upscale", "frames", 576 if up_state == "running" else 1440, 1440, up_state, 12.0, None)
        enc = PhaseRow("encode", "frames", enc_done, 1440, enc_state, 11.0, None)
        return [(r.name, r.pct, r.what, r.info, r.note) for r in _rows(snapshot_cloud(phases=(up, enc)))][0]

    assert info(560) == ("upscale", "40%", "576/1,440 frames", "12 frames/s", "")  # 16 frames: 1.3 s
    assert info(500) == ("upscale", "40%", "576/1,440 frames", "12 frames/s", "encode 76 behind")  # 6.3 s
    assert info(1300, up_state="done") == ("upscale", "90%", "1,300/1,440 frames", "11 frames/s", "encoding")
    assert info(1440, up_state="done", enc_state="done") == ("upscale", "100%", "1,440/1,440 frames", "", "")


def test_skipped_work_comes_from_the_events():
    """Cached segments (`skipped` on their progress) and a stored upload are counted and named."""
    tracker = Tracker()
    job = [e for e in local_job() if e.get("phase") not in ("upscale", "encode")]
    job[0] = dict(job[0], features=dict(job[0]["features"], segments=3))
    t = T0 + 3
    extra = [
        {"type": "phase_start", "phase": "upload", "part": "clip-01", "unit": "bytes", "total": 10, "skipped": True},
        {"type": "phase_end", "phase": "upload", "part": "clip-01", "unit": "bytes", "done": 10, "skipped": True},
        *({"type": "progress", "phase": "upscale", "part": f"seg-000{k}", "unit": "frames", "done": 10, "total": 10,
           "attempt": 1, "skipped": True} for k in (1, 2)),
        {"type": "progress", "phase": "upscale", "part": "seg-0003", "unit": "frames", "done": 3, "total": 10,
         "attempt": 1},
    ]
    for k, event in enumerate(job[:5] + [dict(e, v=1, job="cx-abc123", seq=100 + k, t=t) for k, e in enumerate(extra)]):
        tracker.feed(event)
    snap = tracker.snapshot(t)
    rows = {r.phase: r for r in snap.phases}
    assert (rows["upscale"].skipped, rows["upscale"].parts, rows["upload"].skipped) == (2, 3, 1)
    assert skip_notes(snap.phases, snap.info) == ["2 of 3 segments already rendered",
                                                  "upload skipped: already in the store"]


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


@pytest.mark.parametrize(
    ("elapsed", "remaining", "interval"),
    [
        (0.0, None, 5.0),  # frequent at first
        (29.0, 36_000.0, 5.0),
        (30.0, 270.0, 5.0),  # a 5-minute job: 1 % is 3 s, never under 5 s
        (60.0, 1140.0, 12.0),  # a 20-minute job: 1 % steps
        (600.0, 3000.0, 30.0),  # an hour: at most one line every 30 s
        (600.0, None, 6.0),  # no estimate: 1 % of what has run
        (600.0, float("inf"), 6.0),
    ],
)
def test_plain_line_interval_adapts_to_the_job_length(elapsed, remaining, interval):
    assert line_interval(elapsed, remaining) == pytest.approx(interval)


def long_job(minutes: int) -> list[dict]:
    """A job of `minutes` upscaling one frame a second, an event every second."""
    seconds = minutes * 60
    job = [dict(local_job()[0], phases=[{"phase": "upscale", "unit": "frames", "total": seconds}])]
    for k in range(1, seconds):
        job.append({"v": 1, "job": "cx-abc123", "seq": 100 + k, "t": T0 + 3 + k, "type": "progress",
                    "phase": "upscale", "part": "seg-0001", "unit": "frames", "done": k, "total": seconds,
                    "attempt": 1})
    return job


def periodic_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "% · " in line]


def test_plain_lines_of_an_hour_long_job_come_every_30_s():
    lines = periodic_lines(run_plain(long_job(60), end=T0 + 3603))
    stamps = [int(line[:2]) * 3600 + int(line[3:5]) * 60 + int(line[6:8]) for line in lines]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert gaps[:4] == [5, 5, 5, 5]  # the first half minute
    assert set(gaps[10:-1]) == {30}  # the last line is where it stood at close
    assert 120 <= len(lines) <= 130  # not 720


def test_progress_interval_fixes_the_plain_line_interval():
    lines = periodic_lines(run_plain(long_job(5), end=T0 + 303, interval=60.0))
    # every 60 s from the first progress, and where it stood at close
    assert [line[:8] for line in lines] == ["22:14:24", "22:15:24", "22:16:24", "22:17:24", "22:18:22"]


def test_plain_says_when_a_job_is_stopped():
    events = local_job()[:12]
    events.append({"v": 1, "job": "cx-abc123", "seq": 12, "t": T0 + 9.0, "type": "interrupted",
                   "reason": "interrupted", "exit_code": 130, "resumable": True})
    assert run_plain(events).splitlines()[-1] == "22:13:29  stopped after 0:00:09; the job is resumable"


def run_json(events, *, interval=None, tick_at=None) -> list[dict]:
    """The events through a real emitter into a JSON view, its timer ticking after each (and at `tick_at`)."""
    now = [T0]
    tracker = Tracker()
    tracker.estimator = KnownEnd(T0 + 24.2)
    out = io.StringIO()
    with JsonDisplay(tracker, clock=lambda: now[0], stream=out, refresh=False, interval=interval) as display:
        emitter = Emitter("cx-abc123", [display.handle], clock=lambda: now[0])
        display.attach(emitter.emit)
        for event in events:
            now[0] = event["t"]
            emitter.emit({k: v for k, v in event.items() if k not in ("v", "job", "seq", "t")})
            display.tick()
        if tick_at is not None:
            now[0] = tick_at
            display.tick()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_adds_periodic_snapshots_with_fraction_and_remaining_time():
    lines = run_json(local_job())
    after_phase = [b for a, b in zip(lines, lines[1:]) if a["type"] == "phase_end"]
    assert after_phase and all(s["type"] == "snapshot" for s in after_phase)  # every phase's end, however short
    snaps = [b for a, b in zip(lines, lines[1:]) if b["type"] == "snapshot" and a["type"] != "phase_end"]
    assert [s["t"] - T0 for s in snaps] == pytest.approx([7.7, 12.7, 17.7, 22.7])  # 5 s after the last one
    first = snaps[0]
    assert first == {
        "v": 1, "job": "cx-abc123", "seq": 22, "t": pytest.approx(T0 + 7.7), "type": "snapshot",
        "fraction": first["fraction"], "elapsed": 7.7, "remaining_s": 16.5, "eta_text": "About 20 seconds remaining",
        "phases": first["phases"],
    }
    assert 0 < first["fraction"] < snaps[-1]["fraction"] < 1
    assert first["phases"][2] == {"phase": "upscale", "state": "running", "unit": "frames", "done": 50.0,
                                  "total": 200.0}
    for line in lines:
        validate_event(line)
    assert [line["seq"] for line in lines] == list(range(len(lines)))  # a snapshot is an event like any other
    strip = ("v", "job", "seq")
    assert [{k: v for k, v in e.items() if k not in strip} for e in lines if e["type"] != "snapshot"] == [
        {k: v for k, v in e.items() if k not in strip} for e in local_job()]  # the events pass through untouched


def test_json_snapshot_carries_the_80_percent_range_when_the_estimator_has_one():
    snap = dataclasses.replace(snapshot_cloud(), remaining_lo_s=12.04, remaining_hi_s=30.0)
    fields = snapshot_fields(snap)
    assert (fields["remaining_lo_s"], fields["remaining_hi_s"]) == (12.0, 30.0)
    assert "remaining_lo_s" not in snapshot_fields(snapshot_cloud())


def test_json_snapshot_between_events_and_none_after_the_end():
    lines = run_json(local_job()[:9], interval=2.0, tick_at=T0 + 30.0)
    assert lines[-1]["type"] == "snapshot" and lines[-1]["t"] == T0 + 30.0  # the timer's, between events
    stopped = local_job()[:9] + [{"v": 1, "job": "cx-abc123", "seq": 9, "t": T0 + 3.0, "type": "interrupted",
                                  "reason": "interrupted", "exit_code": 130, "resumable": True}]
    for job in (local_job(), stopped):
        lines = run_json(job, tick_at=T0 + 60.0)
        assert lines[-1]["type"] == job[-1]["type"]


def test_events_consumers_accept_the_new_types(tmp_path):
    """A log holding `snapshot` and `interrupted` lines still replays and fits."""
    job = local_job()
    stop = {"v": 1, "job": "cx-abc123", "seq": 30, "t": T0 + 12.0, "type": "interrupted", "reason": "interrupted",
            "exit_code": 130, "resumable": True}
    snap = {"v": 1, "job": "cx-abc123", "seq": 29, "t": T0 + 11.9, "type": "snapshot", "fraction": 0.5,
            "remaining_s": 12.0, "phases": []}
    mixed = [*job[:30], snap, stop, *(dict(e, seq=e["seq"] + 2) for e in job[30:])]
    log = tmp_path / "job.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in mixed))
    for event in mixed:
        validate_event(event)
    plain = list(replay_events(job, TimingModel.default()))
    replayed = list(replay_events(mixed, TimingModel.default()))
    assert replayed[-1]["fraction"] == 1.0 and len(replayed) == len(plain) + 2
    assert fit_logs([log]).data == fit_logs_of(tmp_path, job).data


def fit_logs_of(tmp_path, job):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in job))
    return fit_logs([path])


@pytest.mark.parametrize(("term", "chosen"), [("dumb", "plain"), ("unknown", "plain"), ("xterm-256color", "rich"),
                                              (None, "rich")])
def test_auto_mode_gives_a_terminal_without_cursor_control_plain_lines(term, chosen):
    assert choose_mode("auto", True, term) == chosen
    assert choose_mode("rich", True, term) == "rich"  # asked for by name: as asked


def test_summary_gives_no_speed_when_earlier_work_was_reused():
    tracker = Tracker()
    tracker.estimator = KnownEnd(T0 + 24.2)
    for event in local_job():
        tracker.feed(dict(event, skipped=True) if event["type"] == "progress" and event["phase"] == "upscale"
                     else event)
    snap = tracker.snapshot(T0 + 30)
    assert skip_notes(snap.phases, snap.info) == ["1 of 1 segment already rendered"]
    assert summary_parts(snap) == ["1.2 MB", "640x480", "8.3 s of video", "took 0:00:24"]


def test_plain_status_line_shows_upscale_and_encode_as_one():
    assert status_line(snapshot_cloud()) == (
        " 43% · load_model: loading model; upscale 576/1,440 frames, 12 frames/s, encode 96 behind;"
        " download 12.0 MB, 2.5 MB/s · 0:01:35 elapsed · About 1 hour 10 minutes remaining")
