"""The ETA on the user's own machine: speed probe, resume, the model's home, ranges.

The probe runs the real converted model on a tiny frame; its timing comes
from a fake clock, so the test neither sleeps nor depends on this machine's
speed. Resume and ranges are checked on event streams, the ranges'
calibration on the shared synthetic traces.
"""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest

from clipexport.backends.local import LocalBackend
from clipexport.backends.probe import probe_speed
from clipexport.events import read_events
from clipexport.progress import JobState, TimingModel, Tracker, load_model, user_model_path
from clipexport.progress.fit import fit_jobs
from clipexport.progress.estimator import Estimator
from clipexport.progress.replay import replay_events
from clipexport.upscale import load_upscaler

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
if not TRACES.is_dir():
    TRACES = Path("/work/shared/traces")
MODEL = TimingModel.default()
W, H = 32, 18


@pytest.fixture(scope="module")
def upscaler():
    return load_upscaler("realesr-animevideov3", scale=2, device="cpu", precision="fp32")


def _clock(*times: float):
    it = iter(times)
    return lambda: next(it)


def _plan(frames: int = 240, width: int = W, height: int = H, t: float = 0.0) -> dict:
    return {"type": "plan", "seq": 0, "t": t, "job": "cx-test",
            "phases": [{"phase": "prepare", "unit": "bytes", "total": 1000},
                       {"phase": "load_model", "unit": None, "total": None},
                       {"phase": "upscale", "unit": "frames", "total": frames},
                       {"phase": "encode", "unit": "frames", "total": frames},
                       {"phase": "finalize", "unit": None, "total": None}],
            "features": {"backend": "local", "gpu": "cpu", "model": "realesr-animevideov3", "scale": 2,
                         "in_width": width, "in_height": height, "frames": frames, "segments": 1,
                         "segment_frames": frames, "out_width": 2 * width, "out_height": 2 * height}}


def test_the_probe_times_the_real_model_and_becomes_the_prior(upscaler):
    # three timed runs of 0.20, 0.10 and 0.30 s: the fastest counts, the median rides along
    probe = probe_speed(upscaler, W, H, device="cpu", clock=_clock(0.0, 0.2, 1.0, 1.1, 2.0, 2.3))
    assert probe["s_per_px"] == pytest.approx(0.1 / (W * H))
    assert probe["s_per_px_median"] == pytest.approx(0.2 / (W * H))
    assert (probe["device"], probe["model"], probe["scale"], probe["precision"]) == (
        "cpu", "realesr-animevideov3", 2, "fp32")

    st = JobState()
    for i, e in enumerate([_plan(), {"type": "phase_start", "phase": "load_model", "t": 1.0},
                           {"type": "phase_end", "phase": "load_model", "t": 2.0, "probe": probe}], start=1):
        st.feed({"seq": i, **e})
    before = Estimator(MODEL).estimate(JobState(), 0.0)  # nothing known
    est = Estimator(MODEL, skew=0.0, scenarios=False).estimate(st, 2.0)
    assert before.remaining_s is None
    # 240 frames at the probe's 0.1 s a frame, whatever the built-in model says of this CPU
    assert est.phases["upscale"] == pytest.approx(24.0, rel=0.1)
    without = Estimator(MODEL, skew=0.0, scenarios=False).estimate(_state(_plan()), 2.0)
    assert abs(without.phases["upscale"] - 24.0) > 5.0  # the prior it replaced was elsewhere


def test_the_probe_takes_fewer_runs_on_a_slow_device(upscaler):
    probe = probe_speed(upscaler, W, H, device="cpu", clock=_clock(0.0, 1.5))  # one run past the budget
    assert probe["s_per_px"] == pytest.approx(1.5 / (W * H))


def test_the_local_backend_reports_its_probe_when_the_model_is_loaded(tmp_path):
    events: list[dict] = []
    backend = LocalBackend(lambda on_bytes: load_upscaler("realesr-animevideov3", scale=2, device="cpu"), tmp_path)
    backend._load(events.append, (W, H))
    end = events[-1]
    assert end["type"] == "phase_end" and end["phase"] == "load_model"
    assert end["probe"]["s_per_px"] > 0 and end["probe"]["device"] == "cpu"
    assert (end["probe"]["width"], end["probe"]["height"]) == (W, H)


