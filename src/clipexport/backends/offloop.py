"""Network questions asked off a follow loop, and the backoff of a failing transport.

A follow loop draws progress and answers Ctrl-C; a question to a remote
service can block for a minute when the network is down (Modal retries its
own requests for about 56 s). `Asker` runs each question on a daemon thread
and hands back a `Future`, so the loop only ever looks at answers that have
arrived; a daemon thread never holds up the process's exit. `Backoff` says
when to ask again after transport failures, and when to give up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class Asker:
    """Runs blocking calls on daemon threads; remembers when each began, by key."""

    def __init__(self, clock: Callable[[], float], name: str = "ask") -> None:
        self._clock, self._name = clock, name
        self._pending: dict[Any, tuple[Future[Any], float]] = {}
        self._lock = threading.Lock()

    def ask(self, key: Any, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on its own thread unless a question under `key` is still pending; its future."""
        with self._lock:
            found = self._pending.get(key)
            if found is not None and not found[0].done():
                return found[0]
            future: Future[T] = Future()
            self._pending[key] = (future, self._clock())

        def body() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                future.set_exception(exc)

        threading.Thread(target=body, name=f"{self._name}-{key}", daemon=True).start()
        return future

    def pending(self, key: Any) -> bool:
        """Whether a question under `key` is asked and not answered."""
        with self._lock:
            found = self._pending.get(key)
            return found is not None and not found[0].done()

    def answered(self, key: Any) -> Future[Any] | None:
        """The answered future under `key`, taken out; None while pending or never asked."""
        with self._lock:
            found = self._pending.get(key)
            if found is None or not found[0].done():
                return None
            del self._pending[key]
            return found[0]

    def oldest_pending_s(self) -> float:
        """How long the oldest unanswered question has waited (0 if none)."""
        now = self._clock()
        with self._lock:
            ages = [now - started for future, started in self._pending.values() if not future.done()]
        return max(ages, default=0.0)


@dataclass
class Backoff:
    """Transport failures in a row: the next question waits longer, up to `max_delay_s`; past `cap_s`, give up."""

    first_delay_s: float
    max_delay_s: float
    cap_s: float
    since: float | None = None  # the first failure of the current run of failures
    delay_s: float = 0.0
    next_at: float = float("-inf")

    def failed(self, now: float) -> bool:
        """Note a failure at `now`; True once failures have lasted longer than `cap_s`."""
        if self.since is None:
            self.since, self.delay_s = now, self.first_delay_s
        else:
            self.delay_s = min(self.delay_s * 2, self.max_delay_s)
        self.next_at = now + self.delay_s
        return now - self.since > self.cap_s

    def succeeded(self) -> None:
        self.since, self.delay_s, self.next_at = None, 0.0, float("-inf")

    def may_ask(self, now: float) -> bool:
        return now >= self.next_at

    def failing_s(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since
