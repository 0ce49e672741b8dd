"""The tracker: any event sequence gives a sane, never-decreasing fraction;
the estimator counts down between events and grows during a stall."""

from __future__ import annotations

import pytest

import math
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipexport.progress import TimingModel, Tracker, estimate_plan
from clipexport.progress.estimator import Estimate, Estimator
from clipexport.progress.state import JobState

from .test_progress_synth import JobSpec, job_events

MODEL = TimingModel.default()
BASES = {
    "cloud": job_events(JobSpec(frames=360, segment_frames=120, upload_rate=4e6, input_bytes=8_000_000)),
    "local": job_events(JobSpec(backend="local", gpu="rtx4090", frames=240, segment_frames=120)),
    "restart": job_events(JobSpec(frames=360, segment_frames=120, restart={1: 0.6}, input_bytes=4_000_000)),
}


def damaged(events: list[dict], rnd: random.Random, shuffle: float, dup: float, drop: float) -> list[dict]:
    """Reorder locally, repeat and drop events, like a flaky channel would."""
    out = []
    for e in events:
        if rnd.random() < drop:
            continue
        out.append(e)
        if rnd.random() < dup:
            out.append(dict(e))
    for i in range(len(out)):
        if rnd.random() < shuffle:
            j = min(len(out) - 1, i + rnd.randint(1, 8))
            out[i], out[j] = out[j], out[i]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(sorted(BASES)),
    seed=st.integers(0, 2**32 - 1),
    shuffle=st.floats(0, 0.5),
    dup=st.floats(0, 0.3),
    drop=st.floats(0, 0.5),
    snap_every=st.integers(1, 7),
)
def test_fraction_is_monotone_bounded_and_one_only_at_done(base, seed, shuffle, dup, drop, snap_every):
    rnd = random.Random(seed)
    events = damaged(BASES[base], rnd, shuffle, dup, drop)
    tracker = Tracker(MODEL)
    last = 0.0
    done_seen = False
    now = events[0]["t"] if events else 0.0
    for i, event in enumerate(events):
        tracker.feed(event)
        done_seen = done_seen or event["type"] == "done"
        now = max(now, event["t"])  # the wall clock moves forward even when events come late
        if i % snap_every and i != len(events) - 1:
            continue
        snap = tracker.snapshot(now + rnd.random() * 3)
        assert 0.0 <= snap.fraction <= 1.0
        assert snap.fraction >= last
        assert (snap.fraction == 1.0) == done_seen
        if not done_seen:
            assert snap.remaining_s is None or snap.remaining_s >= 1.0  # never "0 s" while work remains
        last = snap.fraction


@settings(max_examples=30, deadline=None)
@given(
    phases=st.lists(st.sampled_from(["prepare", "upload", "queue", "upscale", "encode", "download", "finalize", "thumbnail"]), min_size=1, max_size=4),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["plan", "phase_start", "progress", "heartbeat", "phase_end", "done", "error", "cancelled"]),
            st.integers(0, 3),  # phase index
            st.sampled_from([None, "seg-0001", "seg-0002"]),
            st.integers(-5, 500),  # done
            st.one_of(st.none(), st.integers(0, 400)),  # total
            st.integers(1, 3),  # attempt
            st.floats(-5, 30),  # time step
        ),
        max_size=40,
    ),
)
def test_arbitrary_event_soup_never_breaks_the_fraction(phases, steps):
    tracker = Tracker(MODEL)
    t = 1_000.0
    last = 0.0
    done_seen = False
    for seq, (typ, pi, part, done, total, attempt, dt) in enumerate(steps):
        t += dt
        event = {"v": 1, "job": "cx-soup", "seq": seq, "t": t, "type": typ}
        name = phases[pi % len(phases)]
        if typ == "plan":
            event.update(phases=[{"phase": p, "unit": "frames", "total": total} for p in phases], features={"frames": total or 10})
        elif typ not in ("done", "error", "cancelled"):
            event.update(phase=name, unit="frames", done=done, total=total, attempt=attempt)
            if part:
                event["part"] = part
        elif typ == "error":
            event.update(message="boom", resumable=True)
        tracker.feed(event)
        done_seen = done_seen or typ == "done"
        snap = tracker.snapshot(t + 1.0)
        assert 0.0 <= snap.fraction <= 1.0 and snap.fraction >= last
        assert (snap.fraction == 1.0) == done_seen
        last = snap.fraction


def test_floor_carries_the_fraction_over_a_resume():
    tracker = Tracker(MODEL, floor=0.42)
    assert tracker.snapshot(0.0).fraction == 0.42
    for event in BASES["cloud"][:3]:
        tracker.feed(event)
    assert tracker.snapshot(BASES["cloud"][2]["t"]).fraction >= 0.42


