"""The transfer engine both stores use (`storage.transfer`): its retries and its pool of parts.

The stores' own tests (test_storage*.py, against the real S3 server) pin
what uploads and downloads do with it; these pin the engine's promises alone.
"""

from __future__ import annotations

import threading

import pytest

from clipexport.errors import StorageError
from clipexport.storage.base import Retry
from clipexport.storage.transfer import Cancelled, Workers, retried

NOW = Retry(attempts=4, deadline_s=60.0, backoff_s=0.0)


def test_a_failed_part_stops_the_running_ones_and_the_queued_never_start():
    workers: Workers[int, int] = Workers(3, name="engine-test", poll_s=0.01)
    running = threading.Barrier(3)
    stopped: list[int] = []
    started: list[int] = []

    def work(part: int) -> int:
        started.append(part)
        running.wait(10)  # three parts at once, then the first fails
        if part == 0:
            raise StorageError("part 0 failed")
        try:
            while True:
                workers.check()
                threading.Event().wait(0.001)
        except Cancelled:
            stopped.append(part)
            raise

    with pytest.raises(StorageError, match="part 0"):
        workers.run(range(6), work, lambda part, result: None, lambda: None)
    assert sorted(started) == [0, 1, 2] and sorted(stopped) == [1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("engine-test")]  # joined before it raised


def test_results_are_handled_on_the_callers_thread_within_the_window():
    workers: Workers[int, int] = Workers(4, name="engine-test", poll_s=0.01)
    handled: list[tuple[int, int, str]] = []
    ahead: list[int] = []  # how far past the parts handled each part started
    caller = threading.current_thread().name

    def work(part: int) -> int:
        ahead.append(part - len(handled))
        return part * part

    workers.run(range(10), work, lambda part, result: handled.append((part, result, threading.current_thread().name)),
                lambda: None, ready=lambda part: part <= len(handled) + 1)
    assert sorted(handled) == [(p, p * p, caller) for p in range(10)]
    assert max(ahead) <= 1


def test_retried_tries_transient_errors_again_and_raises_the_others():
    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionResetError("cut")
        return "done"

    assert retried(flaky, policy=NOW, transient=lambda exc: isinstance(exc, OSError)) == "done"
    assert len(tries) == 3
    with pytest.raises(ValueError):
        retried(lambda: int("x"), policy=NOW, transient=lambda exc: isinstance(exc, OSError))


def test_retried_gives_up_when_the_policy_or_a_cancel_says_so():
    tries: list[int] = []

    def always() -> None:
        tries.append(1)
        raise ConnectionResetError("cut")

    with pytest.raises(ConnectionResetError):
        retried(always, policy=NOW, transient=lambda exc: True)
    assert len(tries) == NOW.attempts
    cancel = threading.Event()
    cancel.set()
    tries.clear()
    with pytest.raises(ConnectionResetError):
        retried(always, policy=NOW, transient=lambda exc: True, cancel=cancel)
    assert len(tries) == 1
