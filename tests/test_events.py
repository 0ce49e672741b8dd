"""The event contract in code: stamping, validation, the log, log lines."""

from __future__ import annotations

import json

import pytest

from clipexport import events


def make_emitter(sink, next_seq=0):
    clock = iter(range(100, 200))
    return events.Emitter("cx-000001", [sink], next_seq=next_seq, clock=lambda: float(next(clock)))


def test_emitter_stamps_seq_time_and_keeps_extra_fields():
    got = []
    emit = make_emitter(got.append, next_seq=7)
    emit("progress", phase="upscale", part="seg-0001", unit="frames", done=3, total=10, attempt=1, worker="w1")
    emit("heartbeat", phase="queue", detail="cold start")
    assert [e["seq"] for e in got] == [7, 8]
    assert [e["t"] for e in got] == [100.0, 101.0]
    assert got[0]["worker"] == "w1" and got[0]["v"] == 1 and got[0]["job"] == "cx-000001"
    for event in got:
        events.validate_event(event)


def test_partial_event_cannot_override_stamped_fields():
    got = []
    make_emitter(got.append).emit({"type": "heartbeat", "phase": "queue", "seq": 99, "job": "other"})
    assert got[0]["seq"] == 0 and got[0]["job"] == "cx-000001"


@pytest.mark.parametrize("last", ["done", "error", "cancelled", "interrupted"])
def test_emitter_delivers_nothing_after_the_last_event_of_a_run(last):
    got = []
    emitter = make_emitter(got.append)
    emitter("progress", phase="upscale", done=1)
    emitter(last)
    emitter("progress", phase="upscale", done=2)  # a straggler from another thread
    emitter("snapshot", fraction=0.5)
    assert [e["type"] for e in got] == ["progress", last] and [e["seq"] for e in got] == [0, 1]


@pytest.mark.parametrize(
    "event, problem",
    [
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "nope"}, "unknown event type"),
        ({"v": 2, "job": "j", "seq": 0, "t": 1.0, "type": "done", "output": "x"}, "version"),
        ({"v": 1, "job": "j", "seq": "0", "t": 1.0, "type": "done", "output": "x"}, "seq"),
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "progress", "phase": "upscale"}, "done"),
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "error", "message": "m"}, "resumable"),
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "interrupted", "exit_code": 130}, "resumable"),
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "snapshot", "fraction": None}, "fraction"),
        ({"v": 1, "job": "j", "seq": 0, "t": 1.0, "type": "plan", "phases": []}, "phases"),
    ],
)
def test_validate_rejects(event, problem):
    with pytest.raises(ValueError, match=problem):
        events.validate_event(event)


def test_log_survives_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "events.jsonl"
    log = events.EventLog(path)
    emit = make_emitter(log)
    emit("phase_start", phase="prepare")
    emit("phase_end", phase="prepare", elapsed=1.5)
    log.close()
    with open(path, "a") as f:
        f.write('{"v":1,"job":"cx-000001","seq":2,"t"')
    assert [e["seq"] for e in events.read_events(path)] == [0, 1]
    assert events.last_seq(path) == 1
    resumed = events.EventLog(path)
    make_emitter(resumed, next_seq=2)("phase_start", phase="upscale")
    resumed.close()
    assert [e["seq"] for e in events.read_events(path)] == [0, 1, 2]
    assert events.last_seq(tmp_path / "missing.jsonl") == -1


def test_log_line_for_phase_end():
    event = {"v": 1, "job": "cx-3f9a1c", "seq": 41, "t": 1.0, "type": "phase_end", "phase": "upscale",
             "unit": "frames", "done": 1440, "elapsed": 83.412}
    assert events.log_line(event) == (
        "[Progress Event] job=cx-3f9a1c phase=upscale event=phase_end elapsed=83.412 frames=1440 fps_actual=17.3"
    )
    assert events.log_line({**event, "type": "progress"}) is None
    json.dumps(event)


def test_throttle_lets_progress_through_once_per_interval():
    now = [0.0]
    throttle = events.Throttle(0.25, clock=lambda: now[0])
    seen = []
    for step in range(10):
        now[0] = step * 0.1
        seen.append(throttle.ready())
    assert seen == [True, False, False, True, False, False, True, False, False, True]


def test_an_event_a_sink_emits_is_delivered_right_after_the_one_being_delivered():
    """A display's snapshot emitted while a phase_end is delivered: every sink sees seq in order."""
    seen: dict[str, list[tuple[int, str]]] = {"first": [], "second": []}
    emitter: events.Emitter

    def first(event):
        seen["first"].append((event["seq"], event["type"]))
        if event["type"] == "phase_end":
            queued = emitter.emit({"type": "snapshot", "fraction": 0.5})
            assert "seq" not in queued  # not stamped yet: it waits for this delivery to end

    emitter = events.Emitter("cx-000001", [first, lambda e: seen["second"].append((e["seq"], e["type"]))],
                      clock=lambda: 1.0)
    emitter("phase_start", phase="upscale")
    assert emitter("phase_end", phase="upscale")["type"] == "phase_end"
    emitter("done", output="o.mp4", elapsed=1.0)
    expected = [(0, "phase_start"), (1, "phase_end"), (2, "snapshot"), (3, "done")]
    assert seen["first"] == expected and seen["second"] == expected