def test_error_then_resume_then_done():
    events = BASES["local"]
    cut = len(events) // 2
    tracker = Tracker(MODEL)
    for event in events[:cut]:
        tracker.feed(event)
    t = events[cut - 1]["t"]
    tracker.feed({"v": 1, "job": events[0]["job"], "seq": 10_000, "t": t + 1, "type": "error", "message": "killed", "resumable": True})
    snap = tracker.snapshot(t + 5)
    assert snap.state == "error" and snap.remaining_s is None and snap.eta_text == "Failed" and snap.message == "killed"
    frozen = snap.fraction
    # the resumed client continues the sequence
    for i, event in enumerate(events[cut:]):
        tracker.feed(dict(event, seq=10_001 + i, t=event["t"] + 60))
        if event["type"] != "done":
            assert tracker.snapshot(event["t"] + 60).state == "running"
    snap = tracker.snapshot(events[-1]["t"] + 61)
    assert snap.state == "done" and snap.fraction == 1.0 and frozen < 1.0


def test_rows_sum_parts_in_their_unit_and_restart_lowers_a_part_not_its_row():
    tracker = Tracker(MODEL)
    sums = []
    for event in BASES["restart"]:
        tracker.feed(event)
        sums.append(sum(p.done for p in tracker.state.phases["upscale"].parts.values()))
        if event["type"] == "progress" and event["phase"] == "upscale" and event.get("attempt") == 2:
            break
    snap = tracker.snapshot(event["t"])
    rows = {r.phase: r for r in snap.phases}
    assert [r.phase for r in snap.phases] == ["prepare", "upload", "queue", "load_model", "upscale", "encode", "download", "finalize"]
    assert rows["upload"].state == "done" and rows["upload"].done == rows["upload"].total == 4_000_000
    assert rows["upscale"].unit == "frames" and rows["upscale"].total == 360 and rows["upscale"].state == "running"
    seg2 = tracker.state.phases["upscale"].parts["seg-0002"]
    assert seg2.attempt == 2 and seg2.lost_done > 0 and seg2.done <= 120
    assert sums[-1] < max(sums), "the restart took its part back"
    assert rows["upscale"].done == max(sums), "the row shows the most it has been, never less"
    assert rows["finalize"].state == "pending"


def test_repeated_and_stale_events_change_nothing():
    events = BASES["local"][:40]
    a, b = JobState(), JobState()
    for event in events:
        a.feed(event)
    for event in events + events[::-1]:
        b.feed(event)
    for name in a.phases:
        assert a.phases[name].done == b.phases[name].done
    assert a.events == b.events == len(events)


def _running_upscale(spf: float = 0.1):
    """A local job 10 s into its only segment, progressing at 1/spf frames/s."""
    st_ = JobState()
    t0 = 1000.0
    st_.feed({"v": 1, "job": "j", "seq": 0, "t": t0, "type": "plan",
              "phases": [{"phase": "upscale", "unit": "frames", "total": 1000}, {"phase": "finalize", "unit": None, "total": None}],
              "features": {"backend": "local", "gpu": "rtx4090", "model": "realesr-animevideov3", "scale": 4,
                           "in_width": 640, "in_height": 360, "frames": 1000, "segments": 1, "segment_frames": 1000}})
    st_.feed({"v": 1, "job": "j", "seq": 1, "t": t0, "type": "phase_start", "phase": "upscale", "part": "seg-0001", "total": 1000, "attempt": 1, "worker": "local"})
    seq = 2
    for k in range(1, 31):
        st_.feed({"v": 1, "job": "j", "seq": seq, "t": t0 + k, "type": "progress", "phase": "upscale", "part": "seg-0001", "done": round(k / spf), "total": 1000, "attempt": 1})
        seq += 1
    return st_, t0 + 30


def test_unknown_gpu_is_scaled_by_the_observed_rate():
    st_, now = _running_upscale(spf=0.1)
    st_.features["gpu"] = "some-future-gpu"
    est = Estimator(MODEL).estimate(st_, now)
    # 700 frames left at 10 frames/s: about 70 s (+ finalize), whatever the prior said
    assert 60 < est.remaining_s < 85


def test_countdown_between_events_and_growth_during_a_stall():
    st_, now = _running_upscale(spf=0.1)
    est = Estimator(MODEL)
    r0 = est.estimate(st_, now).remaining_s
    r1 = est.estimate(st_, now + 1.0).remaining_s
    assert math.isclose(r0 - r1, 1.0, abs_tol=0.05)  # steady countdown between events
    stalled = [est.estimate(st_, now + s).remaining_s for s in (5, 10, 20, 40)]
    assert all(b > a for a, b in zip(stalled, stalled[1:]))  # a stall makes the ETA grow
    assert stalled[-1] > r0


def test_waiting_phase_conditions_on_time_waited():
    st_ = JobState()
    st_.feed({"v": 1, "job": "j", "seq": 0, "t": 0.0, "type": "plan",
              "phases": [{"phase": "queue", "unit": None, "total": None}, {"phase": "upscale", "unit": "frames", "total": 100}],
              "features": {"backend": "modal", "gpu": "L4", "model": "realesr-animevideov3", "scale": 2,
                           "in_width": 640, "in_height": 360, "frames": 100, "segments": 1, "parallel": 1}})
    st_.feed({"v": 1, "job": "j", "seq": 1, "t": 0.0, "type": "phase_start", "phase": "queue", "part": "ctr-01"})
    est = Estimator(MODEL)
    early = est.estimate(st_, 1.0).phases["queue"]
    cold = est.estimate(st_, 10.0).phases["queue"]  # past any warm start: a cold one
    assert cold > early
    assert est.estimate(st_, 200.0).remaining_s > 1.0