def test_a_fit_keeps_the_probe_per_device_so_the_next_estimate_knows_this_machine():
    st = _state(_plan(), {"type": "phase_start", "phase": "load_model", "t": 1.0},
                {"type": "phase_end", "phase": "load_model", "t": 2.0,
                 "probe": {"s_per_px": 2e-4, "device": "cpu", "model": "realesr-animevideov3", "scale": 2,
                           "precision": "float32"}},
                {"type": "done", "t": 30.0, "output": "x.mp4"})
    model = fit_jobs([st])
    assert model.data["probes"] == {"cpu|realesr-animevideov3@x2|float32": 2e-4}
    up_front = Estimator(model, skew=0.0, scenarios=False).estimate(_state(_plan()), 0.0)
    assert up_front.phases["upscale"] == pytest.approx(240 * 2e-4 * W * H, rel=0.1)


def test_a_job_served_from_cache_is_left_out_of_fits():
    def job(skipped: bool) -> JobState:
        return _state(_plan(frames=24),
                      {"type": "progress", "phase": "upscale", "part": "seg-0001", "unit": "frames", "done": 24,
                       "total": 24, "t": 1.0, **({"skipped": True} if skipped else {})},
                      {"type": "done", "t": 2.0, "output": "x.mp4"})

    assert fit_jobs([job(True)]).data["jobs"] == 0
    assert fit_jobs([job(False)]).data["jobs"] == 1


def _state(*events: dict) -> JobState:
    st = JobState()
    for i, e in enumerate(events):
        st.feed({"seq": i, **e})
    return st


def _segment_run(t: float, seq: int, frames: range, spf: float, attempt: int = 1) -> list[dict]:
    """Progress of seg-0001 at `spf` seconds a frame from `t`."""
    out = [{"type": "phase_start", "phase": "upscale", "part": "seg-0001", "unit": "frames", "total": 240,
            "attempt": attempt, "t": t, "seq": seq}]
    for i, done in enumerate(frames, start=1):
        out.append({"type": "progress", "phase": "upscale", "part": "seg-0001", "unit": "frames", "done": done,
                    "total": 240, "attempt": attempt, "t": t + done * spf, "seq": seq + i})
    return out


def test_resume_rates_elapsed_and_eta_exclude_the_dead_time():
    # 100 frames at 0.5 s a frame, killed; resumed a day later at the same speed
    first = [_plan(), {"type": "phase_start", "phase": "prepare", "t": 0.1, "seq": 1},
             {"type": "phase_end", "phase": "prepare", "t": 0.2, "seq": 2},
             {"type": "phase_start", "phase": "upscale", "unit": "frames", "total": 240, "t": 0.3, "seq": 3},
             *_segment_run(1.0, 4, range(10, 101, 10), 0.5)]
    day = 86_400.0
    resumed = [{"type": "phase_start", "phase": "prepare", "t": day, "seq": 100},
               {"type": "phase_end", "phase": "prepare", "t": day + 0.1, "seq": 101},
               {"type": "phase_start", "phase": "upscale", "unit": "frames", "total": 240, "t": day + 0.2, "seq": 102},
               *_segment_run(day + 1.0, 103, range(10, 41, 10), 0.5, attempt=2)]
    tracker = Tracker(MODEL)
    for e in first + resumed:
        tracker.feed(e)
    now = resumed[-1]["t"]
    snap = tracker.snapshot(now)
    row = next(r for r in snap.phases if r.phase == "upscale")
    assert snap.elapsed == pytest.approx(51.0 + (now - day), abs=0.5)  # 51 s before the kill, ~21 s since
    assert row.rate == pytest.approx(40 / (now - day - 0.2), rel=0.05)  # frames since the resume, not a day
    assert "redoing 100 frames" in (row.detail or "")
    # 200 frames left at 0.5 s: about 100 s, not a day's worth of "slowness"
    assert snap.remaining_s == pytest.approx(100.0, rel=0.2)
    assert snap.fraction > 0.3


