"""The Modal backend, end to end against the in-process fake (`tests/fake_modal.py`).

The fake sits below `RealModalClient`: it fakes Modal's `Cls` and answers
modal's own `FunctionCall` at its gRPC stub, so the client's translation of
Modal's answers runs too. It runs the real container body
(`clipexport.remote`) with the real worker and model in threads, on a
file:// store, and keeps Modal's semantics for spawned calls: they outlive
the client, a running call has no output yet, a preempted input restarts on
a fresh container. Clips are 64x36, 30 frames, segments of 10 frames,
upscaled x2 on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import av
import pytest

from clipexport import events
from clipexport.backends.modal import CallCancelled, CallExpired, ModalBackend, cancel_calls
from clipexport.errors import BackendError, Interrupted
from clipexport.facts import JobFacts
from clipexport.orchestrator import cancel_job
from clipexport.remote import channel_prefix, task_from_dict, task_to_dict
from clipexport.storage import content_key
from clipexport.worker import fragment_prefix
from tests.clips import read_index
from tests.fake_modal import MODEL, SCALE, FakeModal, make_job
from tests.s3server import seaweed  # noqa: F401 - a fixture

DEADLINE_S = 60


@pytest.fixture(autouse=True)
def _no_fake_left():
    """Each test's FakeModal answers modal's FunctionCall; none outlives its test."""
    yield
    FakeModal.uninstall()


class Recorder:
    """The client side of the stream: stamps events as the orchestrator would, keeps them."""

    def __init__(self, job_id: str, *, kill_after: int | None = None, kill_at=None) -> None:
        self.events: list[dict] = []
        self.emitter = events.Emitter(job_id, [self.events.append])
        self.kill_after, self.kill_at = kill_after, kill_at

    def __call__(self, partial: dict) -> None:
        if self.kill_after is not None and len(self.events) >= self.kill_after:
            raise Killed()
        if self.kill_at is not None and self.kill_at(partial):
            raise Killed()
        self.emitter.emit(partial)

    def of(self, type_: str, phase: str | None = None, part: str | None = None) -> list[dict]:
        return [e for e in self.events if e["type"] == type_ and (phase is None or e.get("phase") == phase)
                and (part is None or e.get("part") == part)]


class Killed(BaseException):
    """The client process dies here (nothing is cleaned up)."""


def backend(job, client, **kw) -> ModalBackend:
    options = dict(store=job.store, job_id=job.id, model=MODEL, scale=SCALE, parallel=2, poll_s=0.05, check_s=0.2)
    options.update(kw)
    return ModalBackend(client, job.storage, **options)


def start(b: ModalBackend, tasks, rec: Recorder, stop: threading.Event) -> tuple[threading.Thread, list]:
    """Run `b` in a thread (a client process); its exception lands in the list."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            b.run(tasks, rec, stop)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            raised.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, raised