def test_estimate_plan_breaks_the_total_into_phases():
    plan = BASES["cloud"][0]
    est = estimate_plan(plan, MODEL)
    assert set(est["phases"]) == {"prepare", "upload", "queue", "load_model", "upscale", "encode", "download", "finalize"}
    assert math.isclose(sum(est["phases"].values()), est["total_s"], rel_tol=0.02, abs_tol=1.5)
    assert est["total_s"] > 0 and est["phases"]["upscale"] > 0


def test_a_part_resumed_inside_keeps_its_row_and_counts_only_the_redone_frames_as_lost():
    """Killed 61 frames into a 96-frame segment, resumed from its last whole fragment (48)."""
    tracker = Tracker(MODEL)
    part = {"phase": "upscale", "part": "seg-0001", "unit": "frames", "total": 96}
    feed = [{"phase": "prepare"},
            {**part, "attempt": 1, "done": 0}, {**part, "type": "progress", "attempt": 1, "done": 61},
            {"phase": "prepare"},  # the resume: its run starts with the first phase again
            {**part, "attempt": 2, "done": 48}, {**part, "type": "progress", "attempt": 2, "done": 55}]
    shown = []
    for seq, fields in enumerate(feed):
        tracker.feed({"v": 1, "job": "j", "seq": seq, "t": 100.0 + seq, "type": "phase_start", **fields})
        shown.append({r.phase: r.done for r in tracker.snapshot(100.0 + seq).phases}.get("upscale"))
    assert shown == [None, 0, 61, 61, 61, 61], "the row never goes back"
    upscale = tracker.state.phases["upscale"]
    seg = upscale.parts["seg-0001"]
    assert seg.done == 55 and seg.lost_done == 61 - 48
    row = next(r for r in tracker.snapshot(106.0).phases if r.phase == "upscale")
    assert "redoing 13 frames" in (row.detail or ""), row.detail
    assert row.rate == pytest.approx((55 - 48) / (106.0 - 104.0)), "kept frames are not this run's work"


def test_a_live_tracker_reuses_its_estimate_for_a_second_counting_it_down():
    """A live view asks four times a second; an estimate walks every segment: within `reuse_s` of the
    last one the tracker counts it down instead (a replay, reuse_s 0, estimates at every event)."""
    calls = []

    class Counting(Estimator):
        def estimate(self, st, now):
            calls.append(now)
            return Estimate(100.0 - now, remaining_lo_s=80.0 - now, remaining_hi_s=130.0 - now)

    started = [{"type": "plan", "t": 0.0, "seq": 0, "job": "cx-reuse", "features": {},
                "phases": [{"phase": "upscale", "unit": "frames", "total": 100}]},
               {"type": "phase_start", "phase": "upscale", "unit": "frames", "total": 100, "t": 1.0, "seq": 1}]
    live = Tracker(reuse_s=1.0)
    live.estimator = Counting(live.model)
    for e in started:
        live.feed(e)
    t = 10.0
    first = live.snapshot(t)
    later = live.snapshot(t + 0.75)
    assert calls == [t]  # the second came from the first, counted down
    assert later.remaining_s == pytest.approx(first.remaining_s - 0.75)
    assert later.remaining_hi_s == pytest.approx(first.remaining_hi_s - 0.75)
    live.snapshot(t + 1.0)
    assert calls == [t, t + 1.0]  # a second on: estimated again
    exact = Tracker()
    exact.estimator = Counting(exact.model)
    for e in started:
        exact.feed(e)
    exact.snapshot(t)
    exact.snapshot(t + 0.75)
    assert len(calls) == 4


def test_a_kept_estimate_is_not_reused_past_the_plan_or_a_phase_change():
    """Live, the runner asks for the fraction before the display has fed the plan: an estimate of
    nothing (None), which, reused, showed the phases' mean work (50 %) and held it for minutes."""
    live = Tracker(reuse_s=1.0)
    assert live.snapshot(0.0).remaining_s is None  # asked before the plan arrived
    live.feed({"type": "plan", "t": 0.0, "seq": 0, "job": "cx-reuse",
               "features": {"gpu": "cpu", "frames": 100, "in_width": 64, "in_height": 36, "scale": 2},
               "phases": [{"phase": "prepare", "unit": "bytes", "total": 10},
                          {"phase": "upscale", "unit": "frames", "total": 100}]})
    live.feed({"type": "phase_start", "phase": "prepare", "unit": "bytes", "total": 10, "t": 0.1, "seq": 1})
    live.feed({"type": "phase_end", "phase": "prepare", "t": 0.2, "seq": 2})
    live.feed({"type": "phase_start", "phase": "upscale", "unit": "frames", "total": 100, "t": 0.3, "seq": 3})
    snap = live.snapshot(0.5)
    assert snap.remaining_s is not None and snap.fraction < 0.2