class _Segments:
    """Events of 24-frame segments rendered one after another on the local worker, 0.1 s a frame."""

    def __init__(self) -> None:
        self.seq = 1000
        self.events: list[dict] = []

    def add(self, kind: str, t: float, **fields) -> None:
        self.seq += 1
        self.events.append({"type": kind, "t": t, "seq": self.seq, **fields})

    def run(self, name: str, t: float, upto: int = 24, end: bool = True) -> float:
        common = {"phase": "upscale", "part": name, "unit": "frames", "total": 24, "attempt": 1}
        self.add("phase_start", t, **common, done=0)
        for done in range(3, upto + 1, 3):
            self.add("progress", t + 0.1 * done, **common, done=done)
        if end:
            self.add("phase_end", t + 0.1 * upto, **common, done=upto)
        return t + 0.1 * upto

    def served(self, name: str, t: float) -> None:
        self.add("progress", t, phase="upscale", part=name, unit="frames", done=24, total=24, attempt=1,
                 skipped=True)


def test_a_resume_that_finds_a_killed_segment_whole_runs_the_rest_on_one_worker():
    """Killed just after seg-0004's last frame (before its phase_end): the resume serves seg-0001..4
    from the store (`skipped`) and renders seg-0005..10. seg-0004 is done, not running on a
    second worker (that halved the estimate), not redone, and its frames still count as rate."""
    plan = _plan(frames=240)
    plan["features"].update(segments=10, segment_frames=24)
    job = _Segments()
    job.add("phase_start", 0.1, phase="upscale", unit="frames", total=240)
    t = 0.2
    for name in ("seg-0001", "seg-0002", "seg-0003"):
        t = job.run(name, t)
    t = job.run("seg-0004", t, end=False)
    resumed_at = t + 3600.0
    job.add("phase_start", resumed_at, phase="upscale", unit="frames", total=240)
    for name in ("seg-0001", "seg-0002", "seg-0003", "seg-0004"):
        job.served(name, resumed_at + 0.01)
    job.run("seg-0005", resumed_at + 0.1, upto=12, end=False)
    tracker = Tracker(MODEL)
    for e in [plan, *job.events]:
        tracker.feed(e)
    now = job.events[-1]["t"]
    snap = tracker.snapshot(now)
    left = (6 * 24 - 12) * 0.1  # 132 frames at 0.1 s
    assert snap.remaining_s == pytest.approx(left, rel=0.2)
    row = next(r for r in snap.phases if r.phase == "upscale")
    assert "redoing" not in (row.detail or "")
    assert row.skipped == 4


