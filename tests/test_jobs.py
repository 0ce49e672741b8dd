"""The job store: state machine, facts, concurrent writers."""

from __future__ import annotations

import threading

import pytest

from clipexport.errors import JobLookupError
from clipexport.facts import JobFacts
from clipexport.jobs import JobSpec, JobState, JobStore


def spec() -> JobSpec:
    return JobSpec(inputs=["/a.mp4"], output="/out.mp4", model="realesr-animevideov3", scale=2)


def test_create_get_and_spec_round_trip(tmp_path):
    store = JobStore(tmp_path)
    record = store.create(spec())
    assert record.id.startswith("cx-") and len(record.id) == 9
    assert store.get(record.id).spec == spec()
    assert record.state == JobState.RUNNING and record.last_seq == -1


def test_unknown_job_is_a_clear_error(tmp_path):
    with pytest.raises(JobLookupError, match="no job 'cx-nope'"):
        JobStore(tmp_path).get("cx-nope")


@pytest.mark.parametrize(
    "path, allowed",
    [
        ([JobState.INTERRUPTED, JobState.RUNNING, JobState.DONE], True),
        ([JobState.FAILED, JobState.RUNNING, JobState.CANCELLED], True),
        ([JobState.DONE, JobState.RUNNING], False),
        ([JobState.CANCELLED, JobState.RUNNING], False),
        ([JobState.DONE, JobState.CANCELLED], False),
    ],
)
def test_transitions_are_guarded(tmp_path, path, allowed):
    store = JobStore(tmp_path)
    job = store.create(spec()).id
    try:
        for state in path:
            store.transition(job, state)
    except JobLookupError:
        assert not allowed
    else:
        assert allowed


def test_progress_never_goes_back(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(spec()).id
    store.record_progress(job, 10, 0.5)
    store.record_progress(job, 7, 0.25)
    record = store.get(job)
    assert (record.last_seq, record.fraction) == (10, 0.5)


def test_facts_and_transfer_state(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(spec()).id
    store.set_fact(job, "segkey:seg-0001", "segments/abc.mp4")
    store.set_fact(job, "segkey:seg-0002", "segments/def.mp4")
    store.set_fact(job, "segkeyX", 1)
    assert store.facts(job, "segkey:") == {"segkey:seg-0001": "segments/abc.mp4", "segkey:seg-0002": "segments/def.mp4"}
    assert JobFacts(store, job).segment_keys() == {"seg-0001": "segments/abc.mp4", "seg-0002": "segments/def.mp4"}
    state = JobFacts(store, job).transfers()
    state.save("inputs/x", {"upload_id": "u1", "part_size": 5 << 20, "parts": [1, 2]})
    assert JobFacts(JobStore(tmp_path), job).transfers().load("inputs/x")["parts"] == [1, 2]
    assert state.keys() == ["inputs/x"]
    state.clear("inputs/x")
    assert state.load("inputs/x") is None


def test_many_writers_at_once_lose_nothing(tmp_path):
    store = JobStore(tmp_path)
    jobs = [store.create(spec()).id for _ in range(4)]
    errors = []

    def write(job: str) -> None:
        try:
            own = JobStore(tmp_path)
            for n in range(50):
                own.set_fact(job, f"n:{n}", n)
                own.record_progress(job, n, n / 50)
        except Exception as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for job in jobs:
        assert len(store.facts(job, "n:")) == 50
        assert store.get(job).last_seq == 49


def test_processes_creating_the_store_at_once_all_succeed(tmp_path):
    """A fresh database opened by several processes at the same moment (renders started together)."""
    import subprocess
    import sys

    import time

    code = (
        "import sys, time; from pathlib import Path; from clipexport.jobs import JobSpec, JobStore; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "  # all open the new database at one moment
        "JobStore(Path(sys.argv[1])).create(JobSpec(inputs=['/a.mp4'], output='/o.mp4', model='m', scale=2))"
    )
    for round_ in range(3):
        root, start = tmp_path / f"round-{round_}", time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(start)], stderr=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
        assert len(JobStore(root).all()) == 6