def wait_for(predicate, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def spawns_end() -> None:
    """Spawns run on threads that record each call; a killed client's outlive it here (not in a real
    process death, where an unrecorded call is a stranger: see the test of those), so let them end."""
    wait_for(lambda: not any(t.name.startswith("modal-('spawn'") for t in threading.enumerate()))


def check_outputs(job, tmp_path: Path) -> None:
    """Every segment stored, whole: the right frames, in order, at twice the size."""
    for task in job.tasks:
        path = tmp_path / "check" / task.segment.name
        job.storage.get_file(task.key, path)
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        seg = task.segment
        assert [read_index(f) for f in frames] == list(range(seg.start, seg.start + seg.count)), seg.name
        assert frames[0].shape == (36 * SCALE, 64 * SCALE, 3)


def check_events(log: list[dict], parts: list[str]) -> None:
    """The contract holds, attempts never go back, every part ends in one attempt.

    Across client runs a part may be shown ending twice (a resumed client does
    not know what the dead one showed; repeating an event is harmless), but
    always in the same attempt: it was not redone.
    """
    for event in log:
        events.validate_event(event)
    seen_attempt: dict[tuple, int] = {}
    done: dict[tuple, float] = {}
    for e in log:
        if "part" not in e or e.get("phase") not in ("upscale", "encode"):
            continue
        key = (e["phase"], e["part"])
        assert e["attempt"] >= seen_attempt.get(key, 0), e
        if e["attempt"] > seen_attempt.get(key, 0):
            seen_attempt[key] = e["attempt"]
            done.pop(key, None)
        if "done" in e:
            assert e["done"] >= done.get(key, 0), e
            done[key] = e["done"]
    ends = defaultdict(set)
    for e in log:
        if e["type"] == "phase_end" and e.get("phase") == "encode" and "part" in e:
            ends[e["part"]].add(e["attempt"])
    assert sorted(ends) == sorted(parts), ends
    assert all(len(attempts) == 1 for attempts in ends.values()), ends


def ends_once(log: list[dict]) -> None:
    """In one client run, every part's encode ends exactly once."""
    ends = Counter(e["part"] for e in log if e["type"] == "phase_end" and e.get("phase") == "encode" and "part" in e)
    assert set(ends.values()) == {1}, ends


# -- tasks as data ----------------------------------------------------------------


def test_task_dict_round_trip(tmp_path):
    job = make_job(tmp_path, frames=12, segment_frames=12)
    task = dataclasses.replace(job.tasks[0], attempt=3, crf=20)
    data = json.loads(json.dumps(task_to_dict(task)))
    assert task_from_dict(data) == task


# -- the whole flow ---------------------------------------------------------------


def test_whole_flow(tmp_path):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake")
    client = svc.client()
    rec = Recorder(job.id)
    b = backend(job, client)
    b.run(job.tasks, rec, threading.Event())

    check_outputs(job, tmp_path)
    parts = [t.segment.name for t in job.tasks]
    check_events(rec.events, parts)
    ends_once(rec.events)
    assert svc.starts() == Counter(parts)  # each segment computed once
    # every call recorded, one per segment, at most two at a time in two lanes
    calls = job.store.facts(job.id, "call:")
    assert sorted(calls) == [f"call:{p}" for p in parts]
    assert sorted(v["id"] for v in calls.values()) == sorted(client.spawned)
    lanes = {v["lane"] for v in calls.values()}
    assert lanes == {"ctr-01", "ctr-02"}
    # the queue phase: one part per lane, each ended cold (no warm-up), whole phase closed
    assert [e["part"] for e in rec.of("phase_start", "queue") if "part" in e] == ["ctr-01", "ctr-02"]
    q_ends = [e for e in rec.of("phase_end", "queue") if "part" in e]
    assert sorted(e["part"] for e in q_ends) == ["ctr-01", "ctr-02"]
    assert {e["detail"] for e in q_ends} == {"cold start"}
    assert len([e for e in rec.of("phase_end", "queue") if "part" not in e]) == 1
    # segments carry their lane as worker; ends carry the stored key and its size
    for e in rec.of("phase_start", "upscale"):
        assert e["worker"] in lanes
        assert e["gpu"] == FakeModal.GPU and e["container"].startswith("ta-fake")
    for e in rec.of("phase_end", "encode"):
        info = job.storage.stat(e["key"])
        assert info is not None and info.size == e["bytes"]
    # the bill: each container from its start to its last segment, plus its idle tail
    bill = b.bill()
    used = {c.name for c in svc.containers} & {e["container"] for e in rec.of("phase_start", "upscale")}
    assert bill["containers"] == len(used) == 2 and bill["idle_s"] == 2 * 120
    assert bill["gpu"] == "L4" and 0 < bill["gpu_s"] - bill["idle_s"] < 60


def test_whole_flow_on_a_real_s3_server(tmp_path, seaweed, monkeypatch):  # noqa: F811
    """As on Modal: the container reopens the store from its URL, credentials from its environment."""
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    from clipexport.storage import open_storage

    storage = open_storage(f"s3://{seaweed.bucket}/modal-{tmp_path.name}", endpoint_url=seaweed.endpoint_url)
    job = make_job(tmp_path, frames=20, segment_frames=10, storage=storage)
    svc = FakeModal(tmp_path / "fake")
    rec = Recorder(job.id)
    backend(job, svc.client()).run(job.tasks, rec, threading.Event())
    assert {c.endpoint_url for c in svc.calls.values()} == {seaweed.endpoint_url}
    check_outputs(job, tmp_path)
    check_events(rec.events, [t.segment.name for t in job.tasks])
    ends_once(rec.events)


def test_segments_already_stored_are_not_spawned(tmp_path):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake")
    backend(job, svc.client()).run(job.tasks, Recorder(job.id), threading.Event())
    # a second job over the same content: every key exists, nothing runs
    again = dataclasses.replace(job, id=job.store.create(job.store.get(job.id).spec).id)
    tasks = [dataclasses.replace(t, job=again.id) for t in job.tasks]
    client = svc.client()
    rec = Recorder(again.id)
    backend(again, client).run(tasks, rec, threading.Event())
    assert client.spawned == []
    assert all(e.get("skipped") for e in rec.of("phase_end", "encode"))
    check_events(rec.events, [t.segment.name for t in tasks])


# -- the client dies, the calls go on -----------------------------------------------


@pytest.mark.parametrize("how", ["stop", "killed-at-first-event", "killed-mid-progress"])
def test_client_dies_then_resume_reattaches(tmp_path, how):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.06)
    first_client = svc.client()
    stop = threading.Event()
    if how == "killed-at-first-event":  # right after the first call is recorded
        rec1 = Recorder(job.id, kill_after=0)
    elif how == "killed-mid-progress":  # while relaying a segment's first counted frames
        rec1 = Recorder(job.id, kill_at=lambda e: e["type"] == "progress" and e.get("done", 0) > 0)
    else:
        rec1 = Recorder(job.id)
    thread, raised = start(backend(job, first_client), job.tasks, rec1, stop)
    if how == "stop":
        wait_for(lambda: any(e.get("done", 0) > 0 for e in rec1.of("progress", "upscale")))
        stop.set()
    thread.join(DEADLINE_S)
    assert not thread.is_alive()
    assert isinstance(raised[0], Interrupted if how == "stop" else Killed), raised
    spawns_end()
    # the calls outlive their client
    assert first_client.spawned
    assert any(not svc.calls[c].finished.is_set() for c in first_client.spawned)

    # a new client process resumes: the orchestrator passes attempt + 1, as it does on resume
    second_client = svc.client()
    rec2 = Recorder(job.id)
    tasks = [dataclasses.replace(t, attempt=2) for t in job.tasks]
    backend(job, second_client).run(tasks, rec2, threading.Event())

    parts = [t.segment.name for t in job.tasks]
    assert not set(second_client.spawned) & set(first_client.spawned)
    assert len(first_client.spawned) + len(second_client.spawned) == len(parts)
    assert svc.starts() == Counter(parts)  # no segment computed twice
    check_outputs(job, tmp_path)
    check_events(rec1.events + rec2.events, parts)