def test_the_model_lives_under_the_data_dir_and_follows_clipexport_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEXPORT_HOME", str(tmp_path / "home-a"))
    assert user_model_path() == tmp_path / "home-a" / "data" / "timing-model.json"
    fitted = TimingModel({**TimingModel.generic().data, "jobs": 7})
    fitted.save(user_model_path())
    assert load_model() == fitted
    assert [p.name for p in user_model_path().parent.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setenv("CLIPEXPORT_HOME", str(tmp_path / "home-b"))
    assert load_model() == TimingModel.default()  # another home: another model


def test_up_front_ranges_are_calibrated_on_the_synthetic_traces():
    """The 80 % range at the plan covers the true length in 75-90 % of jobs; halfway, ranges are narrower."""
    paths = sorted((TRACES / "dev").glob("*.jsonl")) + sorted((TRACES / "train").glob("*.jsonl"))
    assert paths, f"no traces under {TRACES}"
    estimator = Estimator(MODEL)  # what the tracker uses
    covered, widths_first, widths_half = 0, [], []
    for path in paths:
        events = list(read_events(path))
        t0, t_end = events[0]["t"], next(e["t"] for e in events if e["type"] == "done")
        st = JobState()
        st.feed(events[0])
        first = estimator.estimate(st, t0)
        covered += first.remaining_lo_s <= t_end - t0 <= first.remaining_hi_s
        widths_first.append(math.log(first.remaining_hi_s / first.remaining_lo_s))
        for e in events[1:]:
            st.feed(e)
            if e["t"] - t0 >= 0.5 * (t_end - t0):
                half = estimator.estimate(st, e["t"])
                widths_half.append(math.log(half.remaining_hi_s / half.remaining_lo_s))
                break
    share = covered / len(paths)
    assert 0.75 <= share <= 0.90, share
    assert sorted(widths_half)[len(widths_half) // 2] < sorted(widths_first)[len(widths_first) // 2]


def test_replay_json_carries_the_range_and_the_text_says_it_up_front():
    events = [_plan(frames=2400, width=640, height=360)]
    line = list(replay_events(events, MODEL))[0]
    assert line["remaining_lo_s"] < line["remaining_s"] < line["remaining_hi_s"]
    tracker = Tracker(MODEL)
    tracker.feed(events[0])
    snap = tracker.snapshot(0.0)
    assert (snap.remaining_lo_s, snap.remaining_hi_s) == (line["remaining_lo_s"], line["remaining_hi_s"]) or \
        snap.remaining_lo_s == pytest.approx(line["remaining_lo_s"], abs=1e-3)
    assert " to " in snap.eta_text, snap.eta_text
    json.dumps(line)


@pytest.mark.parametrize("name, changes", [
    ("a GPU the model has never seen", {"gpu": "B300", "spf": 0.015}),
    ("a preempted segment restarted (attempt 2)", {"restart": {1: 0.5}}),
    ("cold starts 5x the usual", {"warm": (False, False), "cold_s": 150.0}),
    ("an uplink 10x slower", {"upload_rate": 2e5}),
])
def test_the_eta_recovers_from_what_the_model_never_saw(name, changes):
    """Once the job has shown itself (its second half), the remaining time is within 20 % at the median."""
    from tests.test_progress_synth import JobSpec, job_events

    events = job_events(JobSpec(frames=960, segment_frames=240, parallel=2, **changes))
    t0, t_end = events[0]["t"], events[-1]["t"]
    errors = [abs(r["remaining_s"] - (t_end - r["t"])) / (t_end - r["t"]) for r in replay_events(events, MODEL)
              if t_end - r["t"] >= 10 and r["t"] - t0 >= 0.5 * (t_end - t0)]
    assert errors and sorted(errors)[len(errors) // 2] <= 0.2, name


def _local_job(slow: tuple[float, float] | None) -> list[dict]:
    """A local CPU job of 144 frames at 0.5 s a frame, in six segments; `slow`: (s after start, factor).

    Its model load carries a speed probe that measured the quiet machine, as a real local job's does.
    """
    from tests.test_progress_synth import JobSpec, job_events

    events = job_events(JobSpec(backend="local", gpu="cpu", width=160, height=96, scale=2, frames=144,
                                segment_frames=24, spf=0.5, tick=0.5, slow=slow))
    loaded = next(e for e in events if e["type"] == "phase_end" and e["phase"] == "load_model")
    loaded["probe"] = {"s_per_px": 0.5 / (160 * 96), "device": "cpu", "model": "realesr-animevideov3", "scale": 2}
    return events


def test_the_eta_follows_a_machine_that_slows_down_halfway():
    """Another process takes half the CPU 40 s in: within 8 s the remaining time is within 20 % again."""
    events = _local_job(slow=(40.0, 2.0))
    t0, t_end = events[0]["t"], events[-1]["t"]
    lines = [r for r in replay_events(events, MODEL) if t_end - r["t"] >= 10]
    after = [abs(r["remaining_s"] - (t_end - r["t"])) / (t_end - r["t"]) for r in lines if r["t"] >= t0 + 48]
    assert len(after) > 20 and max(after) <= 0.2, max(after)


def test_a_steady_machine_shows_no_rate_change():
    """The same job on a quiet machine: past the first 10 %, the ETA never jumps up by more than 20 %."""
    events = _local_job(slow=None)
    t0, t_end = events[0]["t"], events[-1]["t"]
    shown = [r["remaining_s"] for r in replay_events(events, MODEL) if r["t"] - t0 >= 0.1 * (t_end - t0)]
    jumps = [(a, b) for a, b in zip(shown, shown[1:]) if b > 1.2 * a]
    assert not jumps


def test_recent_work_weighs_more_when_the_machine_drifts():
    """A slowdown of 20 %, too small to count as a change of speed: the rate leans to the recent frames."""
    events = _local_job(slow=(40.0, 1.2))
    t0, t_end = events[0]["t"], events[-1]["t"]
    errors = sorted(abs(r["remaining_s"] - (t_end - r["t"])) / (t_end - r["t"]) for r in replay_events(events, MODEL)
                    if r["t"] >= t0 + 60 and t_end - r["t"] >= 10)
    # the whole job's average rate: median 8 %, worst 11 % short
    assert errors and errors[len(errors) // 2] <= 0.065 and errors[-1] <= 0.095, errors


def test_segments_that_follow_each_other_at_once_cost_only_their_frames():
    """A local job of twenty short segments, each started as the one before ends: no per-segment round trip."""
    from tests.test_progress_synth import JobSpec, job_events

    events = job_events(JobSpec(backend="local", gpu="cpu", width=160, height=96, scale=2, frames=480,
                                segment_frames=24, spf=0.08, tick=0.25))
    loaded = next(e for e in events if e["type"] == "phase_end" and e["phase"] == "load_model")
    loaded["probe"] = {"s_per_px": 0.08 / (160 * 96), "device": "cpu", "model": "realesr-animevideov3", "scale": 2}
    t0, t_end = events[0]["t"], events[-1]["t"]
    errors = sorted(abs(r["remaining_s"] - (t_end - r["t"])) / (t_end - r["t"]) for r in replay_events(events, MODEL)
                    if r["t"] >= t0 + 0.3 * (t_end - t0) and t_end - r["t"] >= 10)
    # with the model's 0.4 s a segment (a container's round trip): 11 % too long at the median
    assert errors and errors[len(errors) // 2] <= 0.05, errors[len(errors) // 2]


def test_an_upload_served_from_the_store_is_no_evidence_of_the_uplink():
    """48 MB 'uploaded' in 10 ms because the object was already stored: no 4.8 GB/s uplink (the download's prior)."""
    from clipexport.progress.moment import Moment
    from clipexport.progress.rates import stream_rate

    common = {"phase": "upload", "part": "clip-01", "unit": "bytes", "total": 48e6, "skipped": True}
    st = _state(_plan(), {"type": "phase_start", "t": 1.0, **common},
                {"type": "progress", "t": 1.005, "done": 48e6, **common},
                {"type": "phase_end", "t": 1.01, "done": 48e6, **common})
    estimator = Estimator(MODEL)
    assert stream_rate(Moment(estimator.settings, MODEL, st, 2.0), st.phases["upload"]) is None
    assert st.phases["upload"].parts["clip-01"].served


def _proc_stat(busy: int, idle: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 7 0\ncpu0 ...\n"


def test_busy_elsewhere_counts_the_cores_other_processes_keep_busy_while_this_one_sleeps():
    from clipexport.upscale.cpu import busy_elsewhere

    ticks = os.sysconf("SC_CLK_TCK")
    reads = iter([_proc_stat(1000, 5000), _proc_stat(1000 + ticks // 10, 5000 + ticks // 10)])
    slept: list[float] = []
    # over 0.1 s: a tenth of a second of busy ticks is one core, the other idle
    assert busy_elsewhere(0.1, read=lambda: next(reads), sleep=slept.append) == pytest.approx(1.0)
    assert slept == [0.1]

    def missing() -> str:
        raise FileNotFoundError("/proc/stat")

    assert busy_elsewhere(0.1, read=missing, sleep=slept.append) is None  # not Linux: nothing said


def test_a_busy_cpu_slows_the_prior_and_a_kept_probe_but_not_this_jobs_own_probe():
    plan = _plan()
    idle = dict(plan["features"], gpu="cpu", threads=2)
    busy = dict(idle, cpu_busy=1.0)  # one of two cores taken: half the speed
    assert math.exp(MODEL.spf(busy)[0] - MODEL.spf(idle)[0]) == pytest.approx(2.0)
    kept = TimingModel({**MODEL.data, "probes": {"cpu|realesr-animevideov3@x2|fp32": 1e-6}})
    idle_p, busy_p = dict(idle, precision="fp32"), dict(busy, precision="fp32")
    assert kept.spf(idle_p) != MODEL.spf(idle_p)  # the kept probe is what answers
    assert math.exp(kept.spf(busy_p)[0] - kept.spf(idle_p)[0]) == pytest.approx(2.0)
    own = {"s_per_px": 1e-6}
    assert kept.spf(busy_p, own) == kept.spf(idle_p, own)  # measured under today's load already
    # but on a busy CPU the fastest run was the lucky one: its median run counts there
    runs = {"s_per_px": 1e-6, "s_per_px_median": 1.5e-6}
    assert math.exp(kept.spf(busy_p, runs)[0] - kept.spf(idle_p, runs)[0]) == pytest.approx(1.5)
    overloaded = dict(idle, cpu_busy=2.0)  # every core taken: still about a fair share, not a stop
    assert math.exp(MODEL.spf(overloaded)[0] - MODEL.spf(idle)[0]) == pytest.approx(4.0)
