"""The transfer engine both stores share: retries, and a pool of parts that stops as one.

- `retried` runs one request (or one resumable stream) again on transient
  errors, within a `Retry` policy, and gives up at once when the transfer
  is being cancelled.
- `Workers` runs the parts of one transfer (multipart upload parts, ranged
  download chunks) on a thread pool, while the caller's thread takes each
  result as it lands (records it, hashes it, reports progress). Any failure,
  and Ctrl-C, sets `cancel`: the other parts stop at their next read
  (`check` raises `Cancelled`), the queued ones never start, and the pool is
  joined before the caller goes on, so no thread outlives its transfer.

Nothing here knows S3: the stores say what is transient and what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

from clipexport.storage.base import Retry

logger = logging.getLogger("clipexport.storage")

K = TypeVar("K")
T = TypeVar("T")


class Cancelled(BaseException):
    """Raised inside a part's stream to stop it at once (another part failed, or Ctrl-C).

    A BaseException, so that botocore neither wraps nor retries it.
    """


def retried(
    attempt: Callable[[], T],
    *,
    policy: Retry,
    transient: Callable[[BaseException], bool],
    cancel: threading.Event | None = None,
    label: str = "",
) -> T:
    """`attempt()`, tried again after a transient error while `policy` allows and nothing cancels.

    The last error is raised as it is: the caller translates it. An
    attempt that resumes (a stream continuing at its byte) keeps its own
    position between calls.
    """
    delays = policy.delays()
    while True:
        try:
            return attempt()
        except Exception as exc:
            delay = next(delays, None) if transient(exc) else None
            if delay is None or (cancel is not None and cancel.is_set()):
                raise
            logger.info("%s: %s; trying again in %.1f s", label, type(exc).__name__, delay)
            time.sleep(delay)


class Workers(Generic[K, T]):
    """The parts of one transfer on up to `workers` threads; results handled on the caller's thread."""

    def __init__(self, workers: int, *, name: str, poll_s: float, inline: bool = False) -> None:
        """`inline`: when one part at a time is all there is to run, run it on the caller's thread."""
        self.workers = max(1, workers)
        self.name, self.poll_s = name, poll_s
        self.inline = inline
        self.cancel = threading.Event()

    def inline_for(self, count: int) -> bool:
        """Whether `run` of `count` parts runs them on the caller's thread (no `tick` while one runs)."""
        return self.inline and min(self.workers, count) <= 1

    def check(self) -> None:
        """Called by a part between reads: stop it if the transfer is being cancelled."""
        if self.cancel.is_set():
            raise Cancelled()

    def run(
        self,
        parts: Iterable[K],
        work: Callable[[K], T],
        done: Callable[[K, T], None],
        tick: Callable[[], None],
        *,
        ready: Callable[[K], bool] = lambda part: True,
    ) -> None:
        """`work(part)` for each part in order; `done(part, result)` and `tick()` on this thread.

        A part starts once a worker is free and `ready(part)` (a window the
        caller keeps, so bytes waiting for their turn stay bounded). The
        first failure, in a part or in `done`, is raised here after the
        others stopped.
        """
        todo = deque(parts)
        if self.inline_for(len(todo)):
            for part in todo:
                done(part, work(part))
                tick()
            return
        pool = ThreadPoolExecutor(max_workers=min(self.workers, max(len(todo), 1)), thread_name_prefix=self.name)
        pending: dict[Future[T], K] = {}
        try:
            while todo or pending:
                while todo and len(pending) < self.workers and ready(todo[0]):
                    part = todo.popleft()
                    pending[pool.submit(work, part)] = part
                finished, _ = wait(pending, timeout=self.poll_s, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(pending.pop(future), future.result())
                tick()
        finally:
            self.cancel.set()
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