def test_resume_while_calls_wait_keeps_their_lanes_and_their_wait(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    gate = threading.Event()  # no container yet
    svc = FakeModal(tmp_path / "fake", gate=gate)
    thread, raised = start(backend(job, svc.client()), job.tasks, Recorder(job.id, kill_after=3), threading.Event())
    thread.join(DEADLINE_S)
    assert isinstance(raised[0], Killed)
    spawns_end()
    time.sleep(0.4)  # the client is dead; the calls wait on

    client = svc.client()
    rec = Recorder(job.id)
    threading.Timer(0.4, gate.set).start()
    backend(job, client).run(job.tasks, rec, threading.Event())
    assert client.spawned == []
    ends = {e["part"]: e["elapsed"] for e in rec.of("phase_end", "queue") if "part" in e}
    assert sorted(ends) == ["ctr-01", "ctr-02"]  # the lanes recorded, no new ones
    assert min(ends.values()) >= 0.8  # the whole wait, the dead client's part included
    workers = {e["worker"] for e in rec.of("phase_start", "upscale")}
    assert workers == {"ctr-01", "ctr-02"}
    assert svc.starts() == Counter({"seg-0001": 1, "seg-0002": 1})


def test_resume_keeps_the_lane_of_the_call_running_there(tmp_path):
    job = make_job(tmp_path, frames=30, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.05)
    # one lane: seg-0001 done in it, seg-0002 running in it when the client dies
    rec1 = Recorder(job.id, kill_at=lambda e: e["type"] == "phase_start" and e.get("part") == "seg-0002")
    thread, raised = start(backend(job, svc.client(), parallel=1), job.tasks, rec1, threading.Event())
    thread.join(DEADLINE_S)
    assert isinstance(raised[0], Killed)
    spawns_end()

    rec2 = Recorder(job.id)
    client = svc.client()
    backend(job, client, parallel=1).run(job.tasks, rec2, threading.Event())
    assert len(client.spawned) == 1  # seg-0003 only
    assert {e["worker"] for e in rec2.of("phase_start", "upscale")} == {"ctr-01"}
    assert {v["lane"] for v in job.store.facts(job.id, "call:").values()} == {"ctr-01"}
    assert svc.starts() == Counter({"seg-0001": 1, "seg-0002": 1, "seg-0003": 1})
    check_events(rec1.events + rec2.events, [t.segment.name for t in job.tasks])


def test_abandoned_calls_finish_without_any_client(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake")
    client = svc.client()
    # dies at its first heartbeat: both calls spawned, nothing followed yet
    thread, raised = start(backend(job, client), job.tasks, Recorder(job.id, kill_after=3), threading.Event())
    thread.join(DEADLINE_S)
    assert isinstance(raised[0], Killed)
    spawns_end()
    assert len(client.spawned) == 2
    svc.wait_idle(DEADLINE_S)
    assert all(job.storage.stat(t.key) for t in job.tasks)
    # resuming then only collects: no spawn, the channel and `get` say it all
    second = svc.client()
    rec = Recorder(job.id)
    backend(job, second).run(job.tasks, rec, threading.Event())
    assert second.spawned == []
    check_events(rec.events, [t.segment.name for t in job.tasks])


# -- restarts ------------------------------------------------------------------------


def test_preempted_segment_is_redone_as_attempt_2(tmp_path):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake", preempt={"seg-0002"}, preempt_after=4)
    client = svc.client()
    rec = Recorder(job.id)
    backend(job, client).run(job.tasks, rec, threading.Event())

    assert svc.events == ["preempted seg-0002"]
    assert svc.attempts("seg-0002") == [1, 2]
    assert svc.starts() == Counter({"seg-0001": 1, "seg-0002": 2, "seg-0003": 1})
    assert len(client.spawned) == 3  # Modal restarted the input itself: no new call
    shown = {e["attempt"] for e in rec.of("progress", "upscale", "seg-0002")}
    assert 2 in shown
    end = rec.of("phase_end", "encode", "seg-0002")
    assert [e["attempt"] for e in end] == [2]
    check_outputs(job, tmp_path)
    check_events(rec.events, [t.segment.name for t in job.tasks])
    ends_once(rec.events)


def test_preempted_inside_a_segment_continues_after_its_last_stored_fragment(tmp_path):
    """72 frames at 24 fps: a preemption 40 frames in keeps the first fragment (24), redoes 16."""
    job = make_job(tmp_path, frames=72, segment_frames=72)
    svc = FakeModal(tmp_path / "fake", preempt={"seg-0001"}, preempt_after=40)
    rec = Recorder(job.id)
    backend(job, svc.client()).run(job.tasks, rec, threading.Event())

    assert svc.events == ["preempted seg-0001"]
    assert svc.attempts("seg-0001") == [1, 2]
    assert svc.upscaled["seg-0001"] == 72 + 40 - 24, "the fresh container continues after the stored fragment"
    resumed = [e["done"] for e in rec.events if e.get("part") == "seg-0001" and e.get("attempt") == 2
               and e["type"] == "progress" and e["phase"] == "upscale"]
    assert resumed[0] >= 24, "attempt 2 is shown from the frames it kept, not from 0"
    starts = [(e["attempt"], e.get("done")) for e in rec.events if e.get("part") == "seg-0001"
              and e["type"] == "phase_start" and e["phase"] == "upscale"]
    first = {attempt: done for attempt, done in reversed(starts)}  # a client may first look at any moment
    assert all(isinstance(done, int) for _, done in starts), starts
    assert 24 <= first[2] <= resumed[0], "attempt 2 starts from the frames it kept (or later), as local says"
    check_outputs(job, tmp_path)
    check_events(rec.events, ["seg-0001"])
    assert job.storage.list(job.tasks[0].key.removesuffix(".mp4") + ".partial/") == [], "its fragments are dropped"


def test_failed_call_is_spawned_again(tmp_path):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake", crash={"seg-0001"})
    client = svc.client()
    rec = Recorder(job.id)
    backend(job, client).run(job.tasks, rec, threading.Event())

    assert svc.events == ["crashed seg-0001"]
    assert svc.attempts("seg-0001") == [1, 2]
    assert len(client.spawned) == 4
    assert job.store.fact(job.id, "call:seg-0001")["attempt"] == 2
    check_outputs(job, tmp_path)
    check_events(rec.events, [t.segment.name for t in job.tasks])


def test_resumable_remote_error_is_run_again(tmp_path):
    from clipexport.errors import StorageError

    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", fail={"seg-0002": StorageError("the store timed out")})
    client = svc.client()
    rec = Recorder(job.id)
    backend(job, client).run(job.tasks, rec, threading.Event())
    assert svc.events == ["failed seg-0002"]
    assert svc.attempts("seg-0002") == [1, 2]
    assert len(client.spawned) == 3
    check_outputs(job, tmp_path)
    check_events(rec.events, ["seg-0001", "seg-0002"])


def test_failed_job_resumes_an_expired_call_as_the_next_attempt(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", crash={"seg-0001"})
    rec1 = Recorder(job.id)
    with pytest.raises(BackendError) as failed:
        backend(job, svc.client(), max_respawns=0).run(job.tasks, rec1, threading.Event())
    assert failed.value.resumable
    assert "seg-0001" in str(failed.value) and "injected crash" in str(failed.value)
    svc.wait_idle(DEADLINE_S)
    crashed = job.store.fact(job.id, "call:seg-0001")["id"]
    svc.expire(crashed)  # a week later: Modal no longer has its output
    with pytest.raises(CallExpired):
        svc.client().get(crashed, timeout=0)

    rec2 = Recorder(job.id)
    client = svc.client()
    backend(job, client).run(job.tasks, rec2, threading.Event())
    assert len(client.spawned) == 1
    assert job.store.fact(job.id, "call:seg-0001")["attempt"] == 2
    assert svc.starts() == Counter({"seg-0001": 2, "seg-0002": 1})
    check_outputs(job, tmp_path)
    check_events(rec1.events + rec2.events, ["seg-0001", "seg-0002"])


def test_expired_call_whose_segment_is_stored_is_done(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake")
    backend(job, svc.client()).run(job.tasks, Recorder(job.id), threading.Event())
    for call_id in list(svc.calls):
        svc.expire(call_id)
    client = svc.client()
    rec = Recorder(job.id)
    backend(job, client).run(job.tasks, rec, threading.Event())
    assert client.spawned == []
    assert svc.starts() == Counter({"seg-0001": 1, "seg-0002": 1})


# -- errors ------------------------------------------------------------------------


def test_remote_error_is_reported_with_resumability(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    from clipexport.storage import hash_file

    key = content_key(hash_file(garbage), ".mp4")
    job.storage.put_file(key, garbage)
    tasks = [dataclasses.replace(t, input_key=key) for t in job.tasks]
    svc = FakeModal(tmp_path / "fake")
    with pytest.raises(BackendError) as failed:
        backend(job, svc.client(), parallel=1).run(tasks, Recorder(job.id), threading.Event())
    assert not failed.value.resumable
    assert str(failed.value).startswith("seg-0001: ")
    assert "\n" not in str(failed.value)
    # the channel says so too, and nothing was stored
    snapshot = json.loads(job.storage.get_bytes(channel_prefix(job.id) + "seg-0001.json"))["snapshot"]
    assert snapshot["state"] == "failed" and snapshot["error"]
    assert job.storage.stat(job.tasks[0].key) is None


def test_task_without_input_key_is_refused_before_spawning(tmp_path):
    job = make_job(tmp_path, frames=12, segment_frames=12)
    svc = FakeModal(tmp_path / "fake")
    client = svc.client()
    tasks = [dataclasses.replace(t, input_key=None) for t in job.tasks]
    with pytest.raises(BackendError, match="input_key"):
        backend(job, client).run(tasks, Recorder(job.id), threading.Event())
    assert client.spawned == []


# -- cancel ---------------------------------------------------------------------------


def test_cancel_stops_running_calls(tmp_path):
    job = make_job(tmp_path)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.1)
    stop = threading.Event()
    rec = Recorder(job.id)
    thread, raised = start(backend(job, svc.client()), job.tasks, rec, stop)
    wait_for(lambda: rec.of("progress", "upscale"))
    stop.set()  # `clipexport cancel` stops the client first (SIGTERM), then cancels the calls
    thread.join(DEADLINE_S)
    assert isinstance(raised[0], Interrupted)

    assert cancel_calls(svc.client(), job.store, job.id) == 2
    svc.wait_idle(DEADLINE_S)
    for call in svc.calls.values():
        assert call.status == "terminated" and call.terminate_containers
        with pytest.raises(CallCancelled):  # Modal's empty RemoteError, read as cancelled
            svc.client().get(call.id, timeout=0)
    assert sorted(e.split()[0] for e in svc.events) == ["cancelled", "cancelled"]
    assert not any(job.storage.stat(t.key) for t in job.tasks)
    # a cancelled container leaves no partial segment behind
    leftovers = [p for p in (tmp_path / "fake").rglob("*") if p.is_file() and "segments" in p.parts]
    assert leftovers == []
    # and the calls are gone for good: cancelling again is harmless
    assert cancel_calls(svc.client(), job.store, job.id) == 2


def test_cancel_before_a_container_starts(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    gate = threading.Event()  # never opened: no container gets the calls
    svc = FakeModal(tmp_path / "fake", gate=gate)
    stop = threading.Event()
    rec = Recorder(job.id)
    thread, raised = start(backend(job, svc.client()), job.tasks, rec, stop)
    wait_for(lambda: len(job.store.facts(job.id, "call:")) == 2)
    stop.set()
    thread.join(DEADLINE_S)
    backend(job, svc.client()).cancel()
    svc.wait_idle(DEADLINE_S)
    assert svc.log == []
    assert {c.status for c in svc.calls.values()} == {"terminated"}


# -- waiting is visible ------------------------------------------------------------------


def test_queue_shows_waiting_with_heartbeats(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", cold_start_s=0.8)
    rec = Recorder(job.id)
    backend(job, svc.client()).run(job.tasks, rec, threading.Event())

    beats = rec.of("heartbeat", "queue")
    assert len(beats) >= 5
    assert {b["detail"] for b in beats} == {"cold start"}
    assert beats[0]["waiting"] == 2
    elapsed = [b["elapsed"] for b in beats]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 0.5
    ends = [e for e in rec.of("phase_end", "queue") if "part" in e]
    assert all(e["detail"] == "cold start" and e["elapsed"] >= 0.8 for e in ends)
    loads = rec.of("phase_end", "load_model")
    assert {e.get("part") for e in loads} == {"ctr-01", "ctr-02", None}
    # the wait ends before the segment starts
    first_end = min(e["seq"] for e in ends)
    assert first_end < min(e["seq"] for e in rec.of("phase_start", "upscale"))


def test_warm_up_overlaps_the_cold_start(tmp_path):
    job = make_job(tmp_path, frames=30, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", cold_start_s=0.8)
    b = backend(job, svc.client())
    b.warm_up(1)  # sent while the inputs upload
    assert job.store.fact(job.id, "warmup:0")["id"] in svc.calls
    svc.wait_idle(DEADLINE_S)  # the upload took longer than the cold start
    rec = Recorder(job.id)
    b.run(job.tasks, rec, threading.Event())

    ends = {e["part"]: e for e in rec.of("phase_end", "queue") if "part" in e}
    assert ends["ctr-01"]["detail"] == "warm" and ends["ctr-01"]["elapsed"] < 0.8
    assert ends["ctr-02"]["detail"] == "cold start"
    assert {b["detail"] for b in rec.of("heartbeat", "queue")} <= {"waiting for GPU"}
    assert [e.get("part") for e in rec.of("phase_end", "load_model") if "part" in e] == ["ctr-02"]
    check_outputs(job, tmp_path)


def test_parallel_limits_calls_in_flight(tmp_path):
    job = make_job(tmp_path, frames=30, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.02)
    in_flight: list[int] = []
    client = svc.client()
    spawn = client.spawn

    def counting_spawn(*args, **kwargs):
        in_flight.append(sum(not c.finished.is_set() for c in svc.calls.values() if not c.warm_up))
        return spawn(*args, **kwargs)

    client.spawn = counting_spawn
    backend(job, client, parallel=1).run(job.tasks, Recorder(job.id), threading.Event())
    assert in_flight == [0, 0, 0]
    assert {v["lane"] for v in job.store.facts(job.id, "call:").values()} == {"ctr-01"}


def test_parts_follow_channel_progress_cumulatively(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=20)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.05)
    rec = Recorder(job.id)
    backend(job, svc.client(), parallel=1).run(job.tasks, rec, threading.Event())
    done = [e["done"] for e in rec.of("progress", "upscale", "seg-0001")]
    assert len(done) >= 3 and done == sorted(done) and done[-1] == 20
    per_phase = defaultdict(list)
    for e in rec.events:
        if e.get("part") == "seg-0001":
            per_phase[e["phase"]].append(e["type"])
    for phase in ("upscale", "encode"):
        assert per_phase[phase][0] == "phase_start" and per_phase[phase][-1] == "phase_end"


# -- Modal's transport, time limits and strangers ----------------------------------------


def test_transport_errors_are_asked_again_never_respawned(tmp_path):
    from modal import exception as mx

    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake")
    svc.transport.extend([mx.ServiceError("UNAVAILABLE"), mx.InternalError("INTERNAL"),
                          mx.ResourceExhaustedError("slow down")])
    client = svc.client()
    backend(job, client).run(job.tasks, Recorder(job.id), threading.Event())
    assert not svc.transport  # each was raised, and the client asked again
    assert len(client.spawned) == 2  # nothing respawned: the calls were running all along
    assert svc.starts() == Counter({"seg-0001": 1, "seg-0002": 1})
    check_outputs(job, tmp_path)


def test_a_spawn_that_fails_in_transport_is_asked_again(tmp_path):
    """A spawn's transport error backs off and spawns again, like `get`'s; a call it started anyway is no call of ours."""
    from modal import exception as mx

    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake")
    svc.spawn_transport.extend([(mx.ServiceError("UNAVAILABLE"), False), (mx.InternalError("INTERNAL"), True)])
    client = svc.client()
    backend(job, client).run(job.tasks, Recorder(job.id), threading.Event())
    assert not svc.spawn_transport  # both spawns failed, and the run went on
    assert len(client.spawned) == 2
    lost = set(svc.calls) - set(client.spawned) - {c for c in svc.calls if svc.calls[c].warm_up}
    assert len(lost) == 1  # the call whose answer was lost exists, and the job never recorded it
    assert not lost & {v["id"] for v in job.store.facts(job.id, "call:").values()}
    check_outputs(job, tmp_path)


def test_transport_errors_past_the_cap_stop_resumably_and_the_calls_go_on(tmp_path):
    from modal import exception as mx

    from clipexport.backends.modal import ModalBusy

    job = make_job(tmp_path, frames=20, segment_frames=10)
    gate = threading.Event()
    svc = FakeModal(tmp_path / "fake", gate=gate)
    svc.transport.extend(mx.ServiceError("UNAVAILABLE") for _ in range(1000))
    client = svc.client()
    with pytest.raises(ModalBusy, match="resume") as busy:
        backend(job, client, busy_cap_s=0.3).run(job.tasks, Recorder(job.id), threading.Event())
    assert busy.value.resumable
    assert len(client.spawned) == 2 and not any(svc.calls[c].cancelled.is_set() for c in client.spawned)
    svc.transport.clear()
    gate.set()
    # resume re-attaches to the same calls
    second = svc.client()
    backend(job, second).run(job.tasks, Recorder(job.id), threading.Event())
    assert second.spawned == []
    check_outputs(job, tmp_path)


def test_follow_loop_stays_responsive_while_get_blocks(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", gate=threading.Event())  # the calls wait for a container
    svc.get_gate = threading.Event()  # and Modal does not answer `get`
    rec = Recorder(job.id)
    stop = threading.Event()
    thread, raised = start(backend(job, svc.client()), job.tasks, rec, stop)
    wait_for(lambda: svc.gets >= 2)  # both calls' `get` hang in modal's own code
    beats = len(rec.of("heartbeat", "queue"))
    wait_for(lambda: len(rec.of("heartbeat", "queue")) >= beats + 3)  # the display goes on meanwhile
    stop.set()  # Ctrl-C
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and isinstance(raised[0], Interrupted)
    assert not svc.get_gate.is_set()  # it returned without any answer from Modal
    svc.get_gate.set()
    svc.gate.set()


def test_a_call_past_its_time_limit_is_not_spawned_again(tmp_path):
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.1, timeout_s=0.3)
    client = svc.client()
    with pytest.raises(BackendError, match="time limit") as failed:
        backend(job, client, parallel=1).run(job.tasks, Recorder(job.id), threading.Event())
    assert failed.value.resumable
    assert len(client.spawned) == 1 and svc.starts() == Counter({"seg-0001": 1})


def test_modal_side_retries_rerun_the_same_call(tmp_path):
    """Were the app deployed with `retries=1`, a crash is re-run by Modal under the same call id."""
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", crash={"seg-0001"}, retries=1)
    client = svc.client()
    backend(job, client).run(job.tasks, Recorder(job.id), threading.Event())
    assert len(client.spawned) == 2  # no respawn: the client never saw the failure
    assert svc.attempts("seg-0001") == [1, 2] and svc.calls[client.spawned[0]].runs >= 1
    check_outputs(job, tmp_path)


def test_a_call_this_job_never_recorded_is_cancelled(tmp_path):
    """A client died between spawn and record: the next one finds the stranger by its call id."""
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake", frame_delay_s=0.1)
    lost = svc.client()._instance(MODEL, SCALE, None).run.spawn(
        [task_to_dict(job.tasks[0])], job.storage.url, None).object_id
    wait_for(lambda: svc.starts()["seg-0001"] == 1)  # it runs, and publishes its snapshots
    client = svc.client()
    rec = Recorder(job.id)
    backend(job, client).run(job.tasks, rec, threading.Event())
    svc.wait_idle(DEADLINE_S)
    assert svc.calls[lost].status == "terminated" and svc.calls[lost].terminate_containers
    assert f"cancelled {lost}" in svc.events
    assert lost not in {v["id"] for v in job.store.facts(job.id, "call:").values()}
    check_outputs(job, tmp_path)
    check_events(rec.events, ["seg-0001", "seg-0002"])


def test_containers_are_pooled_per_variant_and_scale_down(tmp_path):
    svc = FakeModal(tmp_path / "fake", scaledown_window_s=30)

    def run(name: str, frames: int, gpu: str | None) -> set[str]:
        (tmp_path / name).mkdir()
        job = make_job(tmp_path / name, frames=frames, segment_frames=frames)
        backend(job, svc.client(), gpu=gpu).run(job.tasks, Recorder(job.id), threading.Event())
        return {c.name for c in svc.containers if c.variant[2] == gpu}

    first = run("a", 10, "L4")
    assert run("b", 11, "L4") == first  # the idle L4 container took it
    assert not run("c", 12, "A10G") & first  # another GPU type: another pool, a cold start
    svc.scaledown_window_s = 0.0  # every idle container has now scaled down
    assert len(run("d", 13, "L4")) == len(first) + 1
    assert all(c.stopped is not None for c in svc.containers if c.name in first)


def test_cancel_job_deletes_the_fragments_a_container_kept_in_the_store(tmp_path, monkeypatch):
    """A preempted container leaves whole fragments under `<segment>.partial/<job>/`; the job's cancel drops them."""
    job = make_job(tmp_path, frames=20, segment_frames=10)
    svc = FakeModal(tmp_path / "fake")
    monkeypatch.setattr("clipexport.backends.modal.RealModalClient", svc.client)
    facts = JobFacts(job.store, job.id)
    for task in job.tasks:
        facts.set_segment_key(task.segment.name, task.key)
    mine = fragment_prefix(job.tasks[0].key, job.id)
    others = fragment_prefix(job.tasks[0].key, "cx-other")
    for prefix in (mine, others):
        job.storage.put_bytes(prefix + "00000.mp4", b"a whole fragment")
    cancel_job(job.store, job.id, segment_root=tmp_path / "segments", wait_s=0)
    assert job.storage.list(mine) == []
    assert [info.key for info in job.storage.list(others)] == [others + "00000.mp4"], "another job's are kept"


def test_damaged_frames_found_in_a_container_reach_the_client(tmp_path):
    """A damaged clip on Modal: each segment's end carries the frames it repaired, as the local backend's does."""
    from clipexport.media import read_frames
    from tests.clips import make_damaged

    job = make_job(tmp_path, clip=make_damaged(tmp_path / "damaged.mp4"), segment_frames=15)
    rec = Recorder(job.id)
    backend(job, FakeModal(tmp_path / "fake").client()).run(job.tasks, rec, threading.Event())

    expected: dict[str, list[int]] = {}
    for task in job.tasks:  # what the reader finds in each segment, here
        found: list[int] = []
        for _ in read_frames(task.clip, task.segment.start, task.segment.count, found):
            pass
        expected[task.segment.name] = found
    assert any(expected.values())
    ends = {e["part"]: e.get("damaged", []) for e in rec.of("phase_end", "encode") if "part" in e}
    assert ends == expected
